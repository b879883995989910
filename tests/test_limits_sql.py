"""Plan limits in the SQL functions: value size, key count and total
storage, checked at their exact boundaries.

Sizes are exact: a value counts octet_length(value::text), the JSON text as
PostgreSQL stores it, and a row counts octet_length(key) plus that. String
values are used where a size matters, because "x" * (n - 2) in quotes is
exactly n bytes of stored text.

The tests share one database and each works in an app with a plan of its
own, because cloning the template database costs about half a second per
test. Expiry is simulated by backdating expires_at, never by sleeping.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from conftest import create_app, create_database, drop_database

UNLIMITED_VALUE_BYTES = 1048576
WRITERS = 16
JOIN_TIMEOUT = 60


def string_value(size: int) -> str:
    """Return the JSON text of a string value whose stored text is `size` bytes."""
    return '"' + "x" * (size - 2) + '"'


def row_size(key: str, value_text: str) -> int:
    """Return the storage a row counts against the plan, for a value already
    in the text form PostgreSQL stores."""
    return len(key.encode()) + len(value_text.encode())


@pytest.fixture(scope="module")
def shared_url(pg_server, template_url) -> Iterator[str]:
    name = f"kvapi_limits_sql_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@dataclass
class LimitedApp:
    """One app of the shared database, on a plan of its own, and an
    autocommit connection to the database."""

    conn: psycopg.Connection
    app_id: str

    def scalar(self, sql: str, params: Any = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()[0]

    def use_plan(self, *, max_value_bytes: int = UNLIMITED_VALUE_BYTES, max_keys: int | None = None,
                 max_total_bytes: int | None = None) -> None:
        """Create or change the app's own plan (named after the app) and move the app to it."""
        self.conn.execute(
            "SELECT kvapi.plan_set(%s, %s, p_max_keys => %s, p_max_total_bytes => %s)",
            [self.app_id, max_value_bytes, max_keys, max_total_bytes],
        )
        self.conn.execute("SELECT kvapi.app_set_plan(%s, %s)", [self.app_id, self.app_id])

    def set(self, key: str, value: str, *, ephemeral: bool = False, ttl: str | None = None) -> None:
        self.conn.execute(
            "SELECT * FROM kvapi.kv_set(%s, %s, %s::jsonb, p_ttl => %s::jsonb, p_ephemeral => %s)",
            [self.app_id, key, value, ttl, ephemeral],
        )

    def value(self, key: str) -> str | None:
        return self.scalar("SELECT value::text FROM kvapi.kv_get(%s, %s)", [self.app_id, key])

    def usage(self) -> dict[str, Any]:
        return self.scalar("SELECT kvapi.kv_usage(%s)", [self.app_id])

    def counted(self) -> tuple[int, int]:
        """Return (keys, bytes) as kv_usage reports them."""
        usage = self.usage()
        return usage["keys"], usage["bytes"]

    def recounted(self) -> tuple[int, int]:
        """Return (keys, bytes) of the app's live rows, counted from the tables."""
        keys, size = self.conn.execute(
            "SELECT count(*), coalesce(sum(octet_length(key) + octet_length(value::text)), 0)"
            " FROM (SELECT key, value, expires_at FROM kvapi_data.entries WHERE app_id = %(app)s"
            "       UNION ALL"
            "       SELECT key, value, expires_at FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s) t"
            " WHERE expires_at IS NULL OR expires_at > now()",
            {"app": self.app_id},
        ).fetchone()
        return keys, int(size)

    def rows(self, key: str) -> tuple[int, int]:
        """Return how many rows the key has in (entries, ephemeral_entries)."""
        return self.conn.execute(
            "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s AND key = %(key)s),"
            " (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s AND key = %(key)s)",
            {"app": self.app_id, "key": key},
        ).fetchone()

    def app_rows(self) -> int:
        """Return the app's row count in both tables, expired rows included."""
        return self.scalar(
            "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s)"
            " + (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s)",
            {"app": self.app_id},
        )

    def backdate(self, key: str) -> None:
        """Move a key's expiry one second into the past, in whichever tier stores it."""
        updated = 0
        for table in ("kvapi_data.entries", "kvapi_data.ephemeral_entries"):
            updated += self.conn.execute(
                f"UPDATE {table} SET expires_at = now() - interval '1 second' WHERE app_id = %s AND key = %s",
                [self.app_id, key],
            ).rowcount
        assert updated == 1

    def purge(self) -> None:
        """Purge every expired row of the database (other tests' apps included)."""
        while self.scalar("SELECT kvapi.kv_purge_batch(1000)") == 1000:
            pass


