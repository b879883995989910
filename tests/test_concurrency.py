"""Concurrent clients of the SQL functions. The parallel tests run real
threads, each with its own psycopg connection, released together by a
threading.Barrier. The key lock gets two-connection tests with a fixed
interleaving.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
import pytest

APP = "demo"
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


def value_text(conn, key: str) -> str | None:
    return conn.execute("SELECT value::text FROM kvapi.kv_get(%s, %s)", [APP, key]).fetchone()[0]


def app_rows(conn) -> tuple[int, int]:
    """Return the app's row counts in (entries, ephemeral_entries)."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s),"
        " (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s)",
        {"app": APP},
    ).fetchone()


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

def test_parallel_incr_loses_no_update(db_url, conn, app):
    def work(connection, index):
        return [
            connection.execute("SELECT kvapi.kv_incr(%s, 'counter')", [APP]).fetchone()[0]
            for _ in range(100)
        ]

    results = run_clients(db_url, CLIENTS, work)

    returned = sorted(value for client_values in results for value in client_values)
    assert value_text(conn, "counter") == str(CLIENTS * 100)
    assert returned == list(range(1, CLIENTS * 100 + 1))


def test_parallel_decr_and_incr_balance(db_url, conn, app):
    def work(connection, index):
        operation = "kv_incr" if index % 2 == 0 else "kv_decr"
        for _ in range(25):
            connection.execute(f"SELECT kvapi.{operation}(%s, 'counter', 3)", [APP])

    run_clients(db_url, 8, work)

    assert value_text(conn, "counter") == "0"


def test_parallel_setnx_has_one_winner(db_url, conn, app):
    keys = [f"lock:{number}" for number in range(10)]

    def work(connection, index):
        return [
            connection.execute("SELECT kvapi.kv_setnx(%s, %s, %s::jsonb)", [APP, key, str(index)]).fetchone()[0]
            for key in keys
        ]

    results = run_clients(db_url, CLIENTS, work)

    for position, key in enumerate(keys):
        winners = [index for index, created in enumerate(results) if created[position]]
        assert len(winners) == 1, key
        assert value_text(conn, key) == str(winners[0])


def test_parallel_cas_loops_lose_no_update(db_url, conn, app):
    conn.execute("SELECT * FROM kvapi.kv_set(%s, 'counter', '0')", [APP])
    clients = 8
    swaps_per_client = 25

    def work(connection, index):
        swaps = 0
        while swaps < swaps_per_client:
            current = connection.execute("SELECT value FROM kvapi.kv_get(%s, 'counter')", [APP]).fetchone()[0]
            swapped = connection.execute(
                "SELECT kvapi.kv_cas(%s, 'counter', %s::jsonb, %s::jsonb)", [APP, str(current), str(current + 1)]
            ).fetchone()[0]
            if swapped:
                swaps += 1

    run_clients(db_url, clients, work)

    assert value_text(conn, "counter") == str(clients * swaps_per_client)


def test_parallel_set_across_tiers_keeps_one_row(db_url, conn, app):
    def work(connection, index):
        for round_number in range(8):
            ephemeral = (index + round_number) % 2 == 0
            if round_number % 4 == 3:
                connection.execute("SELECT kvapi.kv_mset(%s, '{\"k\": 1}', p_ephemeral => %s)", [APP, ephemeral])
            else:
                connection.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '1', p_ephemeral => %s)", [APP, ephemeral])

    run_clients(db_url, CLIENTS, work)

    durable, ephemeral = app_rows(conn)
    assert durable + ephemeral == 1
    assert value_text(conn, "k") == "1"


def test_parallel_incr_keeps_ephemeral_tier(db_url, conn, app):
    conn.execute("SELECT * FROM kvapi.kv_set(%s, 'counter', '0', p_ephemeral => true)", [APP])

    def work(connection, index):
        for _ in range(25):
            connection.execute("SELECT kvapi.kv_incr(%s, 'counter')", [APP])

    run_clients(db_url, 8, work)

    assert app_rows(conn) == (0, 1)
    assert value_text(conn, "counter") == "200"


