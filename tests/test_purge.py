"""Purging expired keys: `kvapi purge`, the server's purge loop, the
kvapi.kv_purge procedure and its pg_cron job.

Keys are expired by backdating their rows, never by waiting. The loop test
polls only to wait for the server's worker to run, with a bounded deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pgserver
from conftest import create_app, create_database, drop_database, start_kvapi_server, stop_kvapi_server
from kvapi import migrate, purge

LIVE_DURABLE_KEYS = ["durable:live", "durable:persistent"]
LIVE_EPHEMERAL_KEYS = ["ephemeral:live"]
CRON_DATABASE = "kvapi_cron"
# Seconds to wait for the server's purge loop, which runs every 0.5 s here.
PURGE_LOOP_DEADLINE = 30.0


def seed_keys(url: str, app_id: str, *, durable_expired: int, ephemeral_expired: int) -> None:
    """Write live keys in both tiers, plus the given numbers of keys whose
    expiry is backdated to one second ago, all in one transaction."""
    with psycopg.connect(url) as connection:
        for number in range(durable_expired):
            connection.execute(
                "SELECT kvapi.kv_set(%s, %s, '1', p_ttl => '60')", [app_id, f"durable:expired:{number}"]
            )
        for number in range(ephemeral_expired):
            connection.execute(
                "SELECT kvapi.kv_set(%s, %s, '1', p_ttl => '60', p_ephemeral => true)",
                [app_id, f"ephemeral:expired:{number}"],
            )
        connection.execute("SELECT kvapi.kv_set(%s, 'durable:live', '1')", [app_id])
        connection.execute("SELECT kvapi.kv_set(%s, 'durable:persistent', '1', p_ttl => 'null')", [app_id])
        connection.execute("SELECT kvapi.kv_set(%s, 'ephemeral:live', '1', p_ephemeral => true)", [app_id])

        for table in ("entries", "ephemeral_entries"):
            connection.execute(
                f"UPDATE kvapi_data.{table} SET expires_at = now() - interval '1 second'"
                " WHERE app_id = %s AND key LIKE '%%:expired:%%'",
                [app_id],
            )


def stored_keys(url: str, table: str, app_id: str) -> list[str]:
    """Return the keys of app_id's rows in kvapi_data.{table}, expired or not, in order."""
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            f"SELECT key FROM kvapi_data.{table} WHERE app_id = %s ORDER BY key", [app_id]
        ).fetchall()
    return [key for (key,) in rows]


def expired_row_count(url: str) -> int:
    with psycopg.connect(url) as connection:
        (count,) = connection.execute(
            "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE expires_at <= now())"
            " + (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE expires_at <= now())"
        ).fetchone()
    return count


def run_purge_command(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvapi", "purge", *args],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )


# `kvapi purge`


def test_purge_command_deletes_expired(db_url, app):
    seed_keys(db_url, app.app_id, durable_expired=3, ephemeral_expired=2)

    result = run_purge_command(db_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"deleted": 5}\n'
    assert stored_keys(db_url, "entries", app.app_id) == LIVE_DURABLE_KEYS
    assert stored_keys(db_url, "ephemeral_entries", app.app_id) == LIVE_EPHEMERAL_KEYS


def test_purge_command_small_batches(db_url, app):
    seed_keys(db_url, app.app_id, durable_expired=7, ephemeral_expired=3)

    result = run_purge_command(db_url, "--batch-size", "2")

    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"deleted": 10}\n'
    assert stored_keys(db_url, "entries", app.app_id) == LIVE_DURABLE_KEYS
    assert stored_keys(db_url, "ephemeral_entries", app.app_id) == LIVE_EPHEMERAL_KEYS


def test_purge_command_nothing_expired(db_url, app):
    seed_keys(db_url, app.app_id, durable_expired=0, ephemeral_expired=0)

    result = run_purge_command(db_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"deleted": 0}\n'
    assert stored_keys(db_url, "entries", app.app_id) == LIVE_DURABLE_KEYS
    assert stored_keys(db_url, "ephemeral_entries", app.app_id) == LIVE_EPHEMERAL_KEYS


# kvapi.kv_purge, the procedure that the pg_cron job calls


def test_kv_purge_stops_after_max_batches(db_url, conn, app):
    seed_keys(db_url, app.app_id, durable_expired=7, ephemeral_expired=3)

    # Each batch of size 1 deletes one row from each tier, so two batches delete 4.
    conn.execute("CALL kvapi.kv_purge(p_batch_size => 1, p_max_batches => 2)")

    assert expired_row_count(db_url) == 6


def test_schedule_cron_job_without_pg_cron(conn):
    assert purge.schedule_cron_job(conn) is False


# The purge loop of `kvapi serve`


@pytest.fixture
def purge_loop_database(pg_server: pgserver.TestServer, template_url: str) -> Iterator[str]:
    """A migrated database of its own, for the purge loop test's server."""
    name = f"kvapi_purge_loop_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