@pytest.fixture
def kv(shared_url: str) -> Iterator[LimitedApp]:
    app = create_app(shared_url)
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield LimitedApp(connection, app.app_id)


@contextmanager
def raises_limit(sqlstate: str) -> Iterator[pytest.ExceptionInfo]:
    with pytest.raises(psycopg.Error) as excinfo:
        yield excinfo
    assert excinfo.value.sqlstate == sqlstate


def limit_detail(excinfo: pytest.ExceptionInfo) -> dict[str, Any]:
    """Return the JSON object a limit error carries in its DETAIL."""
    return json.loads(excinfo.value.diag.message_detail)


# Writes of a new value to a key, as SQL with %(app)s, %(key)s and %(value)s
# (JSON text). Each creates the key when it is absent.
WRITES = {
    "set": "SELECT * FROM kvapi.kv_set(%(app)s, %(key)s, %(value)s::jsonb)",
    "setex": "SELECT * FROM kvapi.kv_setex(%(app)s, %(key)s, %(value)s::jsonb, '600')",
    "setnx": "SELECT kvapi.kv_setnx(%(app)s, %(key)s, %(value)s::jsonb)",
    "cas": "SELECT kvapi.kv_cas(%(app)s, %(key)s, NULL, %(value)s::jsonb)",
    "mset": "SELECT kvapi.kv_mset(%(app)s, jsonb_build_object(%(key)s::text, %(value)s::jsonb))",
}

# Writes that create a key, including incr, which creates a counter.
CREATES = {
    **WRITES,
    "incr": "SELECT kvapi.kv_incr(%(app)s, %(key)s, 10)",
}


def write(kv: LimitedApp, operation: str, key: str, value: str = '"vv"') -> None:
    kv.conn.execute(CREATES[operation], {"app": kv.app_id, "key": key, "value": value})


# value size

@pytest.mark.parametrize("operation", list(WRITES))
def test_value_size_limit_boundary(kv, operation):
    kv.use_plan(max_value_bytes=10)

    write(kv, operation, "fits", string_value(10))
    with raises_limit("KVBIG") as excinfo:
        write(kv, operation, "over", string_value(11))

    assert kv.value("fits") == string_value(10)
    assert limit_detail(excinfo) == {"limit": 10, "actual": 11}
    assert kv.value("over") is None
    assert kv.rows("over") == (0, 0)


@pytest.mark.parametrize("operation", ["set", "setex", "cas", "mset"])
def test_value_size_limit_on_overwrite(kv, operation):
    kv.use_plan(max_value_bytes=10)
    kv.set("key", string_value(4))
    overwrites = {
        "set": WRITES["set"],
        "setex": WRITES["setex"],
        "cas": "SELECT kvapi.kv_cas(%(app)s, %(key)s, '\"xx\"', %(value)s::jsonb)",
        "mset": WRITES["mset"],
    }

    with raises_limit("KVBIG") as excinfo:
        kv.conn.execute(overwrites[operation], {"app": kv.app_id, "key": "key", "value": string_value(11)})

    assert limit_detail(excinfo) == {"limit": 10, "actual": 11}
    assert kv.value("key") == string_value(4)


def test_value_size_counts_stored_text(kv):
    kv.use_plan(max_value_bytes=7)

    # jsonb stores {"a":1} as {"a": 1}, 8 bytes, and 1e3 as 1000.
    with raises_limit("KVBIG") as object_error:
        kv.set("object", '{"a":1}')
    kv.set("number", "1e3")
    with raises_limit("KVBIG") as number_error:
        kv.set("big", "1e7")

    assert limit_detail(object_error) == {"limit": 7, "actual": 8}
    assert kv.value("number") == "1000"
    assert limit_detail(number_error) == {"limit": 7, "actual": 8}


def test_value_size_counts_utf8_bytes(kv):
    kv.use_plan(max_value_bytes=6)

    kv.set("fits", '"éé"')
    with raises_limit("KVBIG") as excinfo:
        kv.set("over", '"ééx"')

    assert kv.value("fits") == '"éé"'
    assert limit_detail(excinfo) == {"limit": 6, "actual": 7}


def test_mset_oversized_value_writes_nothing(kv):
    kv.use_plan(max_value_bytes=10)
    entries = {"a": "x" * 8, "b": "x" * 9, "c": "x"}

    with raises_limit("KVBIG") as excinfo:
        kv.conn.execute("SELECT kvapi.kv_mset(%s, %s::jsonb)", [kv.app_id, json.dumps(entries)])

    assert limit_detail(excinfo) == {"limit": 10, "actual": 11}
    assert kv.app_rows() == 0


