"""Cut statements from the hot paths of the key-value functions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

upgrade.sql and downgrade.sql next to this file are frozen: upgrade.sql
replaces the functions that changed in sql/ since revision 0001, and
downgrade.sql restores their revision 0001 definitions.
"""

from pathlib import Path

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SQL_FOLDER = Path(__file__).with_suffix("")


def run_script(name: str) -> None:
    # As in revision 0001: a raw psycopg execute, so "%" and ":" in
    # function bodies reach PostgreSQL untouched.
    connection = op.get_bind().connection.driver_connection
    connection.execute((SQL_FOLDER / name).read_text(encoding="utf-8"))


def upgrade() -> None:
    run_script("upgrade.sql")


def downgrade() -> None:
    run_script("downgrade.sql")
