"""Expired keys in the SQL functions, tested without sleeping. Each test
moves a key's expires_at into the past, so the key is expired but its row
is still there until the purge deletes it.

The purge tests get a database of their own, because kv_purge_batch and
kv_purge delete expired rows of every app and the tests count what they
delete. The other tests share one database and each works in an app of its
own, which is much faster than cloning a database per test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from conftest import create_app, create_database, drop_database

DEFAULT_TTL = 2592000


@contextmanager
def raises_sqlstate(sqlstate: str) -> Iterator[pytest.ExceptionInfo]:
    with pytest.raises(psycopg.Error) as excinfo:
        yield excinfo
    assert excinfo.value.sqlstate == sqlstate


@dataclass
class Store:
    """One app and an autocommit connection to its database."""

    conn: psycopg.Connection
    app_id: str

    def one(self, sql: str, *args: Any) -> tuple:
        """Run sql with the app id as its first parameter and args after it."""
        return self.conn.execute(sql, [self.app_id, *args]).fetchone()

    def scalar(self, sql: str, *args: Any) -> Any:
        return self.one(sql, *args)[0]

    def set(self, key: str, value: str = "1", *, ephemeral: bool = False) -> str:
        """Write a key with the default TTL and return its version."""
        return self.scalar(
            "SELECT version FROM kvapi.kv_set(%s, %s, %s::jsonb, p_ephemeral => %s)", key, value, ephemeral
        )

    def backdate(self, key: str, seconds: int = 1) -> None:
        """Move a key's expiry `seconds` into the past, in whichever tier it is."""
        updated = 0
        for table in ("kvapi_data.entries", "kvapi_data.ephemeral_entries"):
            updated += self.conn.execute(
                f"UPDATE {table} SET expires_at = now() - make_interval(secs => %s)"
                " WHERE app_id = %s AND key = %s",
                [seconds, self.app_id, key],
            ).rowcount
        assert updated == 1

    def expire_now(self, key: str, value: str = "1", *, ephemeral: bool = False) -> None:
        self.set(key, value, ephemeral=ephemeral)
        self.backdate(key)

    def rows(self, key: str) -> tuple[int, int]:
        """Return how many rows the key has in (entries, ephemeral_entries)."""
        return self.conn.execute(
            "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s AND key = %(key)s),"
            " (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s AND key = %(key)s)",
            {"app": self.app_id, "key": key},
        ).fetchone()

    def value(self, key: str) -> str | None:
        return self.scalar("SELECT value::text FROM kvapi.kv_get(%s, %s)", key)

    def ttl(self, key: str) -> tuple[int | None, bool]:
        return self.one("SELECT ttl, \"exists\" FROM kvapi.kv_ttl(%s, %s)", key)

    def table_rows(self) -> tuple[int, int]:
        """Return the row counts of (entries, ephemeral_entries) over all apps."""
        return self.conn.execute(
            "SELECT (SELECT count(*) FROM kvapi_data.entries), (SELECT count(*) FROM kvapi_data.ephemeral_entries)"
        ).fetchone()

    def purge_batch(self, batch_size: int | None) -> int:
        return self.conn.execute("SELECT kvapi.kv_purge_batch(%s)", [batch_size]).fetchone()[0]


@pytest.fixture(scope="module")
def shared_url(pg_server, template_url) -> Iterator[str]:
    name = f"kvapi_sql_expiry_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def store(shared_url: str) -> Iterator[Store]:
    """A fresh app in the database shared by this module's tests."""
    app = create_app(shared_url)
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield Store(connection, app.app_id)


@pytest.fixture
def own_store(conn, app) -> Store:
    """An app in a database of this test's own, for tests that purge."""
    return Store(conn, app.app_id)


@pytest.fixture(params=[False, True], ids=["durable", "ephemeral"])
def expired(request, store: Store) -> str:
    """Name of a key that expired a second ago, still stored in its tier."""
    store.expire_now("gone", '"old"', ephemeral=request.param)
    assert store.rows("gone") == ((0, 1) if request.param else (1, 0))
    return "gone"


# reads

def test_expired_key_absent_for_get(store, expired):
    assert store.one("SELECT * FROM kvapi.kv_get(%s, %s)", expired) == (None, None, None)


def test_expired_key_not_revived_by_touch(store, expired):
    assert store.one("SELECT * FROM kvapi.kv_get(%s, %s, 'true')", expired) == (None, None, None)
    assert store.one("SELECT * FROM kvapi.kv_get(%s, %s, '60')", expired) == (None, None, None)
    assert store.scalar("SELECT kvapi.kv_exists(%s, %s)", expired) is False