@pytest.mark.parametrize(("operation", "start", "by", "fits", "over"), [
    ("incr", 98, 1, "99", "100"),
    ("decr", -8, 1, "-9", "-10"),
])
def test_counter_growth_past_value_size(kv, operation, start, by, fits, over):
    kv.use_plan(max_value_bytes=2)
    kv.set("counter", str(start))
    step = f"SELECT kvapi.kv_{operation}(%s, 'counter', %s)"

    kv.conn.execute(step, [kv.app_id, by])
    assert kv.value("counter") == fits
    with raises_limit("KVBIG") as excinfo:
        kv.conn.execute(step, [kv.app_id, by])

    assert limit_detail(excinfo) == {"limit": 2, "actual": len(over)}
    assert kv.value("counter") == fits


# key count

@pytest.mark.parametrize("operation", list(CREATES))
def test_key_limit_boundary(kv, operation):
    kv.use_plan(max_keys=3)
    write(kv, operation, "k1")
    write(kv, operation, "k2")

    write(kv, operation, "k3")
    with raises_limit("KVKEY") as excinfo:
        write(kv, operation, "k4")

    assert limit_detail(excinfo) == {"limit": 3, "actual": 4}
    assert kv.rows("k4") == (0, 0)
    assert kv.counted()[0] == 3


def test_key_limit_counts_both_tiers(kv):
    kv.use_plan(max_keys=3)
    kv.set("d1", "1")
    kv.set("e1", "1", ephemeral=True)
    kv.set("d2", "1")

    with raises_limit("KVKEY") as ephemeral_error:
        kv.set("e2", "1", ephemeral=True)
    with raises_limit("KVKEY") as durable_error:
        kv.set("d3", "1")

    assert limit_detail(ephemeral_error) == {"limit": 3, "actual": 4}
    assert limit_detail(durable_error) == {"limit": 3, "actual": 4}
    assert kv.counted()[0] == 3


def test_mset_over_key_limit_writes_nothing(kv):
    kv.use_plan(max_keys=3)
    kv.set("a", '"old"')

    with raises_limit("KVKEY") as excinfo:
        kv.conn.execute("SELECT kvapi.kv_mset(%s, %s::jsonb)",
                        [kv.app_id, '{"a": "new", "b": 1, "c": 1, "d": 1}'])

    assert limit_detail(excinfo) == {"limit": 3, "actual": 4}
    assert kv.value("a") == '"old"'
    assert kv.app_rows() == 1
    assert kv.counted() == (1, row_size("a", '"old"'))


def test_mset_reaching_key_limit_accepted(kv):
    kv.use_plan(max_keys=3)
    kv.set("a", '"old"')

    count = kv.scalar("SELECT kvapi.kv_mset(%s, %s::jsonb)", [kv.app_id, '{"a": "new", "b": 1, "c": 1}'])

    assert count == 3
    assert kv.value("a") == '"new"'
    assert kv.counted()[0] == 3


@pytest.fixture
def full_by_keys(kv) -> LimitedApp:
    """An app at its key limit of 3: "a" durable, "b" ephemeral, "c" a durable counter."""
    kv.use_plan(max_keys=3)
    kv.set("a", '"aa"')
    kv.set("b", '"bb"', ephemeral=True)
    kv.set("c", "5")
    with raises_limit("KVKEY"):
        kv.set("new", "1")
    return kv


def test_full_app_overwrites_existing_keys(full_by_keys):
    kv = full_by_keys
    app = kv.app_id

    kv.set("a", '"a2"')
    kv.conn.execute("SELECT * FROM kvapi.kv_setex(%s, 'a', '\"a3\"', '600')", [app])
    created = kv.scalar("SELECT kvapi.kv_setnx(%s, 'b', '\"b2\"')", [app])
    swapped = kv.scalar("SELECT kvapi.kv_cas(%s, 'b', '\"bb\"', '\"b3\"')", [app])
    counter = kv.scalar("SELECT kvapi.kv_incr(%s, 'c', 2)", [app])
    count = kv.scalar("SELECT kvapi.kv_mset(%s, '{\"a\": \"a4\", \"b\": \"b4\"}')", [app])

    assert created is False
    assert swapped is True
    assert counter == 7
    assert count == 2
    assert kv.value("a") == '"a4"'
    assert kv.value("b") == '"b4"'
    assert kv.counted()[0] == 3