def test_parallel_overlapping_mset_does_not_deadlock(db_url, conn, app):
    keys = [f"k{number:02}" for number in range(30)]

    def work(connection, index):
        generator = random.Random(index)
        counts = []
        for round_number in range(10):
            chosen = generator.sample(keys, 10)
            entries = {key: index * 100 + round_number for key in chosen}
            counts.append(
                connection.execute("SELECT kvapi.kv_mset(%s, %s)", [APP, Jsonb(entries)]).fetchone()[0]
            )
        return counts

    results = run_clients(db_url, 8, work)

    assert all(count == 10 for counts in results for count in counts)
    assert conn.execute("SELECT kvapi.kv_mget(%s, %s)", [APP, keys]).fetchone()[0].count(None) == 0


# fixed interleavings

def test_writer_blocks_incr_until_commit(db_url, conn, app):
    with psycopg.connect(db_url) as writer, psycopg.connect(db_url, autocommit=True) as second:
        writer.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '10')", [APP])

        # With a short lock_timeout the second writer gives up instead of waiting.
        second.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.Error) as excinfo:
            second.execute("SELECT kvapi.kv_incr(%s, 'k')", [APP])
        assert excinfo.value.sqlstate == "55P03"
        second.execute("SET lock_timeout = '20s'")

        # Reads take no lock and see the last committed state.
        conn.execute("SET lock_timeout = '200ms'")
        assert value_text(conn, "k") is None

        result: dict[str, Any] = {}
        started = threading.Event()

        def increment() -> None:
            started.set()
            try:
                result["value"] = second.execute("SELECT kvapi.kv_incr(%s, 'k')", [APP]).fetchone()[0]
            except psycopg.Error as error:
                result["error"] = error

        thread = threading.Thread(target=increment)
        thread.start()
        started.wait(5)

        assert wait_for_lock_wait(conn, second.info.backend_pid) == 1
        assert thread.is_alive() is True

        writer.commit()
        thread.join(20)

    assert thread.is_alive() is False
    assert result == {"value": 11}
    assert value_text(conn, "k") == "11"


def test_cas_waits_and_sees_rolled_back_write(db_url, conn, app):
    conn.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '1')", [APP])

    with psycopg.connect(db_url) as writer, psycopg.connect(db_url, autocommit=True) as second:
        writer.execute("SELECT * FROM kvapi.kv_set(%s, 'k', '5')", [APP])
        result: dict[str, Any] = {}

        def compare_and_swap() -> None:
            result["swapped"] = second.execute("SELECT kvapi.kv_cas(%s, 'k', '1', '2')", [APP]).fetchone()[0]

        thread = threading.Thread(target=compare_and_swap)
        thread.start()

        assert wait_for_lock_wait(conn, second.info.backend_pid) == 1

        writer.rollback()
        thread.join(20)

    assert result == {"swapped": True}
    assert value_text(conn, "k") == "2"


def test_setnx_waits_for_uncommitted_create(db_url, conn, app):
    with psycopg.connect(db_url) as writer, psycopg.connect(db_url, autocommit=True) as second:
        writer.execute("SELECT kvapi.kv_setnx(%s, 'k', '\"first\"')", [APP])
        result: dict[str, Any] = {}

        def set_if_absent() -> None:
            result["created"] = second.execute("SELECT kvapi.kv_setnx(%s, 'k', '\"second\"')", [APP]).fetchone()[0]

        thread = threading.Thread(target=set_if_absent)
        thread.start()

        assert wait_for_lock_wait(conn, second.info.backend_pid) == 1

        writer.commit()
        thread.join(20)

    assert result == {"created": False}
    assert value_text(conn, "k") == '"first"'


def test_purge_skips_locked_expired_row(db_url, conn, app):
    for key in ["locked", "free1", "free2"]:
        conn.execute("SELECT * FROM kvapi.kv_set(%s, %s, '1')", [APP, key])
    conn.execute("UPDATE kvapi_data.entries SET expires_at = now() - interval '1 second' WHERE app_id = %s", [APP])

    with psycopg.connect(db_url) as writer:
        writer.execute("SELECT 1 FROM kvapi_data.entries WHERE app_id = %s AND key = 'locked' FOR UPDATE", [APP])

        conn.execute("SET lock_timeout = '1s'")
        assert conn.execute("SELECT kvapi.kv_purge_batch(1000)").fetchone()[0] == 2

        writer.commit()

    assert conn.execute("SELECT kvapi.kv_purge_batch(1000)").fetchone()[0] == 1
    assert app_rows(conn) == (0, 0)