def test_expired_key_absent_for_exists(store, expired):
    assert store.scalar("SELECT kvapi.kv_exists(%s, %s)", expired) is False


def test_expired_key_absent_for_ttl(store, expired):
    assert store.ttl(expired) == (None, False)


def test_expired_key_absent_for_mget(store, expired):
    store.set("live", '"here"')

    values = store.scalar("SELECT kvapi.kv_mget(%s, %s)", [expired, "live", expired])

    assert values == [None, "here", None]


def test_expired_keys_absent_for_list(store):
    for key in ["k0", "k2", "k4"]:
        store.set(key, ephemeral=key == "k2")
    for key in ["k1", "k3", "k5"]:
        store.expire_now(key, ephemeral=key == "k3")

    first = store.scalar("SELECT kvapi.kv_list(%s, 'k', NULL, 2)")
    second = store.scalar("SELECT kvapi.kv_list(%s, 'k', %s, 2)", first["cursor"])

    assert [entry["key"] for entry in first["keys"]] == ["k0", "k2"]
    assert first["cursor"] is not None
    assert [entry["key"] for entry in second["keys"]] == ["k4"]
    assert second["cursor"] is None


def test_expired_key_absent_for_del(store, expired):
    assert store.scalar("SELECT kvapi.kv_del(%s, %s)", expired) is False


def test_expired_key_fails_if_match(store):
    version = store.set("gone")
    store.backdate("gone")

    with raises_sqlstate("KVVER"):
        store.one("SELECT * FROM kvapi.kv_set(%s, 'gone', '2', p_if_match => %s::text[])", [version])
    with raises_sqlstate("KVVER"):
        store.one("SELECT * FROM kvapi.kv_set(%s, 'gone', '2', p_if_match => ARRAY['*'])")
    with raises_sqlstate("KVVER"):
        store.one("SELECT kvapi.kv_del(%s, 'gone', %s::text[])", [version])


def test_expired_key_passes_if_absent(store, expired):
    store.one("SELECT * FROM kvapi.kv_set(%s, %s, '\"new\"', p_if_absent => true)", expired)

    assert store.value(expired) == '"new"'


# writes that depend on absence

def test_setnx_writes_over_expired_key(store, expired):
    created = store.scalar("SELECT kvapi.kv_setnx(%s, %s, '\"new\"')", expired)

    assert created is True
    assert store.value(expired) == '"new"'
    assert store.ttl(expired) == (DEFAULT_TTL, True)


def test_cas_expected_null_writes_over_expired_key(store, expired):
    swapped = store.scalar("SELECT kvapi.kv_cas(%s, %s, NULL, '\"new\"')", expired)

    assert swapped is True
    assert store.value(expired) == '"new"'
    assert store.ttl(expired) == (DEFAULT_TTL, True)


def test_cas_expected_old_value_fails_on_expired_key(store, expired):
    swapped = store.scalar("SELECT kvapi.kv_cas(%s, %s, '\"old\"', '\"new\"')", expired)

    assert swapped is False
    assert store.value(expired) is None


def test_incr_starts_expired_key_at_zero(store):
    store.expire_now("counter", "41")

    assert store.scalar("SELECT kvapi.kv_incr(%s, 'counter')") == 1
    assert store.value("counter") == "1"
    assert store.ttl("counter") == (DEFAULT_TTL, True)


def test_incr_ignores_expired_non_counter(store, expired):
    assert store.scalar("SELECT kvapi.kv_decr(%s, %s, 5)", expired) == -5
    assert store.value(expired) == "-5"


def test_expire_on_expired_key_returns_false(store, expired):
    assert store.scalar("SELECT kvapi.kv_expire(%s, %s, '60')", expired) is False
    assert store.scalar("SELECT kvapi.kv_expire(%s, %s, 'null')", expired) is False
    assert store.value(expired) is None


def test_mset_writes_over_expired_key(store, expired):
    store.scalar("SELECT kvapi.kv_mset(%s, jsonb_build_object(%s::text, 'new'))", expired)

    assert store.value(expired) == '"new"'


def test_new_version_after_expiry(store):
    version = store.set("k")
    store.backdate("k")

    store.scalar("SELECT kvapi.kv_setnx(%s, 'k', '1')")

    assert store.scalar("SELECT version FROM kvapi.kv_get(%s, 'k')") != version


def test_expired_row_in_other_tier_stays_invisible(store):
    store.expire_now("k", '"old"')
    store.set("k", '"new"', ephemeral=True)

    listed = store.scalar("SELECT kvapi.kv_list(%s)")

    assert store.rows("k") == (1, 1)
    assert [entry["key"] for entry in listed["keys"]] == ["k"]
    assert store.scalar("SELECT kvapi.kv_mget(%s, ARRAY['k'])") == ["new"]

    store.set("k", '"durable"')

    assert store.rows("k") == (1, 0)
    assert store.value("k") == '"durable"'