def test_full_app_reads_and_deletes(full_by_keys):
    kv = full_by_keys
    app = kv.app_id

    value = kv.scalar("SELECT value::text FROM kvapi.kv_get(%s, 'a', 'true')", [app])
    exists = kv.scalar("SELECT kvapi.kv_exists(%s, 'a')", [app])
    ttl = kv.scalar("SELECT ttl FROM kvapi.kv_ttl(%s, 'a')", [app])
    values = kv.scalar("SELECT kvapi.kv_mget(%s, ARRAY['a', 'b', 'c'])", [app])
    listed = kv.scalar("SELECT kvapi.kv_list(%s)", [app])
    expired = kv.scalar("SELECT kvapi.kv_expire(%s, 'a', 'null')", [app])
    deleted = kv.scalar("SELECT kvapi.kv_del(%s, 'b')", [app])

    assert value == '"aa"'
    assert exists is True
    assert ttl == 2592000
    assert values == ["aa", "bb", 5]
    assert [entry["key"] for entry in listed["keys"]] == ["a", "b", "c"]
    assert expired is True
    assert deleted is True
    assert kv.counted()[0] == 2


def test_full_app_moves_key_between_tiers(full_by_keys):
    kv = full_by_keys
    before = kv.counted()

    kv.set("a", '"aa"', ephemeral=True)
    kv.set("b", '"bb"')

    assert kv.rows("a") == (0, 1)
    assert kv.rows("b") == (1, 0)
    assert kv.counted() == before
    assert kv.recounted() == before


def test_delete_frees_a_key(full_by_keys):
    kv = full_by_keys

    kv.scalar("SELECT kvapi.kv_del(%s, 'a')", [kv.app_id])
    kv.set("new", "1")

    assert kv.value("new") == "1"
    assert kv.counted()[0] == 3


def test_cas_delete_frees_a_key(full_by_keys):
    kv = full_by_keys

    swapped = kv.scalar("SELECT kvapi.kv_cas(%s, 'b', '\"bb\"', NULL)", [kv.app_id])
    kv.set("new", "1")

    assert swapped is True
    assert kv.value("new") == "1"
    assert kv.counted()[0] == 3


@pytest.mark.parametrize("expired_key", ["a", "b"], ids=["durable", "ephemeral"])
def test_expiry_frees_a_key_before_purge(full_by_keys, expired_key):
    kv = full_by_keys

    kv.backdate(expired_key)
    kv.set("new", '"nn"')
    with raises_limit("KVKEY") as excinfo:
        kv.set("newer", "1")

    assert limit_detail(excinfo) == {"limit": 3, "actual": 4}
    assert kv.app_rows() == 4
    assert kv.counted() == kv.recounted()
    assert kv.counted()[0] == 3


def test_usage_exact_after_purge(full_by_keys):
    kv = full_by_keys
    kv.backdate("a")
    kv.backdate("b")
    kv.set("new", '"nn"')
    expected = (2, row_size("c", "5") + row_size("new", '"nn"'))
    assert kv.counted() == expected

    kv.purge()

    assert kv.app_rows() == 2
    assert kv.counted() == expected
    assert kv.recounted() == expected


def test_rewrite_of_expired_key_counts_once(full_by_keys):
    kv = full_by_keys
    kv.backdate("a")
    kv.backdate("b")

    kv.set("a", '"a2"')
    kv.set("b", '"b2"')
    kv.set("a", '"a3"', ephemeral=True)
    with raises_limit("KVKEY") as excinfo:
        kv.set("new", "1")

    assert limit_detail(excinfo) == {"limit": 3, "actual": 4}
    assert kv.counted() == (3, row_size("a", '"a3"') + row_size("b", '"b2"') + row_size("c", "5"))
    kv.purge()
    assert kv.counted() == kv.recounted()


def test_lowered_key_limit_recovers(full_by_keys):
    kv = full_by_keys
    kv.use_plan(max_keys=1)

    with raises_limit("KVKEY") as over_error:
        kv.set("new", "1")
    kv.set("a", '"a2"')
    kv.scalar("SELECT kvapi.kv_del(%s, 'a')", [kv.app_id])
    kv.scalar("SELECT kvapi.kv_del(%s, 'b')", [kv.app_id])
    with raises_limit("KVKEY") as at_limit_error:
        kv.set("new", "1")
    kv.scalar("SELECT kvapi.kv_del(%s, 'c')", [kv.app_id])
    kv.set("new", "1")

    assert limit_detail(over_error) == {"limit": 1, "actual": 4}
    assert limit_detail(at_limit_error) == {"limit": 1, "actual": 2}
    assert kv.value("new") == "1"
    assert kv.counted()[0] == 1


# total storage

