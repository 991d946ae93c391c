"""The one exception users see: a one-line message that says what is wrong and how to fix it."""


class T2SError(Exception):
    """A problem with the user's input or environment (not a bug): printed as one line, exit code 2."""
