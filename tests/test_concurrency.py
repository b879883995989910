"""Concurrent clients of the SQL functions. The parallel tests run real
threads, each with its own psycopg connection, released together by a
threading.Barrier. The key lock gets two-connection tests with a fixed
interleaving.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import create_app, create_database, drop_database

CLIENTS = 32
JOIN_TIMEOUT = 60


def run_clients(db_url: str, count: int, work: Callable[[psycopg.Connection, int], Any]) -> list[Any]:
    """Run work(connection, index) in `count` threads at once and return
    their results in index order. Each thread connects before the barrier,
    so the calls start together. The first error of any thread is raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as connection:
                # Bound every wait, so that a lock bug fails the test instead of hanging it.
                connection.execute("SET lock_timeout = '20s'")
                barrier.wait(timeout=30)
                results[index] = work(connection, index)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)

    assert [thread.name for thread in threads if thread.is_alive()] == []
    if errors:
        raise errors[0]
    return results


@dataclass
class Target:
    """One app in the database shared by this module's tests, with an
    autocommit connection for setting up and checking."""

    url: str
    conn: psycopg.Connection
    app_id: str

    def value(self, key: str) -> str | None:
        return self.conn.execute(
            "SELECT value::text FROM kvapi.kv_get(%s, %s)", [self.app_id, key]
        ).fetchone()[0]

    def rows(self) -> tuple[int, int]:
        """Return the app's row counts in (entries, ephemeral_entries)."""
        return self.conn.execute(
            "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s),"
            " (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s)",
            {"app": self.app_id},
        ).fetchone()


@pytest.fixture(scope="module")
def shared_url(pg_server, template_url) -> Iterator[str]:
    name = f"kvapi_concurrency_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def target(shared_url: str) -> Iterator[Target]:
    app = create_app(shared_url)
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield Target(shared_url, connection, app.app_id)


def wait_for_lock_wait(conn, pid: int) -> int:
    """Poll pg_locks until backend `pid` waits for an advisory lock (at most
    10 s) and return how many advisory locks it waits for."""
    deadline = time.monotonic() + 10
    while True:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted", [pid]
        ).fetchone()[0]
        if waiting or time.monotonic() > deadline:
            return waiting
        time.sleep(0.01)


# parallel clients

def test_parallel_incr_loses_no_update(target):
    def work(connection, index):
        return [
            connection.execute("SELECT kvapi.kv_incr(%s, 'counter')", [target.app_id]).fetchone()[0]
            for _ in range(100)
        ]

    results = run_clients(target.url, CLIENTS, work)

    returned = sorted(value for client_values in results for value in client_values)
    assert target.value("counter") == str(CLIENTS * 100)
    assert returned == list(range(1, CLIENTS * 100 + 1))


def test_parallel_decr_and_incr_balance(target):
    def work(connection, index):
        operation = "kv_incr" if index % 2 == 0 else "kv_decr"
        for _ in range(25):
            connection.execute(f"SELECT kvapi.{operation}(%s, 'counter', 3)", [target.app_id])

    run_clients(target.url, 8, work)

    assert target.value("counter") == "0"


def test_parallel_setnx_has_one_winner(target):
    keys = [f"lock:{number}" for number in range(10)]

    def work(connection, index):
        return [
            connection.execute("SELECT kvapi.kv_setnx(%s, %s, %s::jsonb)", [target.app_id, key, str(index)]).fetchone()[0]
            for key in keys
        ]

    results = run_clients(target.url, CLIENTS, work)

    for position, key in enumerate(keys):
        winners = [index for index, created in enumerate(results) if created[position]]
        assert len(winners) == 1, key
        assert target.value(key) == str(winners[0])


def test_parallel_cas_loops_lose_no_update(target):
    target.conn.execute("SELECT * FROM kvapi.kv_set(%s, 'counter', '0')", [target.app_id])
    clients = 8
    swaps_per_client = 25

    def work(connection, index):
        swaps = 0
        while swaps < swaps_per_client:
            current = connection.execute("SELECT value FROM kvapi.kv_get(%s, 'counter')", [target.app_id]).fetchone()[0]
            swapped = connection.execute(
                "SELECT kvapi.kv_cas(%s, 'counter', %s::jsonb, %s::jsonb)", [target.app_id, str(current), str(current + 1)]
            ).fetchone()[0]
            if swapped:
                swaps += 1

    run_clients(target.url, clients, work)

    assert target.value("counter") == str(clients * swaps_per_client)


def test_parallel_set_across_tiers_keeps_one_row(target):
    def work(connection, index):
        for round_number in range(8):
            ephemeral = (index + round_number) % 2 == 0
            if round_number % 4 == 3:
                connection.execute("SELECT kvapi.kv_mset(%s, '{\"k\": 1}', p_ephemeral => %s)", [target.app_id, ephemeral])
            else:
                connection.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '1', p_ephemeral => %s)", [target.app_id, ephemeral])

    run_clients(target.url, CLIENTS, work)

    durable, ephemeral = target.rows()
    assert durable + ephemeral == 1
    assert target.value("k") == "1"


