"""Alembic environment for kvapi.

kvapi.migrate passes the database URL in config.attributes["url"]; plain
`alembic upgrade head` reads DATABASE_URL instead.
"""

import os

from alembic import context
from sqlalchemy import create_engine, pool


def sqlalchemy_url(url: str) -> str:
    """Point a libpq URL at SQLAlchemy's psycopg 3 dialect."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def run_migrations_online() -> None:
    url = context.config.attributes.get("url") or os.environ["DATABASE_URL"]
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("kvapi migrations run online only: set DATABASE_URL and run `kvapi migrate`.")
run_migrations_online()
