"""Expired keys in the SQL functions, tested without sleeping. Each test
moves a key's expires_at into the past, so the key is expired but its row
is still there until the purge deletes it.

Every test gets a database of its own, because kv_purge_batch and kv_purge
delete expired rows of every app and the tests count what they delete.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from conftest import create_app

DEFAULT_TTL = 2592000
APP = "demo"


@contextmanager
def raises_sqlstate(sqlstate: str) -> Iterator[pytest.ExceptionInfo]:
    with pytest.raises(psycopg.Error) as excinfo:
        yield excinfo
    assert excinfo.value.sqlstate == sqlstate


def set_key(conn, key: str, value: str = "1", *, ephemeral: bool = False, app_id: str = APP) -> str:
    """Write a key with the default TTL and return its version."""
    return conn.execute(
        "SELECT version FROM kvapi.kv_set(%s, %s, %s::jsonb, p_ephemeral => %s)",
        [app_id, key, value, ephemeral],
    ).fetchone()[0]


def backdate(conn, key: str, *, app_id: str = APP, seconds: int = 1) -> None:
    """Move a key's expiry `seconds` into the past, in whichever tier it is."""
    updated = 0
    for table in ("kvapi_data.entries", "kvapi_data.ephemeral_entries"):
        updated += conn.execute(
            f"UPDATE {table} SET expires_at = now() - make_interval(secs => %s)"
            " WHERE app_id = %s AND key = %s",
            [seconds, app_id, key],
        ).rowcount
    assert updated == 1


def expire_now(conn, key: str, value: str = "1", *, ephemeral: bool = False, app_id: str = APP) -> None:
    set_key(conn, key, value, ephemeral=ephemeral, app_id=app_id)
    backdate(conn, key, app_id=app_id)


def rows(conn, key: str, app_id: str = APP) -> tuple[int, int]:
    """Return how many rows the key has in (entries, ephemeral_entries)."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s AND key = %(key)s),"
        " (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s AND key = %(key)s)",
        {"app": app_id, "key": key},
    ).fetchone()


def table_rows(conn) -> tuple[int, int]:
    """Return the row counts of (entries, ephemeral_entries) over all apps."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM kvapi_data.entries), (SELECT count(*) FROM kvapi_data.ephemeral_entries)"
    ).fetchone()


def value_text(conn, key: str) -> str | None:
    return conn.execute("SELECT value::text FROM kvapi.kv_get(%s, %s)", [APP, key]).fetchone()[0]


def purge_batch(conn, batch_size: int) -> int:
    return conn.execute("SELECT kvapi.kv_purge_batch(%s)", [batch_size]).fetchone()[0]


@pytest.fixture(params=[False, True], ids=["durable", "ephemeral"])
def expired(request, conn, app) -> str:
    """Name of a key that expired a second ago, still stored in its tier."""
    expire_now(conn, "gone", '"old"', ephemeral=request.param)
    assert rows(conn, "gone") == ((0, 1) if request.param else (1, 0))
    return "gone"


# reads

def test_expired_key_absent_for_get(conn, expired):
    assert conn.execute("SELECT * FROM kvapi.kv_get(%s, %s)", [APP, expired]).fetchone() == (None, None, None)


def test_expired_key_not_revived_by_touch(conn, expired):
    assert conn.execute("SELECT * FROM kvapi.kv_get(%s, %s, 'true')", [APP, expired]).fetchone() == (None, None, None)
    assert conn.execute("SELECT * FROM kvapi.kv_get(%s, %s, '60')", [APP, expired]).fetchone() == (None, None, None)
    assert conn.execute("SELECT kvapi.kv_exists(%s, %s)", [APP, expired]).fetchone()[0] is False


def test_expired_key_absent_for_exists(conn, expired):
    assert conn.execute("SELECT kvapi.kv_exists(%s, %s)", [APP, expired]).fetchone()[0] is False


def test_expired_key_absent_for_ttl(conn, expired):
    assert conn.execute("SELECT ttl, \"exists\" FROM kvapi.kv_ttl(%s, %s)", [APP, expired]).fetchone() == (None, False)


def test_expired_key_absent_for_mget(conn, expired):
    set_key(conn, "live", '"here"')

    values = conn.execute("SELECT kvapi.kv_mget(%s, %s)", [APP, [expired, "live", expired]]).fetchone()[0]

    assert values == [None, "here", None]


def test_expired_keys_absent_for_list(conn, app):
    for key in ["k0", "k2", "k4"]:
        set_key(conn, key, ephemeral=key == "k2")
    for key in ["k1", "k3", "k5"]:
        expire_now(conn, key, ephemeral=key == "k3")

    first = conn.execute("SELECT kvapi.kv_list(%s, 'k', NULL, 2)", [APP]).fetchone()[0]
    second = conn.execute("SELECT kvapi.kv_list(%s, 'k', %s, 2)", [APP, first["cursor"]]).fetchone()[0]

    assert [entry["key"] for entry in first["keys"]] == ["k0", "k2"]
    assert first["cursor"] is not None
    assert [entry["key"] for entry in second["keys"]] == ["k4"]
    assert second["cursor"] is None