@pytest.mark.parametrize("operation", list(CREATES))
def test_storage_limit_boundary(kv, operation):
    kv.use_plan(max_total_bytes=20)
    kv.set("k1", string_value(8))
    # The second key fills the limit exactly: 10 + 10 bytes.
    if operation == "incr":
        kv.set("k2", "12345678")
    else:
        write(kv, operation, "k2", string_value(8))
    assert kv.counted() == (2, 20)

    with raises_limit("KVFUL") as excinfo:
        write(kv, operation, "k3", "1")

    expected_actual = 20 + row_size("k3", "10" if operation == "incr" else "1")
    assert limit_detail(excinfo) == {"limit": 20, "actual": expected_actual}
    assert kv.rows("k3") == (0, 0)
    assert kv.counted() == (2, 20)


@pytest.mark.parametrize("operation", list(WRITES))
def test_storage_limit_filled_exactly_by_write(kv, operation):
    kv.use_plan(max_total_bytes=20)
    kv.set("k1", string_value(8))

    write(kv, operation, "k2", string_value(8))
    with raises_limit("KVFUL") as excinfo:
        kv.set("k2", string_value(9))

    assert kv.counted() == (2, 20)
    assert limit_detail(excinfo) == {"limit": 20, "actual": 21}


@pytest.mark.parametrize("operation", ["set", "setex", "cas", "mset"])
def test_storage_overwrite_larger_and_smaller(kv, operation):
    kv.use_plan(max_total_bytes=20)
    kv.set("k1", string_value(8))
    kv.set("k2", string_value(8))
    overwrite = {
        **WRITES,
        # Swap whatever value the key has now.
        "cas": "SELECT kvapi.kv_cas(%(app)s, %(key)s,"
               " (SELECT value FROM kvapi.kv_get(%(app)s, %(key)s)), %(value)s::jsonb)",
    }[operation]

    with raises_limit("KVFUL") as excinfo:
        kv.conn.execute(overwrite, {"app": kv.app_id, "key": "k1", "value": string_value(9)})
    assert kv.value("k1") == string_value(8)
    kv.conn.execute(overwrite, {"app": kv.app_id, "key": "k1", "value": string_value(4)})
    kv.conn.execute(overwrite, {"app": kv.app_id, "key": "k2", "value": string_value(12)})

    assert limit_detail(excinfo) == {"limit": 20, "actual": 21}
    assert kv.value("k1") == string_value(4)
    assert kv.value("k2") == string_value(12)
    assert kv.counted() == (2, 20)


def test_storage_counter_growth_rejected(kv):
    kv.use_plan(max_total_bytes=20)
    kv.set("k1", string_value(16))
    kv.set("c", "9")
    assert kv.counted() == (2, 20)

    with raises_limit("KVFUL") as excinfo:
        kv.scalar("SELECT kvapi.kv_incr(%s, 'c')", [kv.app_id])
    counter = kv.scalar("SELECT kvapi.kv_decr(%s, 'c', 9)", [kv.app_id])

    assert limit_detail(excinfo) == {"limit": 20, "actual": 21}
    assert counter == 0
    assert kv.counted() == (2, 20)


def test_storage_counts_both_tiers(kv):
    kv.use_plan(max_total_bytes=20)
    kv.set("d", string_value(9))
    kv.set("e", string_value(9), ephemeral=True)

    with raises_limit("KVFUL") as ephemeral_error:
        kv.set("f", "1", ephemeral=True)
    with raises_limit("KVFUL") as durable_error:
        kv.set("f", "1")
    with raises_limit("KVFUL") as growth_error:
        kv.set("e", string_value(10), ephemeral=True)

    assert limit_detail(ephemeral_error) == {"limit": 20, "actual": 22}
    assert limit_detail(durable_error) == {"limit": 20, "actual": 22}
    assert limit_detail(growth_error) == {"limit": 20, "actual": 21}


def test_storage_tier_move_keeps_bytes(kv):
    kv.use_plan(max_total_bytes=20)
    kv.set("d", string_value(9))
    kv.set("e", string_value(9), ephemeral=True)

    kv.set("d", string_value(9), ephemeral=True)
    kv.set("e", string_value(9))

    assert kv.rows("d") == (0, 1)
    assert kv.rows("e") == (1, 0)
    assert kv.counted() == (2, 20)
    assert kv.recounted() == (2, 20)


def test_storage_tier_move_larger_rejected(kv):
    kv.use_plan(max_total_bytes=20)
    kv.set("d", string_value(9))
    kv.set("e", string_value(9), ephemeral=True)

    with raises_limit("KVFUL") as excinfo:
        kv.set("d", string_value(10), ephemeral=True)

    assert limit_detail(excinfo) == {"limit": 20, "actual": 21}
    assert kv.rows("d") == (1, 0)
    assert kv.value("d") == string_value(9)


