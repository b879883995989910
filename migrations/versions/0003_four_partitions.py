"""Hash-partition each entries table 4 ways instead of 16.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

upgrade.sql and downgrade.sql next to this file are frozen. Each builds
the tables with the other partition count and copies the rows over.
"""

from pathlib import Path

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SQL_FOLDER = Path(__file__).with_suffix("")


def run_script(name: str) -> None:
    # As in revision 0001: a raw psycopg execute, so "%" and ":" in
    # the scripts reach PostgreSQL untouched.
    connection = op.get_bind().connection.driver_connection
    connection.execute((SQL_FOLDER / name).read_text(encoding="utf-8"))


def upgrade() -> None:
    run_script("upgrade.sql")


def downgrade() -> None:
    run_script("downgrade.sql")
