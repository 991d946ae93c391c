"""The one exception users see: a one-line message that says what is wrong and how to fix it."""


class T2SError(Exception):
    """A problem with the user's input or environment (not a bug): printed as one line, exit code 2."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message cut to one line, for inclusion in a T2SError."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