def purge_pass_total(log_path: Path) -> int:
    """Sum the rows that the purge loop reports deleted in a server log."""
    total = 0
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "purge.pass":
            total += record["deleted"]
    return total


def test_server_purge_loop_deletes_expired(purge_loop_database, tmp_path):
    app = create_app(purge_loop_database)
    log_path = tmp_path / "serve.log"
    server = start_kvapi_server(purge_loop_database, log_path, args=["--purge-interval", "0.5"])
    try:
        seed_keys(purge_loop_database, app.app_id, durable_expired=3, ephemeral_expired=2)

        deadline = time.monotonic() + PURGE_LOOP_DEADLINE
        while expired_row_count(purge_loop_database) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)

        assert expired_row_count(purge_loop_database) == 0, log_path.read_text()[-3000:]
        assert stored_keys(purge_loop_database, "entries", app.app_id) == LIVE_DURABLE_KEYS
        assert stored_keys(purge_loop_database, "ephemeral_entries", app.app_id) == LIVE_EPHEMERAL_KEYS
    finally:
        stop_kvapi_server(server)
    assert purge_pass_total(log_path) == 5


# pg_cron


def pg_cron_library() -> Path:
    """Return where pg_cron.so must be for the test PostgreSQL binaries."""
    pg_config = pgserver.bin_dir() / "pg_config"
    if pg_config.exists():
        library_dir = subprocess.run(
            [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return Path(library_dir) / "pg_cron.so"
    return pgserver.bin_dir().parent / "lib" / "pg_cron.so"


@pytest.fixture(scope="module")
def cron_database() -> Iterator[str]:
    """URL of a migrated database on a PostgreSQL server that preloads pg_cron."""
    library = pg_cron_library()
    if not library.exists():
        pytest.fail(
            f"pg_cron is not installed for the PostgreSQL in {pgserver.bin_dir()}: {library} is missing. "
            "Install it (for the Debian PostgreSQL 15: apt-get install postgresql-15-cron) to run the pg_cron tests.",
            pytrace=False,
        )
    server = pgserver.start_server(
        extra_settings={"shared_preload_libraries": "pg_cron", "cron.database_name": CRON_DATABASE}
    )
    try:
        with psycopg.connect(server.url(database="postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {CRON_DATABASE}")
        url = server.url(database=CRON_DATABASE)
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE EXTENSION pg_cron")
        migrate.upgrade(url)
        yield url
    finally:
        server.stop()


@pytest.fixture
def cron_conn(cron_database: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the pg_cron database, with no cron jobs."""
    with psycopg.connect(cron_database, autocommit=True) as connection:
        connection.execute("SELECT cron.unschedule(jobid) FROM cron.job")
        yield connection


def cron_jobs(connection: psycopg.Connection) -> list[tuple]:
    return connection.execute(
        "SELECT jobname, schedule, command, database, active FROM cron.job ORDER BY jobid"
    ).fetchall()


def test_schedule_cron_job_creates_job(cron_conn):
    assert purge.schedule_cron_job(cron_conn) is True

    assert cron_jobs(cron_conn) == [("kvapi-purge", "* * * * *", "CALL kvapi.kv_purge()", CRON_DATABASE, True)]


def test_schedule_cron_job_twice(cron_conn):
    purge.schedule_cron_job(cron_conn)
    (first_job_id,) = cron_conn.execute("SELECT jobid FROM cron.job").fetchone()

    assert purge.schedule_cron_job(cron_conn) is True

    assert cron_jobs(cron_conn) == [("kvapi-purge", "* * * * *", "CALL kvapi.kv_purge()", CRON_DATABASE, True)]
    assert cron_conn.execute("SELECT jobid FROM cron.job").fetchall() == [(first_job_id,)]


def test_kv_purge_in_cron_database(cron_database, cron_conn):
    app = create_app(cron_database)
    seed_keys(cron_database, app.app_id, durable_expired=7, ephemeral_expired=3)

    # Batches of 2 make the procedure commit several times.
    cron_conn.execute("CALL kvapi.kv_purge(2)")

    assert stored_keys(cron_database, "entries", app.app_id) == LIVE_DURABLE_KEYS
    assert stored_keys(cron_database, "ephemeral_entries", app.app_id) == LIVE_EPHEMERAL_KEYS


def test_kv_purge_command_as_scheduled(cron_database, cron_conn):
    """Run the command text stored in the job, as pg_cron would."""
    app = create_app(cron_database)
    seed_keys(cron_database, app.app_id, durable_expired=3, ephemeral_expired=2)
    purge.schedule_cron_job(cron_conn)
    (command,) = cron_conn.execute("SELECT command FROM cron.job").fetchone()

    cron_conn.execute(command)

    assert stored_keys(cron_database, "entries", app.app_id) == LIVE_DURABLE_KEYS
    assert stored_keys(cron_database, "ephemeral_entries", app.app_id) == LIVE_EPHEMERAL_KEYS
