"""SqlKV: the client interface over a psycopg connection, inside the caller's transaction."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from conftest import create_app, create_database, drop_database

from kvapi.client import (
    UNSET,
    Entry,
    KeyInfo,
    KvAppNotFoundError,
    KvCounterOverflowError,
    KvForbiddenError,
    KvInvalidRequestError,
    KvNotACounterError,
    KvValueTooLargeError,
    KvVersionMismatchError,
    SqlKV,
)

DEFAULT_TTL = 30 * 86400


@pytest.fixture(scope="module")
def database(pg_server, template_url) -> Iterator[str]:
    """One database for this module; each test isolates itself with an app of its own."""
    name = f"kvapi_sdk_sql_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def app_id(database) -> str:
    return create_app(database).app_id


@pytest.fixture
def conn(database) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database, autocommit=True) as connection:
        yield connection


@pytest.fixture
def tx(database) -> Iterator[psycopg.Connection]:
    """A connection that is not in autocommit mode, as application code uses."""
    with psycopg.connect(database) as connection:
        yield connection


@pytest.fixture
def kv(conn, app_id) -> SqlKV:
    """SqlKV on an autocommit connection, for an app of this test's own."""
    return SqlKV(conn, app_id)


def test_operations(kv):
    version = kv.set("a/b", {"n": 2**90})
    assert kv.get("a/b") == {"n": 2**90}
    assert kv.get_entry("a/b") == Entry("a/b", {"n": 2**90}, version, DEFAULT_TTL)
    assert kv.get("missing") is None
    assert kv.get_entry("missing") is None
    assert kv.setex("ex", "v", 30) != version
    assert kv.ttl("ex") == 30
    assert kv.setnx("ex", "w") is False
    assert kv.setnx("nx", "w", ttl=None) is True
    assert kv.ttl("nx") is None
    assert kv.cas("nx", "w", "z") is True
    assert kv.cas("nx", "w", "y") is False
    assert kv.get("nx") == "z"
    assert kv.cas("nx", "z", None) is True
    assert kv.exists("nx") is False
    assert kv.incr("n") == 1
    assert kv.incr("n", 9) == 10
    assert kv.decr("n", 3) == 7
    assert kv.expire("n", 50) is True
    assert kv.ttl("n") == 50
    assert kv.expire("n", None) is True
    assert kv.ttl("n") is None
    assert kv.expire("missing", 5) is False
    assert kv.delete("n") is True
    assert kv.delete("n") is False


def test_ttl_sentinel(kv):
    kv.set("t", 1, ttl=None)
    assert kv.ttl("t") is None
    kv.set("t", 1, ttl=UNSET)
    assert kv.ttl("t") == DEFAULT_TTL
    kv.set("t", 1, ttl=70)
    kv.set("t", 2, keep_ttl=True)
    assert kv.ttl("t") == 70


def test_touch(kv):
    kv.set("t", 1, ttl=10)
    assert kv.get("t", touch=300) == 1
    assert kv.ttl("t") == 300
    assert kv.get("t", touch=True) == 1
    assert kv.ttl("t") == DEFAULT_TTL


def test_mget_mset_list(kv):
    assert kv.mset({"k:1": 1, "k:2": [2], "k:3": "3"}, ttl=60) == 3
    assert kv.mget(["k:1", "nope", "k:3"]) == [1, None, "3"]
    assert list(kv.list(prefix="k:", limit=2)) == ["k:1", "k:2", "k:3"]
    page = kv.list_page(prefix="k:", limit=2)
    assert page.keys == [KeyInfo("k:1", 60), KeyInfo("k:2", 60)]
    assert isinstance(page.cursor, str)


def test_version_preconditions(kv):
    first = kv.set("p", 1)
    kv.set("p", 2)
    with pytest.raises(KvVersionMismatchError) as caught:
        kv.set("p", 3, if_version=first)
    assert caught.value.code == "KV_VERSION_MISMATCH"
    assert caught.value.status == 412
    with pytest.raises(KvVersionMismatchError):
        kv.set("p", 3, if_absent=True)


def test_errors_from_sqlstate(kv, conn):
    kv.set("s", "text")
    with pytest.raises(KvNotACounterError) as caught:
        kv.incr("s")
    assert caught.value.code == "KV_NOT_A_COUNTER"
    assert caught.value.status == 409
    kv.set("max", 2**63 - 1)
    with pytest.raises(KvCounterOverflowError):
        kv.incr("max")
    with pytest.raises(KvInvalidRequestError):
        kv.set("k", 1, ttl=0)
    with pytest.raises(KvInvalidRequestError):
        kv.get("nul\x00key")
    with pytest.raises(KvAppNotFoundError) as caught:
        SqlKV(conn, "nope").get("k")
    assert caught.value.code == "KV_APP_NOT_FOUND"


