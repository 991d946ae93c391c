"""Tables for the terminal, laid out by rich: t2s-infra's listings (`ls`) and the launch plan."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def columns(*headers: str) -> Table:
    """A borderless table with a header row, columns two spaces apart."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="", padding=(0, 2, 0, 0))
    for header in headers:
        table.add_column(header, no_wrap=True)
    return table


def add_row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))  # Text: a "[" in a run id or a note is not rich markup


def plain(table: Table, indent: int = 0) -> list[str]:
    """The table's lines at its natural width, whatever the terminal (or pipe) is: for reading and for grep."""
    console = Console(width=10_000, color_system=None, force_terminal=False, highlight=False)
    with console.capture() as captured:
        console.print(table)
    return [" " * indent + line.rstrip() for line in captured.get().splitlines()]
