"""Generated documentation stays in step with its source."""

from pathlib import Path

from kvapi.errors import markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_error_table_matches_registry():
    assert markdown_table() in (DOCS / "errors.md").read_text(encoding="utf-8")