def test_mset_over_storage_writes_nothing(kv):
    kv.use_plan(max_total_bytes=20)
    kv.set("a", string_value(4))

    with raises_limit("KVFUL") as excinfo:
        kv.conn.execute("SELECT kvapi.kv_mset(%s, %s::jsonb)",
                        [kv.app_id, json.dumps({"a": "x" * 10, "b": "x" * 10})])

    # "a" grows from 5 to 13 bytes and "b" adds 13: 5 + 8 + 13.
    assert limit_detail(excinfo) == {"limit": 20, "actual": 26}
    assert kv.value("a") == string_value(4)
    assert kv.app_rows() == 1
    assert kv.counted() == (1, 5)


@pytest.fixture
def full_by_bytes(kv) -> LimitedApp:
    """An app at its storage limit of 20 bytes: "a" durable and "b" ephemeral, 10 bytes each."""
    kv.use_plan(max_total_bytes=20)
    kv.set("a", string_value(9))
    kv.set("b", string_value(9), ephemeral=True)
    with raises_limit("KVFUL"):
        kv.set("n", "1")
    return kv


def test_full_storage_reads_and_deletes(full_by_bytes):
    kv = full_by_bytes
    app = kv.app_id

    value = kv.scalar("SELECT value::text FROM kvapi.kv_get(%s, 'a', '60')", [app])
    values = kv.scalar("SELECT kvapi.kv_mget(%s, ARRAY['a', 'b'])", [app])
    ttl = kv.scalar("SELECT ttl FROM kvapi.kv_ttl(%s, 'a')", [app])
    expired = kv.scalar("SELECT kvapi.kv_expire(%s, 'b', '600')", [app])
    deleted = kv.scalar("SELECT kvapi.kv_del(%s, 'a')", [app])
    kv.set("n", string_value(8))

    assert value == string_value(9)
    assert values == ["x" * 7, "x" * 7]
    assert ttl == 60
    assert expired is True
    assert deleted is True
    assert kv.counted() == (2, 19)


@pytest.mark.parametrize("expired_key", ["a", "b"], ids=["durable", "ephemeral"])
def test_expiry_frees_storage_before_purge(full_by_bytes, expired_key):
    kv = full_by_bytes

    kv.backdate(expired_key)
    kv.set("n", string_value(9))
    with raises_limit("KVFUL") as excinfo:
        kv.set("m", "1")

    assert limit_detail(excinfo) == {"limit": 20, "actual": 22}
    assert kv.counted() == (2, 20)
    kv.purge()
    assert kv.app_rows() == 2
    assert kv.counted() == (2, 20)
    assert kv.recounted() == (2, 20)


# usage report

def test_usage_reports_exact_keys_and_bytes(kv):
    kv.use_plan(max_value_bytes=100, max_keys=10, max_total_bytes=1000)
    kv.set("ключ", '{"a":"é"}')
    kv.set("e", "[1, 2]", ephemeral=True)
    kv.set("gone", '"xxxxxxxx"')
    kv.set("forever", "true", ttl="null")
    kv.backdate("gone")

    usage = kv.usage()

    # jsonb stores {"a": "é"} (11 bytes) and [1, 2] (6 bytes).
    expected_bytes = (8 + 11) + (1 + 6) + (7 + 4)
    assert usage == {
        "keys": 3,
        "bytes": expected_bytes,
        "plan": {
            "plan_id": kv.app_id,
            "ops_per_second": None,
            "max_value_bytes": 100,
            "max_keys": 10,
            "max_total_bytes": 1000,
            "default_ttl_seconds": 2592000,
        },
    }
    assert kv.recounted() == (3, expected_bytes)


def test_usage_of_new_app_is_zero(kv):
    usage = kv.usage()

    assert usage["keys"] == 0
    assert usage["bytes"] == 0
    assert usage["plan"]["plan_id"] == "default"


def test_usage_exact_after_mixed_operations(kv):
    kv.use_plan(max_keys=100, max_total_bytes=100000)
    app = kv.app_id
    for index in range(20):
        kv.set(f"k{index}", string_value(index + 2), ephemeral=index % 3 == 0)
    kv.scalar("SELECT kvapi.kv_mset(%s, '{\"k1\": [1, 2, 3], \"m\": {\"x\": null}}', p_ephemeral => true)", [app])
    kv.scalar("SELECT kvapi.kv_incr(%s, 'counter', 123456)", [app])
    kv.scalar("SELECT kvapi.kv_cas(%s, 'k2', '\"xx\"', '\"changed\"')", [app])
    kv.scalar("SELECT kvapi.kv_cas(%s, 'k4', '\"xxxx\"', NULL)", [app])
    kv.scalar("SELECT kvapi.kv_del(%s, 'k5')", [app])
    kv.scalar("SELECT kvapi.kv_setnx(%s, 'k6', '1')", [app])
    kv.set("k7", string_value(50), ephemeral=True)
    kv.backdate("k8")
    kv.backdate("k9")
    kv.set("k9", "1")

    assert kv.counted() == kv.recounted()
    kv.purge()
    assert kv.counted() == kv.recounted()
    # 20 keys, plus m and counter, minus k4, k5 and k8.
    assert kv.counted()[0] == 19



