"""Generated documentation stays in step with its source."""

from pathlib import Path

from kvapi.errors import markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_error_table_matches_registry():
    assert markdown_table() in (DOCS / "errors.md").read_text(encoding="utf-8")


def test_rest_reference_matches_openapi():
    from kvapi.api.reference import render

    assert (DOCS / "rest.md").read_text(encoding="utf-8") == render()


def test_sql_reference_matches_sql():
    from kvapi.sql_reference import render

    assert (DOCS / "sql.md").read_text(encoding="utf-8") == render()


def test_sql_reference_samples_run(db_url):
    import re

    import psycopg

    from conftest import create_app

    create_app(db_url, "myapp")
    text = (DOCS / "sql.md").read_text(encoding="utf-8")
    samples = re.findall(r"```sql\n(SELECT .*?)```", text, flags=re.DOTALL)
    with psycopg.connect(db_url, autocommit=True) as connection:
        results = [connection.execute(statement).fetchall() for sample in samples for statement in sample.strip().splitlines()]
    assert results[1][0][0] == {"user": "ada"}
    assert results[1][0][2] == 3600
    assert results[2] == [(1,)]