def test_expired_key_absent_for_del(conn, expired):
    assert conn.execute("SELECT kvapi.kv_del(%s, %s)", [APP, expired]).fetchone()[0] is False


def test_expired_key_fails_if_match(conn, app):
    version = set_key(conn, "gone")
    backdate(conn, "gone")

    with raises_sqlstate("KVVER"):
        conn.execute("SELECT * FROM kvapi.kv_set(%s, 'gone', '2', p_if_match => %s::text[])", [APP, [version]])
    with raises_sqlstate("KVVER"):
        conn.execute("SELECT * FROM kvapi.kv_set(%s, 'gone', '2', p_if_match => ARRAY['*'])", [APP])
    with raises_sqlstate("KVVER"):
        conn.execute("SELECT kvapi.kv_del(%s, 'gone', %s::text[])", [APP, [version]])


def test_expired_key_passes_if_absent(conn, expired):
    conn.execute("SELECT * FROM kvapi.kv_set(%s, %s, '\"new\"', p_if_absent => true)", [APP, expired])

    assert value_text(conn, expired) == '"new"'


# writes that depend on absence

def test_setnx_writes_over_expired_key(conn, expired):
    created = conn.execute("SELECT kvapi.kv_setnx(%s, %s, '\"new\"')", [APP, expired]).fetchone()[0]

    assert created is True
    assert value_text(conn, expired) == '"new"'
    assert conn.execute("SELECT ttl FROM kvapi.kv_ttl(%s, %s)", [APP, expired]).fetchone()[0] == DEFAULT_TTL


def test_cas_expected_null_writes_over_expired_key(conn, expired):
    swapped = conn.execute("SELECT kvapi.kv_cas(%s, %s, NULL, '\"new\"')", [APP, expired]).fetchone()[0]

    assert swapped is True
    assert value_text(conn, expired) == '"new"'
    assert conn.execute("SELECT ttl FROM kvapi.kv_ttl(%s, %s)", [APP, expired]).fetchone()[0] == DEFAULT_TTL


def test_cas_expected_old_value_fails_on_expired_key(conn, expired):
    swapped = conn.execute("SELECT kvapi.kv_cas(%s, %s, '\"old\"', '\"new\"')", [APP, expired]).fetchone()[0]

    assert swapped is False
    assert value_text(conn, expired) is None


def test_incr_starts_expired_key_at_zero(conn, app):
    expire_now(conn, "counter", "41")

    assert conn.execute("SELECT kvapi.kv_incr(%s, 'counter')", [APP]).fetchone()[0] == 1
    assert value_text(conn, "counter") == "1"
    assert conn.execute("SELECT ttl FROM kvapi.kv_ttl(%s, 'counter')", [APP]).fetchone()[0] == DEFAULT_TTL


def test_incr_ignores_expired_non_counter(conn, expired):
    assert conn.execute("SELECT kvapi.kv_decr(%s, %s, 5)", [APP, expired]).fetchone()[0] == -5
    assert value_text(conn, expired) == "-5"


def test_expire_on_expired_key_returns_false(conn, expired):
    assert conn.execute("SELECT kvapi.kv_expire(%s, %s, '60')", [APP, expired]).fetchone()[0] is False
    assert conn.execute("SELECT kvapi.kv_expire(%s, %s, 'null')", [APP, expired]).fetchone()[0] is False
    assert value_text(conn, expired) is None


def test_mset_writes_over_expired_key(conn, expired):
    conn.execute("SELECT kvapi.kv_mset(%s, jsonb_build_object(%s::text, 'new'))", [APP, expired])

    assert value_text(conn, expired) == '"new"'


def test_new_version_after_expiry(conn, app):
    version = set_key(conn, "k")
    backdate(conn, "k")

    conn.execute("SELECT kvapi.kv_setnx(%s, 'k', '1')", [APP])

    assert conn.execute("SELECT version FROM kvapi.kv_get(%s, 'k')", [APP]).fetchone()[0] != version


# purge

def test_purge_batch_deletes_expired_rows_only(conn, app, db_url):
    other = create_app(db_url, "other").app_id
    for key in ["d1", "d2", "d3"]:
        expire_now(conn, key)
    for key in ["e1", "e2"]:
        expire_now(conn, key, ephemeral=True)
    expire_now(conn, "o1", app_id=other)
    set_key(conn, "live")
    set_key(conn, "live_ephemeral", ephemeral=True)
    conn.execute("SELECT * FROM kvapi.kv_set(%s, 'forever', '1', 'null')", [APP])
    set_key(conn, "o2", app_id=other)

    assert purge_batch(conn, 1000) == 6
    assert table_rows(conn) == (3, 1)
    assert purge_batch(conn, 1000) == 0
    assert value_text(conn, "live") == "1"
    assert value_text(conn, "live_ephemeral") == "1"
    assert value_text(conn, "forever") == "1"