# purge

def test_purge_batch_deletes_expired_rows_only(own_store, db_url):
    other = Store(own_store.conn, create_app(db_url, "other").app_id)
    for key in ["d1", "d2", "d3"]:
        own_store.expire_now(key)
    for key in ["e1", "e2"]:
        own_store.expire_now(key, ephemeral=True)
    other.expire_now("o1")
    own_store.set("live")
    own_store.set("live_ephemeral", ephemeral=True)
    own_store.one("SELECT * FROM kvapi.kv_set(%s, 'forever', '1', 'null')")
    other.set("o2")

    assert own_store.purge_batch(1000) == 6
    assert own_store.table_rows() == (3, 1)
    assert own_store.purge_batch(1000) == 0
    assert own_store.value("live") == "1"
    assert own_store.value("live_ephemeral") == "1"
    assert own_store.value("forever") == "1"
    assert other.value("o2") == "1"


def test_purge_batch_spares_key_about_to_expire(own_store):
    own_store.set("soon")
    own_store.conn.execute(
        "UPDATE kvapi_data.entries SET expires_at = clock_timestamp() + interval '1 hour' WHERE key = 'soon'"
    )

    assert own_store.purge_batch(1000) == 0
    assert own_store.rows("soon") == (1, 0)


def test_purge_batch_size_applies_to_each_tier(own_store):
    # kv_purge_batch deletes up to p_batch_size rows from each tier.
    for number in range(5):
        own_store.expire_now(f"d{number}")
    for number in range(3):
        own_store.expire_now(f"e{number}", ephemeral=True)

    assert own_store.purge_batch(2) == 4
    assert own_store.table_rows() == (3, 1)
    assert own_store.purge_batch(2) == 3
    assert own_store.table_rows() == (1, 0)
    assert own_store.purge_batch(2) == 1
    assert own_store.purge_batch(2) == 0
    assert own_store.table_rows() == (0, 0)


def test_purge_batch_deletes_oldest_expiry_first(own_store):
    for number, seconds in enumerate([30, 10, 20]):
        own_store.set(f"k{number}")
        own_store.backdate(f"k{number}", seconds=seconds)

    assert own_store.purge_batch(1) == 1
    assert own_store.rows("k0") == (0, 0)
    assert own_store.rows("k1") == (1, 0)
    assert own_store.rows("k2") == (1, 0)


@pytest.mark.parametrize("batch_size", [0, -1, None])
def test_purge_batch_invalid_size_rejected(store, batch_size):
    with raises_sqlstate("KVINV"):
        store.purge_batch(batch_size)


def test_purge_procedure_empties_expired_rows(own_store):
    own_store.scalar(
        "SELECT kvapi.kv_mset(%s, (SELECT jsonb_object_agg('d' || i, i) FROM generate_series(1, 25) i))"
    )
    own_store.scalar(
        "SELECT kvapi.kv_mset(%s, (SELECT jsonb_object_agg('e' || i, i) FROM generate_series(1, 12) i),"
        " p_ephemeral => true)"
    )
    own_store.conn.execute("UPDATE kvapi_data.entries SET expires_at = now() - interval '1 second'")
    own_store.conn.execute("UPDATE kvapi_data.ephemeral_entries SET expires_at = now() - interval '1 second'")
    own_store.set("live")
    own_store.set("live_ephemeral", ephemeral=True)

    own_store.conn.execute("CALL kvapi.kv_purge(10)")

    assert own_store.table_rows() == (1, 1)
    assert own_store.value("live") == "1"
    assert own_store.value("live_ephemeral") == "1"


def test_purge_procedure_with_defaults(own_store):
    for number in range(3):
        own_store.expire_now(f"k{number}", ephemeral=number == 1)

    own_store.conn.execute("CALL kvapi.kv_purge()")

    assert own_store.table_rows() == (0, 0)


def test_key_rewritten_after_expiry_survives_purge(own_store):
    own_store.expire_now("k", '"old"')

    own_store.set("k", '"new"')

    assert own_store.purge_batch(1000) == 0
    assert own_store.value("k") == '"new"'


def test_key_rewritten_in_other_tier_survives_purge(own_store):
    own_store.expire_now("k", '"old"', ephemeral=True)

    assert own_store.scalar("SELECT kvapi.kv_incr(%s, 'k')") == 1
    assert own_store.rows("k") == (1, 1)

    assert own_store.purge_batch(1000) == 1
    assert own_store.rows("k") == (1, 0)
    assert own_store.value("k") == "1"
