"""Crash durability: kill -9 PostgreSQL during a write load, restart it on
the same data directory, and check what crash recovery keeps.

Durable keys live in logged tables, so every write acknowledged with fsync
and synchronous_commit on must come back. Ephemeral keys live in UNLOGGED
tables, which PostgreSQL empties during crash recovery ("an unlogged table
is automatically truncated after a crash or unclean shutdown", from the
UNLOGGED parameter of CREATE TABLE in the PostgreSQL documentation), so
they must all be gone and the tables must still work.

Killing processes loses no data that PostgreSQL has already written to
the operating system, so this test checks the commit protocol and crash
recovery, not fsync against a power failure.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import psycopg
import pytest
from psycopg.types.json import Jsonb

import pgserver
from conftest import create_app
from kvapi import migrate

APP_ID = "crash"
WRITER_THREADS = 4
SEED_KEYS = 20
# The load runs until this many writes are acknowledged, or for
# LOAD_SECONDS, whichever comes first. Then the server is killed.
ACKNOWLEDGED_BEFORE_KILL = 200
LOAD_SECONDS = 3.0
# After the postmaster dies, its backends exit when they notice. A new
# postmaster refuses to start while one of them is still attached to the
# old shared memory segment, so they get this long before they are killed too.
BACKEND_EXIT_SECONDS = 10.0

SET = "SELECT version FROM kvapi.kv_set(%s, %s, %s, p_ttl => 'null', p_ephemeral => %s)"
INCR = "SELECT kvapi.kv_incr(%s, %s)"


def start_durable_server() -> pgserver.TestServer:
    """Start a test server that syncs every commit to disk.

    pgserver.start_server() passes -F (fsync off) for speed, so this builds
    the command line itself, without -F. initdb skips its final sync
    (--no-sync) because a killed server loses no file that the operating
    system has already been given."""
    settings = {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "max_connections": "50",
        "shared_buffers": "32MB",
    }
    args = "-h 127.0.0.1 -c logging_collector=off " + " ".join(f"-c {name}={value}" for name, value in settings.items())
    directory = pgserver.bin_dir()
    return pgserver.TestServer(
        initdb=str(directory / "initdb"),
        postgres=str(directory / "postgres"),
        postgres_args=args,
        initdb_args="-U postgres -A trust --no-sync",
        boot_timeout=60,
    )


@pytest.fixture
def durable_server() -> Iterator[pgserver.TestServer]:
    server = start_durable_server()
    try:
        yield server
    finally:
        server.stop()


def crash(server: pgserver.TestServer) -> None:
    """Kill -9 the postmaster, then wait for its orphaned backends to exit
    (killing any still there after BACKEND_EXIT_SECONDS)."""
    postmaster = psutil.Process(pgserver.server_pid(server))
    backends = postmaster.children(recursive=True)
    os.kill(postmaster.pid, signal.SIGKILL)
    server.child_process.wait(timeout=10)
    _, alive = psutil.wait_procs(backends, timeout=BACKEND_EXIT_SECONDS)
    for backend in alive:
        backend.kill()
    psutil.wait_procs(alive, timeout=10)


def restart(server: pgserver.TestServer) -> None:
    """Start a new postmaster on the crashed server's data directory and
    port. It runs crash recovery before it accepts connections."""
    server.child_process = None
    server.start()


@dataclass
class WriterLog:
    """Record of one writer thread's writes."""

    # key -> (value, version) of each kv_set that returned.
    acknowledged: dict[str, tuple[dict, str]] = field(default_factory=dict)
    # The kv_set in flight when the connection broke, which may or may not have committed.
    in_flight_set: tuple[str, dict] | None = None
    counter_key: str = ""
    counter_acknowledged: int = 0
    counter_in_flight: bool = False
    ephemeral_writes: int = 0
    error: BaseException | None = None


def write_until_crash(url: str, thread: int, log: WriterLog, stop: threading.Event) -> None:
    """Alternate durable kv_set, kv_incr and ephemeral kv_set calls until the
    connection breaks or stop is set, recording each acknowledged write."""
    log.counter_key = f"counter:{thread}"
    try:
        connection = psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as error:
        log.error = error
        return
    sequence = 0
    try:
        while not stop.is_set():
            key = f"w{thread}:{sequence}"
            value = {"thread": thread, "sequence": sequence}
            log.in_flight_set = (key, value)
            (version,) = connection.execute(SET, [APP_ID, key, Jsonb(value), False]).fetchone()
            log.acknowledged[key] = (value, version)
            log.in_flight_set = None

            log.counter_in_flight = True
            (count,) = connection.execute(INCR, [APP_ID, log.counter_key]).fetchone()
            log.counter_acknowledged = count
            log.counter_in_flight = False

            connection.execute(SET, [APP_ID, f"e{thread}:{sequence}", Jsonb(value), True])
            log.ephemeral_writes += 1
            sequence += 1
    except psycopg.OperationalError:
        pass  # The server was killed, so the write in flight never returned.
    except BaseException as error:  # noqa: BLE001 - reported by the test
        log.error = error
    finally:
        try:
            connection.close()
        except psycopg.Error:
            pass