def test_purge_batch_spares_key_about_to_expire(conn, app):
    set_key(conn, "soon")
    conn.execute(
        "UPDATE kvapi_data.entries SET expires_at = clock_timestamp() + interval '1 hour' WHERE key = 'soon'"
    )

    assert purge_batch(conn, 1000) == 0
    assert rows(conn, "soon") == (1, 0)


def test_purge_batch_size_applies_to_each_tier(conn, app):
    # kv_purge_batch deletes up to p_batch_size rows from each tier.
    for number in range(5):
        expire_now(conn, f"d{number}")
    for number in range(3):
        expire_now(conn, f"e{number}", ephemeral=True)

    assert purge_batch(conn, 2) == 4
    assert table_rows(conn) == (3, 1)
    assert purge_batch(conn, 2) == 3
    assert table_rows(conn) == (1, 0)
    assert purge_batch(conn, 2) == 1
    assert purge_batch(conn, 2) == 0
    assert table_rows(conn) == (0, 0)


def test_purge_batch_deletes_oldest_expiry_first(conn, app):
    for number, seconds in enumerate([30, 10, 20]):
        set_key(conn, f"k{number}")
        backdate(conn, f"k{number}", seconds=seconds)

    assert purge_batch(conn, 1) == 1
    assert rows(conn, "k0") == (0, 0)
    assert rows(conn, "k1") == (1, 0)
    assert rows(conn, "k2") == (1, 0)


@pytest.mark.parametrize("batch_size", [0, -1, None])
def test_purge_batch_invalid_size_rejected(conn, app, batch_size):
    with raises_sqlstate("KVINV"):
        purge_batch(conn, batch_size)


def test_purge_procedure_empties_expired_rows(conn, app):
    conn.execute(
        "SELECT kvapi.kv_mset(%s, (SELECT jsonb_object_agg('d' || i, i) FROM generate_series(1, 25) i))", [APP]
    )
    conn.execute(
        "SELECT kvapi.kv_mset(%s, (SELECT jsonb_object_agg('e' || i, i) FROM generate_series(1, 12) i),"
        " p_ephemeral => true)",
        [APP],
    )
    conn.execute("UPDATE kvapi_data.entries SET expires_at = now() - interval '1 second'")
    conn.execute("UPDATE kvapi_data.ephemeral_entries SET expires_at = now() - interval '1 second'")
    set_key(conn, "live")
    set_key(conn, "live_ephemeral", ephemeral=True)

    conn.execute("CALL kvapi.kv_purge(10)")

    assert table_rows(conn) == (1, 1)
    assert value_text(conn, "live") == "1"
    assert value_text(conn, "live_ephemeral") == "1"


def test_purge_procedure_with_defaults(conn, app):
    for number in range(3):
        expire_now(conn, f"k{number}", ephemeral=number == 1)

    conn.execute("CALL kvapi.kv_purge()")

    assert table_rows(conn) == (0, 0)


def test_key_rewritten_after_expiry_survives_purge(conn, app):
    expire_now(conn, "k", '"old"')

    set_key(conn, "k", '"new"')

    assert purge_batch(conn, 1000) == 0
    assert value_text(conn, "k") == '"new"'


def test_key_rewritten_in_other_tier_survives_purge(conn, app):
    expire_now(conn, "k", '"old"', ephemeral=True)

    assert conn.execute("SELECT kvapi.kv_incr(%s, 'k')", [APP]).fetchone()[0] == 1
    assert rows(conn, "k") == (1, 1)

    assert purge_batch(conn, 1000) == 1
    assert rows(conn, "k") == (1, 0)
    assert value_text(conn, "k") == "1"


def test_expired_row_in_other_tier_stays_invisible(conn, app):
    expire_now(conn, "k", '"old"')
    set_key(conn, "k", '"new"', ephemeral=True)

    listed = conn.execute("SELECT kvapi.kv_list(%s)", [APP]).fetchone()[0]

    assert rows(conn, "k") == (1, 1)
    assert [entry["key"] for entry in listed["keys"]] == ["k"]
    assert conn.execute("SELECT kvapi.kv_mget(%s, ARRAY['k'])", [APP]).fetchone()[0] == ["new"]

    set_key(conn, "k", '"durable"')

    assert rows(conn, "k") == (1, 0)
    assert value_text(conn, "k") == '"durable"'