@pytest.mark.parametrize("ephemeral", [False, True])
def test_overwrite_after_purge_inserts_row(kv, ephemeral):
    """write_entry overwrites a live key with one UPDATE. When the purge
    deleted the row between the caller's read and that UPDATE, the write
    inserts the row again and counts it as a new key."""
    kv.use_plan(max_keys=10, max_total_bytes=1000)
    kv.set("k", string_value(10), ephemeral=ephemeral)
    table = "kvapi_data.ephemeral_entries" if ephemeral else "kvapi_data.entries"
    with kv.conn.transaction():
        kv.conn.execute("SELECT kvapi_data.lock_key(%s, 'k')", [kv.app_id])
        # What the purge does to a row it finds expired: delete it and
        # take it off the usage counters.
        size = kv.scalar(f"DELETE FROM {table} WHERE app_id = %s AND key = 'k' RETURNING size_bytes", [kv.app_id])
        kv.conn.execute("SELECT kvapi_data.add_usage(%s, %s, -1, -%s)", [kv.app_id, ephemeral, size])
        # The writer still passes the size it read before the delete.
        kv.scalar(
            "SELECT kvapi_data.write_entry(%s, 'k', %s::jsonb, now() + interval '1 hour', %s, %s, %s)",
            [kv.app_id, string_value(20), ephemeral, ephemeral, size],
        )

    assert kv.value("k") == string_value(20)
    assert kv.counted() == (1, row_size("k", string_value(20)))
    assert kv.counted() == kv.recounted()


# concurrency