def seed(url: str) -> tuple[dict[str, tuple[dict, str]], dict[str, tuple[dict, str]]]:
    """Write SEED_KEYS durable and SEED_KEYS ephemeral keys and checkpoint,
    so the seed is on disk before the load starts. Return both as
    key -> (value, version)."""
    durable, ephemeral = {}, {}
    with psycopg.connect(url, autocommit=True) as connection:
        for index in range(SEED_KEYS):
            value = {"seed": index}
            (version,) = connection.execute(SET, [APP_ID, f"seed:{index}", Jsonb(value), False]).fetchone()
            durable[f"seed:{index}"] = (value, version)
            (version,) = connection.execute(SET, [APP_ID, f"ephemeral-seed:{index}", Jsonb(value), True]).fetchone()
            ephemeral[f"ephemeral-seed:{index}"] = (value, version)
        connection.execute("CHECKPOINT")
    return durable, ephemeral


def test_kill_9_keeps_acknowledged_writes(durable_server: pgserver.TestServer) -> None:
    admin_url = durable_server.url(database="postgres")
    with psycopg.connect(admin_url, autocommit=True) as connection:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            (current,) = connection.execute(f"SHOW {setting}").fetchone()
            assert current == "on", setting
        connection.execute("CREATE DATABASE kvapi")
    url = durable_server.url(database="kvapi")
    migrate.upgrade(url)
    create_app(url, APP_ID)
    seed_durable, seed_ephemeral = seed(url)

    # Load, then kill -9 while the writers are mid-flight.
    stop = threading.Event()
    logs = [WriterLog() for _ in range(WRITER_THREADS)]
    writers = [
        threading.Thread(target=write_until_crash, args=(url, thread, logs[thread], stop))
        for thread in range(WRITER_THREADS)
    ]
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + LOAD_SECONDS
    while time.monotonic() < deadline and sum(len(log.acknowledged) for log in logs) < ACKNOWLEDGED_BEFORE_KILL:
        time.sleep(0.05)
    crash(durable_server)
    stop.set()
    for writer in writers:
        writer.join(timeout=30)
    assert [writer.is_alive() for writer in writers] == [False] * WRITER_THREADS
    assert [log.error for log in logs] == [None] * WRITER_THREADS
    # Every writer had writes acknowledged before the crash.
    assert [len(log.acknowledged) > 0 for log in logs] == [True] * WRITER_THREADS
    assert sum(log.ephemeral_writes for log in logs) > 0

    restart(durable_server)

    with psycopg.connect(url, autocommit=True) as connection:
        durable_rows = {
            key: (value, str(version))
            for key, value, version in connection.execute(
                "SELECT key, value, version FROM kvapi_data.entries WHERE app_id = %s", [APP_ID]
            )
        }
        (ephemeral_count,) = connection.execute("SELECT count(*) FROM kvapi_data.ephemeral_entries").fetchone()
        unlogged_partitions = connection.execute(
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 'ephemeral\\_entries\\_p%' AND relpersistence = 'u'"
        ).fetchone()[0]

    # Every acknowledged durable write is there with its value and version.
    acknowledged = {key: entry for log in logs for key, entry in log.acknowledged.items()}
    assert [key for key in acknowledged if key not in durable_rows] == []
    assert [key for key, entry in acknowledged.items() if durable_rows.get(key, entry) != entry] == []
    assert {key: durable_rows[key] for key in seed_durable} == seed_durable

    # A write in flight either committed whole or not at all.
    for log in logs:
        if log.in_flight_set is not None:
            key, value = log.in_flight_set
            assert durable_rows.get(key, (value,))[0] == value, key
        counter = durable_rows.get(log.counter_key, (0, None))[0]
        allowed = {log.counter_acknowledged}
        if log.counter_in_flight:
            allowed.add(log.counter_acknowledged + 1)
        assert counter in allowed, log.counter_key
    in_flight = {log.in_flight_set[0] for log in logs if log.in_flight_set is not None}
    load_keys = [key for key in durable_rows if re.fullmatch(r"w[0-9]+:[0-9]+", key)]
    assert [key for key in load_keys if key not in acknowledged and key not in in_flight] == []

    # Crash recovery emptied the UNLOGGED tables and kept them UNLOGGED.
    assert ephemeral_count == 0
    assert unlogged_partitions == 4

    with psycopg.connect(url, autocommit=True) as connection:
        for key in seed_ephemeral:
            assert connection.execute("SELECT value FROM kvapi.kv_get(%s, %s)", [APP_ID, key]).fetchone() == (None,), key

        # The ephemeral tier still works after the crash.
        (version,) = connection.execute(SET, [APP_ID, "after-crash", Jsonb({"ok": True}), True]).fetchone()
        assert connection.execute(
            "SELECT value, version, ttl FROM kvapi.kv_get(%s, %s)", [APP_ID, "after-crash"]
        ).fetchone() == ({"ok": True}, version, None)
        connection.execute(SET, [APP_ID, "after-crash:hits", Jsonb(1), True])
        assert connection.execute(INCR, [APP_ID, "after-crash:hits"]).fetchone() == (2,)
        assert connection.execute(
            "SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %s", [APP_ID]
        ).fetchone() == (2,)

    # The version sequence did not go back, so no version repeats after the crash.
    seen_versions = {entry[1] for entry in acknowledged.values()} | {entry[1] for entry in seed_durable.values()}
    assert version not in seen_versions
