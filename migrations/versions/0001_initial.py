"""Create the kvapi schemas, tables and functions.

Revision ID: 0001
Revises:
Create Date: 2026-12-04

The SQL lives in the folder next to this file, a frozen copy of sql/ as it
stood when this revision was written. Later changes to sql/ go into new
revisions with their own copies, so replaying this one never changes.
"""

from pathlib import Path

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQL_FOLDER = Path(__file__).with_suffix("")


def upgrade() -> None:
    # The raw psycopg connection runs each file as one multi-statement
    # script with no placeholder processing, so "%" and ":" in function
    # bodies reach PostgreSQL untouched.
    connection = op.get_bind().connection.driver_connection
    for path in sorted(SQL_FOLDER.glob("*.sql")):
        connection.execute(path.read_text(encoding="utf-8"))


def downgrade() -> None:
    op.execute("DROP SCHEMA kvapi CASCADE")
    op.execute("DROP SCHEMA kvapi_data CASCADE")
