"""The one way the bench scripts add a table's rows to bench/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def append_rows(head: str, intro: str, columns: str, rows: list[str]) -> None:
    """Append `rows` at the end of RESULTS.md, after a new section (`head`, `intro`, the `columns` table header with
    its separator line) where the file has no `head` yet."""
    text = RESULTS.read_text()
    if head not in text:
        text += f"\n{head}\n\n{intro}\n\n{columns}\n"
    RESULTS.write_text(text + "\n".join(rows) + "\n")