def test_value_too_large_carries_limit(kv, conn, app_id):
    plan = f"tiny_{secrets.token_hex(4)}"
    conn.execute("INSERT INTO kvapi_data.plans (plan_id, default_ttl_seconds, max_value_bytes) VALUES (%s, 60, 10)", [plan])
    conn.execute("UPDATE kvapi_data.apps SET plan_id = %s WHERE app_id = %s", [plan, app_id])
    with pytest.raises(KvValueTooLargeError) as caught:
        kv.set("big", "x" * 20)
    assert caught.value.limit == 10
    assert caught.value.actual == 22


@pytest.fixture
def orders(conn) -> str:
    """An application table beside kvapi's."""
    conn.execute("CREATE TABLE IF NOT EXISTS orders (order_id text PRIMARY KEY, amount integer NOT NULL)")
    return "orders"


def test_commit_keeps_row_and_key(database, tx, app_id, orders):
    kv = SqlKV(tx, app_id)
    with tx.transaction():
        tx.execute("INSERT INTO orders VALUES ('o-1', 42)")
        assert kv.setnx("idempotency:o-1", {"order": "o-1"}) is True

    with psycopg.connect(database, autocommit=True) as other:
        assert other.execute("SELECT amount FROM orders WHERE order_id = 'o-1'").fetchone() == (42,)
        assert SqlKV(other, app_id).get("idempotency:o-1") == {"order": "o-1"}


def test_rollback_discards_row_and_key(database, tx, app_id, orders):
    kv = SqlKV(tx, app_id)
    with pytest.raises(RuntimeError, match="payment failed"):
        with tx.transaction():
            tx.execute("INSERT INTO orders VALUES ('o-2', 7)")
            assert kv.setnx("idempotency:o-2", {"order": "o-2"}) is True
            raise RuntimeError("payment failed")

    with psycopg.connect(database, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM orders WHERE order_id = 'o-2'").fetchone() == (0,)
        assert SqlKV(other, app_id).get("idempotency:o-2") is None


def test_never_commits_by_itself(database, tx, app_id):
    kv = SqlKV(tx, app_id)
    kv.set("uncommitted", 1)
    kv.incr("counter")
    assert kv.get("uncommitted") == 1
    assert tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    with psycopg.connect(database, autocommit=True) as other:
        assert SqlKV(other, app_id).get("uncommitted") is None
    tx.rollback()
    assert kv.get("uncommitted") is None
    assert kv.get("counter") is None


def test_setnx_waits_for_open_transaction(database, tx, app_id):
    """A second writer of the same key waits for the first transaction and
    then sees its outcome, so one idempotency key admits one order."""
    SqlKV(tx, app_id).setnx("idem", "first")
    outcome: list[bool] = []

    def second_writer() -> None:
        with psycopg.connect(database, autocommit=True) as other:
            outcome.append(SqlKV(other, app_id).setnx("idem", "second"))

    thread = threading.Thread(target=second_writer)
    thread.start()
    with psycopg.connect(database, autocommit=True) as monitor:
        deadline = time.monotonic() + 10
        waiting = 0
        while waiting == 0 and time.monotonic() < deadline:
            (waiting,) = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
    assert waiting == 1
    assert outcome == []
    tx.commit()
    thread.join(timeout=10)
    assert outcome == [False]


def test_error_aborts_only_to_savepoint(database, tx, app_id):
    kv = SqlKV(tx, app_id)
    kv.set("text", "x")
    with pytest.raises(KvNotACounterError):
        with tx.transaction():
            kv.incr("text")
    kv.set("after", 1)
    tx.commit()
    with psycopg.connect(database, autocommit=True) as other:
        assert SqlKV(other, app_id).mget(["text", "after"]) == ["x", 1]


def test_own_json_loader_keeps_big_integers(database, app_id):
    """A connection configured to parse JSON into floats does not change SqlKV's results."""
    with psycopg.connect(database, autocommit=True) as connection:
        psycopg.types.json.set_json_loads(lambda data: float("nan"), connection)
        kv = SqlKV(connection, app_id)
        kv.set("big", 2**100)
        assert kv.get("big") == 2**100


def test_rules(kv):
    kv.expose("public:*", "public", "deny")
    assert [(rule.pattern, rule.read, rule.write) for rule in kv.list_rules()] == [("public:*", "public", "deny")]
    explanation = kv.explain("public:x")
    assert explanation.rule.pattern == "public:*"
    assert explanation.read is True
    assert explanation.write is False
    assert kv.explain("other", user_id="u1").rule is None
    assert kv.unexpose("public:*") is True
    assert kv.list_rules() == []


def test_bound_role_reaches_only_its_app(database, conn, app_id):
    role = f"sdk_role_{secrets.token_hex(4)}"
    conn.execute(f'CREATE ROLE "{role}" LOGIN')
    conn.execute("SELECT kvapi.app_grant_role(%s, %s)", [app_id, role])
    other_app = create_app(database).app_id
    with psycopg.connect(psycopg.conninfo.make_conninfo(database, user=role), autocommit=True) as connection:
        kv = SqlKV(connection, app_id)
        kv.set("mine", {"ok": True})
        assert kv.get("mine") == {"ok": True}
        with pytest.raises(KvForbiddenError) as caught:
            SqlKV(connection, other_app).get("mine")
    assert caught.value.code == "KV_FORBIDDEN"