def run_writers(url: str, count: int, work: Callable[[psycopg.Connection, int], Any]) -> list[Any]:
    """Run work(connection, index) in `count` threads, each with its own
    connection, released together by a barrier; return results in index order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute("SET lock_timeout = '20s'")
                barrier.wait(timeout=30)
                results[index] = work(connection, index)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)

    assert [thread.name for thread in threads if thread.is_alive()] == []
    if errors:
        raise errors[0]
    return results


def test_parallel_writers_bounded_overshoot(kv, shared_url, record_property):
    max_keys = 20
    kv.use_plan(max_keys=max_keys)

    def write_until_full(connection: psycopg.Connection, index: int) -> tuple[int, list[int]]:
        """Write new keys until the limit rejects one; return (written, actual values seen)."""
        written = 0
        actuals = []
        for number in range(max_keys + WRITERS):
            try:
                connection.execute("SELECT * FROM kvapi.kv_set(%s, %s, '1')", [kv.app_id, f"w{index}:{number}"])
            except psycopg.Error as error:
                assert error.sqlstate == "KVKEY"
                actuals.append(json.loads(error.diag.message_detail)["actual"])
                break
            written += 1
        return written, actuals

    results = run_writers(shared_url, WRITERS, write_until_full)

    written = sum(result[0] for result in results)
    overshoot = written - max_keys
    record_property("key_limit_overshoot", overshoot)
    print(f"\n{WRITERS} writers, max_keys {max_keys}: {written} keys written, overshoot {overshoot}")
    assert written >= max_keys
    assert overshoot <= WRITERS - 1
    assert all(actual > max_keys for result in results for actual in result[1])
    assert kv.counted() == kv.recounted()
    with raises_limit("KVKEY"):
        kv.set("after", "1")


def test_parallel_writers_keep_usage_exact(kv, shared_url):
    kv.use_plan(max_keys=100000, max_total_bytes=100000000)
    writers_done = threading.Semaphore(0)

    def churn(connection: psycopg.Connection, index: int) -> None:
        """Create, grow, shrink, move between tiers, expire and delete keys,
        some shared between writers, while thread 0 purges and compacts the
        usage counters."""
        if index == 0:
            finished = 0
            while finished < WRITERS - 1:
                connection.execute("SELECT kvapi.kv_purge_batch(50)")
                finished += writers_done.acquire(timeout=0.01)
            return
        for number in range(24):
            own = f"own{index}:{number % 5}"
            shared = f"shared:{number % 3}"
            value = json.dumps("x" * ((index * 7 + number) % 40))
            connection.execute("SELECT * FROM kvapi.kv_set(%s, %s, %s::jsonb, p_ephemeral => %s)",
                               [kv.app_id, own, value, number % 2 == 0])
            connection.execute("SELECT * FROM kvapi.kv_set(%s, %s, %s::jsonb, p_ephemeral => %s)",
                               [kv.app_id, shared, value, (index + number) % 2 == 0])
            connection.execute("SELECT kvapi.kv_incr(%s, %s)", [kv.app_id, f"count:{number % 4}"])
            if number % 6 == 5:
                for table in ("kvapi_data.entries", "kvapi_data.ephemeral_entries"):
                    connection.execute(
                        f"UPDATE {table} SET expires_at = now() - interval '1 second' WHERE app_id = %s AND key = %s",
                        [kv.app_id, own],
                    )
            elif number % 4 == 3:
                connection.execute("SELECT kvapi.kv_del(%s, %s)", [kv.app_id, own])
        writers_done.release()

    run_writers(shared_url, WRITERS, churn)

    assert kv.counted() == kv.recounted()
    kv.purge()
    assert kv.counted() == kv.recounted()


@contextmanager
def same_shard_connections(url: str) -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
    """Open two autocommit connections whose backend PIDs are equal modulo
    32: sessions that usage counters sharded by pg_backend_pid() % 32 would
    make share a row. 33 connections always contain such a pair."""
    by_shard: dict[int, psycopg.Connection] = {}
    opened: list[psycopg.Connection] = []
    try:
        while True:
            connection = psycopg.connect(url, autocommit=True)
            opened.append(connection)
            connection.execute("SET lock_timeout = '5s'")
            shard = connection.execute("SELECT pg_backend_pid() % 32").fetchone()[0]
            if shard in by_shard:
                yield by_shard[shard], connection
                return
            by_shard[shard] = connection
    finally:
        for connection in opened:
            connection.close()


def wait_until_blocked(conn: psycopg.Connection, pid: int) -> None:
    """Poll until the backend `pid` waits on a lock (at most 10 seconds)."""
    for _ in range(1000):
        waiting = conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
        if waiting is not None and waiting[0]:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"backend {pid} never waited on a lock")


def test_writers_of_one_shard_do_not_wait(kv, shared_url):
    kv.use_plan(max_keys=100)

    with same_shard_connections(shared_url) as (first, second):
        second.execute("SET lock_timeout = '1s'")
        first.execute("BEGIN")
        first.execute("SELECT * FROM kvapi.kv_set(%s, 'x', '1')", [kv.app_id])
        try:
            second.execute("SELECT * FROM kvapi.kv_set(%s, 'y', '1')", [kv.app_id])
            error = None
        except psycopg.errors.LockNotAvailable as raised:
            error = raised
        first.execute("COMMIT")

    assert error is None
    assert kv.counted()[0] == 2


def test_writers_of_one_shard_do_not_deadlock(kv, shared_url):
    """Two transactions that write four distinct keys in both tiers."""
    kv.use_plan(max_keys=100)
    errors: list[BaseException] = []

    with same_shard_connections(shared_url) as (first, second):
        first.execute("BEGIN")
        second.execute("BEGIN")
        first.execute("SELECT * FROM kvapi.kv_set(%s, 'x', '1')", [kv.app_id])
        second.execute("SELECT * FROM kvapi.kv_set(%s, 'y', '1', p_ephemeral => true)", [kv.app_id])

        def first_writes_ephemeral() -> None:
            try:
                first.execute("SELECT * FROM kvapi.kv_set(%s, 'z', '1', p_ephemeral => true)", [kv.app_id])
                first.execute("COMMIT")
            except psycopg.Error as error:
                errors.append(error)
                first.execute("ROLLBACK")

        thread = threading.Thread(target=first_writes_ephemeral)
        thread.start()
        first_pid = first.info.backend_pid
        try:
            with psycopg.connect(shared_url, autocommit=True) as observer:
                observer.execute("SELECT 1")
                thread.join(0.5)
                if thread.is_alive():
                    wait_until_blocked(observer, first_pid)
            second.execute("SELECT * FROM kvapi.kv_set(%s, 'w', '1')", [kv.app_id])
            second.execute("COMMIT")
        except psycopg.Error as error:
            errors.append(error)
            second.execute("ROLLBACK")
        thread.join(JOIN_TIMEOUT)

    assert [type(error).__name__ for error in errors] == []
    assert kv.counted()[0] == 4