def test_parallel_incr_keeps_ephemeral_tier(target):
    target.conn.execute("SELECT * FROM kvapi.kv_set(%s, 'counter', '0', p_ephemeral => true)", [target.app_id])

    def work(connection, index):
        for _ in range(25):
            connection.execute("SELECT kvapi.kv_incr(%s, 'counter')", [target.app_id])

    run_clients(target.url, 8, work)

    assert target.rows() == (0, 1)
    assert target.value("counter") == "200"


def test_parallel_overlapping_mset_does_not_deadlock(target):
    keys = [f"k{number:02}" for number in range(30)]

    def work(connection, index):
        generator = random.Random(index)
        counts = []
        for round_number in range(10):
            chosen = generator.sample(keys, 10)
            entries = {key: index * 100 + round_number for key in chosen}
            counts.append(
                connection.execute("SELECT kvapi.kv_mset(%s, %s)", [target.app_id, Jsonb(entries)]).fetchone()[0]
            )
        return counts

    results = run_clients(target.url, 8, work)

    assert all(count == 10 for counts in results for count in counts)
    assert target.conn.execute("SELECT kvapi.kv_mget(%s, %s)", [target.app_id, keys]).fetchone()[0].count(None) == 0


# fixed interleavings

def test_writer_blocks_incr_until_commit(target):
    with psycopg.connect(target.url) as writer, psycopg.connect(target.url, autocommit=True) as second:
        writer.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '10')", [target.app_id])

        # With a short lock_timeout the second writer gives up instead of waiting.
        second.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.Error) as excinfo:
            second.execute("SELECT kvapi.kv_incr(%s, 'k')", [target.app_id])
        assert excinfo.value.sqlstate == "55P03"
        second.execute("SET lock_timeout = '20s'")

        # Reads do not wait for the key lock, and they see the last committed state.
        target.conn.execute("SET lock_timeout = '200ms'")
        assert target.value("k") is None

        result: dict[str, Any] = {}
        started = threading.Event()

        def increment() -> None:
            started.set()
            try:
                result["value"] = second.execute("SELECT kvapi.kv_incr(%s, 'k')", [target.app_id]).fetchone()[0]
            except psycopg.Error as error:
                result["error"] = error

        thread = threading.Thread(target=increment)
        thread.start()
        started.wait(5)

        assert wait_for_lock_wait(target.conn, second.info.backend_pid) == 1
        assert thread.is_alive() is True

        writer.commit()
        thread.join(20)

    assert thread.is_alive() is False
    assert result == {"value": 11}
    assert target.value("k") == "11"


def test_cas_waits_and_sees_rolled_back_write(target):
    target.conn.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '1')", [target.app_id])

    with psycopg.connect(target.url) as writer, psycopg.connect(target.url, autocommit=True) as second:
        writer.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '5')", [target.app_id])
        result: dict[str, Any] = {}

        def compare_and_swap() -> None:
            result["swapped"] = second.execute("SELECT kvapi.kv_cas(%s, 'k', '1', '2')", [target.app_id]).fetchone()[0]

        thread = threading.Thread(target=compare_and_swap)
        thread.start()

        assert wait_for_lock_wait(target.conn, second.info.backend_pid) == 1

        writer.rollback()
        thread.join(20)

    assert result == {"swapped": True}
    assert target.value("k") == "2"


def test_setnx_waits_for_uncommitted_create(target):
    with psycopg.connect(target.url) as writer, psycopg.connect(target.url, autocommit=True) as second:
        writer.execute("SELECT kvapi.kv_setnx(%s, 'k', '\"first\"')", [target.app_id])
        result: dict[str, Any] = {}

        def set_if_absent() -> None:
            result["created"] = second.execute("SELECT kvapi.kv_setnx(%s, 'k', '\"second\"')", [target.app_id]).fetchone()[0]

        thread = threading.Thread(target=set_if_absent)
        thread.start()

        assert wait_for_lock_wait(target.conn, second.info.backend_pid) == 1

        writer.commit()
        thread.join(20)

    assert result == {"created": False}
    assert target.value("k") == '"first"'


def test_purge_skips_locked_expired_row(db_url, conn, app):
    # kv_purge_batch purges every app, so this test uses a database of its own.
    own = Target(db_url, conn, app.app_id)
    for key in ["locked", "free1", "free2"]:
        conn.execute("SELECT * FROM kvapi.kv_set(%s, %s, '1')", [own.app_id, key])
    conn.execute("UPDATE kvapi_data.entries SET expires_at = now() - interval '1 second' WHERE app_id = %s", [own.app_id])

    with psycopg.connect(db_url) as writer:
        writer.execute("SELECT 1 FROM kvapi_data.entries WHERE app_id = %s AND key = 'locked' FOR UPDATE", [own.app_id])

        conn.execute("SET lock_timeout = '1s'")
        assert conn.execute("SELECT kvapi.kv_purge_batch(1000)").fetchone()[0] == 2

        writer.commit()

    assert conn.execute("SELECT kvapi.kv_purge_batch(1000)").fetchone()[0] == 1
    assert own.rows() == (0, 0)
