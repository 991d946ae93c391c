"""The one exception users see, and the shell every command runs in (t2s, t2s-infra, the training worker): a
T2SError is one line, `<command>: error: <what is wrong and how to fix it>`, every secret hidden, and a non-zero
exit code."""

from __future__ import annotations

import contextlib
import sys
import unicodedata
from collections.abc import Iterator

from jobs.lib.credentials import redact


class T2SError(Exception):
    """A problem with the user's input or environment (not a bug): printed as one line, exit code 2 (or the one given:
    t2s-infra exits 1 for a job that failed on its pod)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message cut to one line, for inclusion in a T2SError."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def printable(text: str, multiline: bool = False) -> str:
    """Text that cannot drive a terminal: control characters (ESC, CR, DEL, C1 controls...) and invisible format
    characters (bidirectional overrides, zero-width marks, line separators) become escapes such as \\x1b or \\u202e.
    Line feeds and tabs stay when `multiline`, and are escaped otherwise."""
    return "".join(_escape(ch) if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
                   and not (multiline and ch in "\n\t") else ch for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


@contextlib.contextmanager
def one_line_errors(command: str, interrupted: str = "interrupted") -> Iterator[None]:
    """Runs a command's body: a T2SError becomes its one line on stderr (every known secret and token-shaped word in
    it hidden) and its exit code; Ctrl-C the line `interrupted` says and exit code 130. Anything else is a bug and
    keeps its traceback."""
    try:
        yield
    except T2SError as exc:
        print(f"{command}: error: {printable(redact(str(exc)))}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"{command}: error: {redact(interrupted)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run_app(app) -> None:
    """Runs a typer app as a console script with usage errors as one line, like every other error: a bad option or
    value prints `<command>: error: <what typer found> (see <command> --help)` and exits 2, instead of typer's boxed
    usage text. Help, `--version`, completion and every command's own errors behave as before."""
    import typer

    try:
        from typer._click import exceptions  # a typer that carries its own click (0.29 here)
    except ImportError:  # an older typer, on click
        from click import exceptions
    try:
        code = app(standalone_mode=False)
    except exceptions.NoArgsIsHelpError as exc:  # `t2s` alone: its help, as typer prints it
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "t2s"
        print(f"{command}: error: {printable(redact(exc.format_message()))} (see {command} --help)",
              file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except exceptions.ClickException as exc:  # e.g. an unreadable file argument
        print(f"error: {printable(redact(exc.format_message()))}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # end of input at a prompt
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # typer.Exit(code) comes back as its code


def version_option(program: str):
    """The `--version` option of a command line's callback (t2s, t2s-infra: one package, one version): prints
    `<program> <version>` and exits before any command runs."""
    import typer

    def show(value: bool) -> None:
        if value:
            from importlib.metadata import version

            print(f"{program} {version('t2s')}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True,
                        help=f"Print the version of {program} and exit.")
