"""The key-value functions of schema kvapi, called with psycopg as a database
user would call them.

The tests of this module share one database and each works in an app of its
own, because cloning the template database for every test costs about half
a second per test (measured on 2 cores). Arguments are sent as JSON text and
values are read back as value::text, so the tests see exactly the digits
PostgreSQL stores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import create_app, create_database, drop_database

DEFAULT_TTL = 2592000
MAX_TTL = 2147483647
MAX_BIGINT = 2**63 - 1
MIN_BIGINT = -(2**63)
UNKNOWN_APP = "no_such_app"

# 256 four-byte characters: 1024 UTF-8 bytes in 256 characters.
KEY_1024_BYTES = "\U0001F600" * 256
KEY_1025_BYTES = "a" + "\U0001F600" * 256


@pytest.fixture(scope="module")
def shared_url(pg_server, template_url) -> Iterator[str]:
    name = f"kvapi_sql_operations_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@dataclass
class Kv:
    """One app of the shared database and an autocommit connection to it."""

    conn: psycopg.Connection
    app_id: str

    def one(self, sql: str, params: Any = ()) -> tuple:
        return self.conn.execute(sql, params).fetchone()

    def scalar(self, sql: str, params: Any = ()) -> Any:
        return self.one(sql, params)[0]

    def set(self, key: str, value: str, ttl: str | None = None, *, keep_ttl: bool = False,
            ephemeral: bool = False, if_match: list[str] | None = None,
            if_absent: bool = False) -> tuple[str, int | None]:
        """Call kv_set with JSON text arguments. A ttl of None omits the TTL."""
        return self.one(
            "SELECT version, ttl FROM kvapi.kv_set(%s, %s, %s::jsonb, p_ttl => %s::jsonb,"
            " p_keep_ttl => %s, p_ephemeral => %s, p_if_match => %s::text[], p_if_absent => %s)",
            [self.app_id, key, value, ttl, keep_ttl, ephemeral, if_match, if_absent],
        )

    def get(self, key: str, touch: str | None = None) -> tuple[str | None, str | None, int | None]:
        """Return (value as JSON text, version, ttl) from kv_get."""
        return self.one(
            "SELECT value::text, version, ttl FROM kvapi.kv_get(%s, %s, %s::jsonb)",
            [self.app_id, key, touch],
        )

    def value(self, key: str) -> str | None:
        return self.get(key)[0]

    def version(self, key: str) -> str | None:
        return self.get(key)[1]

    def ttl(self, key: str) -> tuple[int | None, bool]:
        return self.one("SELECT ttl, \"exists\" FROM kvapi.kv_ttl(%s, %s)", [self.app_id, key])

    def exists(self, key: str) -> bool:
        return self.scalar("SELECT kvapi.kv_exists(%s, %s)", [self.app_id, key])

    def incr(self, key: str, by: int = 1) -> int:
        return self.scalar("SELECT kvapi.kv_incr(%s, %s, %s)", [self.app_id, key, by])

    def decr(self, key: str, by: int = 1) -> int:
        return self.scalar("SELECT kvapi.kv_decr(%s, %s, %s)", [self.app_id, key, by])

    def cas(self, key: str, expected: str | None, next_value: str | None, ttl: str | None = None) -> bool:
        return self.scalar(
            "SELECT kvapi.kv_cas(%s, %s, %s::jsonb, %s::jsonb, %s::jsonb)",
            [self.app_id, key, expected, next_value, ttl],
        )

    def list(self, prefix: str | None = "", cursor: str | None = None, limit: int | None = 100) -> dict:
        return self.scalar("SELECT kvapi.kv_list(%s, %s, %s, %s)", [self.app_id, prefix, cursor, limit])

    def listed_keys(self, prefix: str = "") -> list[str]:
        return [entry["key"] for entry in self.list(prefix, limit=1000)["keys"]]

    def rows(self, key: str) -> tuple[int, int]:
        """Return how many rows the key has in (entries, ephemeral_entries)."""
        return self.one(
            "SELECT (SELECT count(*) FROM kvapi_data.entries WHERE app_id = %(app)s AND key = %(key)s),"
            " (SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s AND key = %(key)s)",
            {"app": self.app_id, "key": key},
        )

    def expires_at(self, key: str) -> Any:
        return self.scalar(
            "SELECT expires_at FROM kvapi_data.entries WHERE app_id = %(app)s AND key = %(key)s"
            " UNION ALL"
            " SELECT expires_at FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s AND key = %(key)s",
            {"app": self.app_id, "key": key},
        )


    def use_plan(self, default_ttl_seconds: int | None, max_value_bytes: int = 1048576) -> None:
        """Move the app to a plan of its own with these limits."""
        self.conn.execute(
            "INSERT INTO kvapi_data.plans (plan_id, default_ttl_seconds, max_value_bytes) VALUES (%s, %s, %s)",
            [self.app_id, default_ttl_seconds, max_value_bytes],
        )
        self.conn.execute("UPDATE kvapi_data.apps SET plan_id = %s WHERE app_id = %s", [self.app_id, self.app_id])


@pytest.fixture
def kv(shared_url: str) -> Iterator[Kv]:
    app = create_app(shared_url)
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield Kv(connection, app.app_id)


@contextmanager
def raises_sqlstate(sqlstate: str) -> Iterator[pytest.ExceptionInfo]:
    with pytest.raises(psycopg.Error) as excinfo:
        yield excinfo
    assert excinfo.value.sqlstate == sqlstate


# Every operation that takes one key, as SQL with %(app)s and %(key)s.
KEY_OPERATIONS = {
    "get": "SELECT * FROM kvapi.kv_get(%(app)s, %(key)s)",
    "get_touch": "SELECT * FROM kvapi.kv_get(%(app)s, %(key)s, 'true')",
    "set": "SELECT * FROM kvapi.kv_set(%(app)s, %(key)s, '1')",
    "setex": "SELECT * FROM kvapi.kv_setex(%(app)s, %(key)s, '1', '60')",
    "setnx": "SELECT kvapi.kv_setnx(%(app)s, %(key)s, '1')",
    "cas": "SELECT kvapi.kv_cas(%(app)s, %(key)s, NULL, '1')",
    "incr": "SELECT kvapi.kv_incr(%(app)s, %(key)s)",
    "decr": "SELECT kvapi.kv_decr(%(app)s, %(key)s)",
    "exists": "SELECT kvapi.kv_exists(%(app)s, %(key)s)",
    "del": "SELECT kvapi.kv_del(%(app)s, %(key)s)",
    "expire": "SELECT kvapi.kv_expire(%(app)s, %(key)s, '60')",
    "ttl": "SELECT * FROM kvapi.kv_ttl(%(app)s, %(key)s)",
    "mget": "SELECT kvapi.kv_mget(%(app)s, ARRAY[%(key)s::text])",
    "mset": "SELECT kvapi.kv_mset(%(app)s, jsonb_build_object(%(key)s::text, 1))",
}

# More calls, each of which checks the app on another code path than KEY_OPERATIONS.
APP_OPERATIONS = {
    **KEY_OPERATIONS,
    "get_touch_seconds": "SELECT * FROM kvapi.kv_get(%(app)s, %(key)s, '60')",
    "set_if_match": "SELECT * FROM kvapi.kv_set(%(app)s, %(key)s, '1', p_if_match => ARRAY['1'])",
    "set_if_absent": "SELECT * FROM kvapi.kv_set(%(app)s, %(key)s, '1', p_if_absent => true)",
    "set_ephemeral": "SELECT * FROM kvapi.kv_set(%(app)s, %(key)s, '1', p_ephemeral => true)",
    "del_if_match": "SELECT kvapi.kv_del(%(app)s, %(key)s, ARRAY['1'])",
    "cas_delete": "SELECT kvapi.kv_cas(%(app)s, %(key)s, '1', NULL)",
    "expire_null": "SELECT kvapi.kv_expire(%(app)s, %(key)s, 'null')",
    "mget_no_keys": "SELECT kvapi.kv_mget(%(app)s, ARRAY[]::text[])",
    "mset_no_entries": "SELECT kvapi.kv_mset(%(app)s, '{}')",
    "list": "SELECT kvapi.kv_list(%(app)s)",
    "list_prefix_cursor": "SELECT kvapi.kv_list(%(app)s, 'a', 'YQ', 10)",
}


# get

def test_get_missing_key_returns_nulls(kv):
    assert kv.get("missing") == (None, None, None)


def test_get_returns_value_version_ttl(kv):
    version, ttl = kv.set("k", '{"a": [1, "x"]}', "60")

    value, read_version, read_ttl = kv.one(
        "SELECT value, version, ttl FROM kvapi.kv_get(%s, %s)", [kv.app_id, "k"]
    )

    assert ttl == 60
    assert value == {"a": [1, "x"]}
    assert read_version == version
    assert read_ttl == 60


def test_get_touch_true_resets_default_ttl(kv):
    kv.set("k", '"v"', "60")

    value, _, ttl = kv.get("k", touch="true")

    assert value == '"v"'
    assert ttl == DEFAULT_TTL
    assert kv.ttl("k") == (DEFAULT_TTL, True)


def test_get_touch_seconds_resets_ttl(kv):
    kv.set("k", '"v"', "60")

    _, _, ttl = kv.get("k", touch="300")

    assert ttl == 300
    assert kv.ttl("k") == (300, True)


def test_get_touch_keeps_key_without_expiry(kv):
    kv.set("k", '"v"', "null")

    assert kv.get("k", touch="true") == ('"v"', kv.version("k"), None)
    assert kv.get("k", touch="300")[2] is None
    assert kv.ttl("k") == (None, True)
    assert kv.expires_at("k") is None


def test_get_touch_missing_key_creates_nothing(kv):
    assert kv.get("missing", touch="true") == (None, None, None)
    assert kv.get("missing", touch="60") == (None, None, None)
    assert kv.exists("missing") is False
    assert kv.rows("missing") == (0, 0)


def test_get_touch_keeps_version_and_tier(kv):
    version, _ = kv.set("k", "1", "60", ephemeral=True)

    kv.get("k", touch="true")
    kv.get("k", touch="120")

    assert kv.version("k") == version
    assert kv.rows("k") == (0, 1)


@pytest.mark.parametrize("touch", ["false", "null", "0", "-1", "1.5", '"10"', "2147483648"])
def test_get_touch_invalid_rejected(kv, touch):
    kv.set("k", "1", "60")
    expires_at = kv.expires_at("k")

    with raises_sqlstate("KVINV"):
        kv.get("k", touch=touch)

    assert kv.expires_at("k") == expires_at


# set

def test_set_without_ttl_gives_default_not_old_ttl(kv):
    kv.set("k", "1", "60")

    version, ttl = kv.set("k", "2")

    assert ttl == DEFAULT_TTL
    assert kv.get("k") == ("2", version, DEFAULT_TTL)


def test_set_ttl_null_never_expires(kv):
    kv.set("k", "1", "60")

    _, ttl = kv.set("k", "2", "null")

    assert ttl is None
    assert kv.expires_at("k") is None
    assert kv.ttl("k") == (None, True)


def test_set_ttl_seconds(kv):
    _, ttl = kv.set("k", "1", "45")

    assert ttl == 45
    assert kv.ttl("k") == (45, True)


def test_set_keep_ttl_keeps_expiry(kv):
    kv.set("k", "1", "60")
    expires_at = kv.expires_at("k")

    kv.set("k", "2", keep_ttl=True)

    assert kv.value("k") == "2"
    assert kv.expires_at("k") == expires_at


def test_set_keep_ttl_keeps_no_expiry(kv):
    kv.set("k", "1", "null")

    _, ttl = kv.set("k", "2", keep_ttl=True)

    assert ttl is None
    assert kv.expires_at("k") is None


def test_set_keep_ttl_new_key_gets_default(kv):
    _, ttl = kv.set("k", "1", keep_ttl=True)

    assert ttl == DEFAULT_TTL
    assert kv.ttl("k") == (DEFAULT_TTL, True)


@pytest.mark.parametrize("ttl", ["60", "null"])
def test_set_keep_ttl_with_ttl_rejected(kv, ttl):
    kv.set("k", "1", "30")
    version = kv.version("k")

    with raises_sqlstate("KVINV"):
        kv.set("k", "2", ttl, keep_ttl=True)
    with raises_sqlstate("KVINV"):
        kv.set("new", "2", ttl, keep_ttl=True)

    assert kv.get("k")[:2] == ("1", version)
    assert kv.exists("new") is False


def test_set_if_match_current_version_writes(kv):
    version, _ = kv.set("k", "1")

    new_version, _ = kv.set("k", "2", if_match=[version])

    assert new_version != version
    assert kv.get("k")[:2] == ("2", new_version)


def test_set_if_match_any_listed_version_writes(kv):
    version, _ = kv.set("k", "1")

    kv.set("k", "2", if_match=["999999999", version])

    assert kv.value("k") == "2"


def test_set_if_match_stale_version_rejected(kv):
    stale, _ = kv.set("k", "1")
    current, _ = kv.set("k", "2")

    with raises_sqlstate("KVVER"):
        kv.set("k", "3", if_match=[stale])

    assert kv.get("k")[:2] == ("2", current)


def test_set_if_match_star_needs_existing_key(kv):
    with raises_sqlstate("KVVER"):
        kv.set("k", "1", if_match=["*"])
    assert kv.exists("k") is False

    kv.set("k", "1")
    kv.set("k", "2", if_match=["*"])
    assert kv.value("k") == "2"


def test_set_if_match_missing_key_rejected(kv):
    version, _ = kv.set("k", "1")
    kv.conn.execute("SELECT kvapi.kv_del(%s, %s)", [kv.app_id, "k"])

    with raises_sqlstate("KVVER"):
        kv.set("k", "2", if_match=[version])

    assert kv.exists("k") is False


def test_set_if_absent_creates_only(kv):
    version, _ = kv.set("k", "1", if_absent=True)
    assert kv.get("k")[:2] == ("1", version)

    with raises_sqlstate("KVVER"):
        kv.set("k", "2", if_absent=True)

    assert kv.get("k")[:2] == ("1", version)


def test_set_if_match_with_if_absent_rejected(kv):
    version, _ = kv.set("k", "1")

    with raises_sqlstate("KVINV"):
        kv.set("k", "2", if_match=[version], if_absent=True)

    assert kv.value("k") == "1"


def test_del_if_match(kv):
    stale, _ = kv.set("k", "1")
    current, _ = kv.set("k", "2")

    with raises_sqlstate("KVVER"):
        kv.scalar("SELECT kvapi.kv_del(%s, %s, %s::text[])", [kv.app_id, "k", [stale]])
    assert kv.value("k") == "2"

    assert kv.scalar("SELECT kvapi.kv_del(%s, %s, %s::text[])", [kv.app_id, "k", [current]]) is True
    assert kv.exists("k") is False

    with raises_sqlstate("KVVER"):
        kv.scalar("SELECT kvapi.kv_del(%s, %s, %s::text[])", [kv.app_id, "k", ["*"]])


# setex and setnx

def test_setex_sets_ttl(kv):
    version, ttl = kv.one("SELECT version, ttl FROM kvapi.kv_setex(%s, %s, '\"v\"', '90')", [kv.app_id, "k"])

    assert ttl == 90
    assert kv.get("k") == ('"v"', version, 90)
    assert kv.rows("k") == (1, 0)


def test_setex_ephemeral(kv):
    kv.one("SELECT * FROM kvapi.kv_setex(%s, %s, '1', '90', true)", [kv.app_id, "k"])

    assert kv.rows("k") == (0, 1)


@pytest.mark.parametrize("ttl", [None, "null"])
def test_setex_requires_ttl(kv, ttl):
    with raises_sqlstate("KVINV"):
        kv.one("SELECT * FROM kvapi.kv_setex(%s, %s, '1', %s::jsonb)", [kv.app_id, "k", ttl])

    assert kv.exists("k") is False


def test_setnx_creates_absent_key_with_default_ttl(kv):
    created = kv.scalar("SELECT kvapi.kv_setnx(%s, %s, '\"first\"')", [kv.app_id, "k"])

    assert created is True
    assert kv.value("k") == '"first"'
    assert kv.ttl("k") == (DEFAULT_TTL, True)
    assert kv.rows("k") == (1, 0)


def test_setnx_existing_key_changes_nothing(kv):
    version, _ = kv.set("k", '"first"', "60")
    expires_at = kv.expires_at("k")

    created = kv.scalar("SELECT kvapi.kv_setnx(%s, %s, '\"second\"', 'null', true)", [kv.app_id, "k"])

    assert created is False
    assert kv.get("k")[:2] == ('"first"', version)
    assert kv.expires_at("k") == expires_at
    assert kv.rows("k") == (1, 0)


def test_setnx_ttl_and_tier(kv):
    kv.scalar("SELECT kvapi.kv_setnx(%s, %s, '1', '30', true)", [kv.app_id, "short"])
    kv.scalar("SELECT kvapi.kv_setnx(%s, %s, '1', 'null')", [kv.app_id, "forever"])

    assert kv.ttl("short") == (30, True)
    assert kv.rows("short") == (0, 1)
    assert kv.ttl("forever") == (None, True)


# cas

def test_cas_ignores_object_key_order(kv):
    kv.set("k", '{"a": 1, "b": [1, 2], "c": {"x": true, "y": null}}')

    swapped = kv.cas("k", '{"c": {"y": null, "x": true}, "b": [1, 2], "a": 1}', '"next"')

    assert swapped is True
    assert kv.value("k") == '"next"'


@pytest.mark.parametrize(
    ("stored", "expected"),
    [("1", "1.0"), ("1.0", "1"), ('{"n": 1.0}', '{"n": 1}'), ("[10, 2.50]", "[10.0, 2.5]")],
)
def test_cas_compares_numbers_by_value(kv, stored, expected):
    kv.set("k", stored)

    assert kv.cas("k", expected, '"next"') is True
    assert kv.value("k") == '"next"'


@pytest.mark.parametrize("expected", ['"1"', "2", "true", "[1]", '{"a": 1, "b": 2}'])
def test_cas_mismatch_changes_nothing(kv, expected):
    version, _ = kv.set("k", '{"a": 1}', "60")
    expires_at = kv.expires_at("k")

    assert kv.cas("k", expected, '"next"') is False
    assert kv.get("k")[:2] == ('{"a": 1}', version)
    assert kv.expires_at("k") == expires_at


def test_cas_missing_key_with_expected_value_fails(kv):
    assert kv.cas("k", "1", "2") is False
    assert kv.exists("k") is False


@pytest.mark.parametrize("expected", [None, "null"])
def test_cas_expected_null_creates_absent_key(kv, expected):
    swapped = kv.cas("k", expected, '"created"')

    assert swapped is True
    assert kv.value("k") == '"created"'
    assert kv.ttl("k") == (DEFAULT_TTL, True)
    assert kv.rows("k") == (1, 0)


def test_cas_expected_null_fails_on_existing_key(kv):
    version, _ = kv.set("k", "1")

    assert kv.cas("k", None, "2") is False
    assert kv.cas("k", "null", "2") is False
    assert kv.get("k")[:2] == ("1", version)


@pytest.mark.parametrize("next_value", [None, "null"])
def test_cas_next_null_deletes_on_match(kv, next_value):
    kv.set("k", '"old"')

    assert kv.cas("k", '"old"', next_value) is True
    assert kv.exists("k") is False
    assert kv.rows("k") == (0, 0)


def test_cas_next_null_keeps_key_on_mismatch(kv):
    kv.set("k", '"old"')

    assert kv.cas("k", '"other"', None) is False
    assert kv.value("k") == '"old"'


def test_cas_keeps_ttl_and_tier(kv):
    kv.set("k", "1", "60", ephemeral=True)
    expires_at = kv.expires_at("k")

    assert kv.cas("k", "1", "2") is True

    assert kv.value("k") == "2"
    assert kv.expires_at("k") == expires_at
    assert kv.rows("k") == (0, 1)


def test_cas_keeps_no_expiry(kv):
    kv.set("k", "1", "null")

    assert kv.cas("k", "1", "2") is True
    assert kv.ttl("k") == (None, True)


def test_cas_given_ttl_replaces_expiry(kv):
    kv.set("k", "1", "60")

    assert kv.cas("k", "1", "2", ttl="120") is True
    assert kv.ttl("k") == (120, True)

    assert kv.cas("k", "2", "3", ttl="null") is True
    assert kv.ttl("k") == (None, True)


def test_cas_create_with_ttl(kv):
    assert kv.cas("k", None, "1", ttl="15") is True
    assert kv.ttl("k") == (15, True)


# incr and decr

def test_incr_missing_key_starts_at_zero(kv):
    assert kv.incr("k") == 1
    assert kv.value("k") == "1"
    assert kv.ttl("k") == (DEFAULT_TTL, True)
    assert kv.rows("k") == (1, 0)


def test_incr_by_amounts(kv):
    assert kv.incr("k", 5) == 5
    assert kv.incr("k", -7) == -2
    assert kv.incr("k", 0) == -2
    assert kv.scalar("SELECT kvapi.kv_incr(%s, %s)", [kv.app_id, "k"]) == -1
    assert kv.value("k") == "-1"


def test_decr_missing_key_starts_at_zero(kv):
    assert kv.decr("k") == -1
    assert kv.decr("k", 3) == -4
    assert kv.decr("k", -10) == 6
    assert kv.value("k") == "6"
    assert kv.ttl("k") == (DEFAULT_TTL, True)


def test_incr_keeps_ttl_and_tier(kv):
    kv.set("k", "41", "60", ephemeral=True)
    expires_at = kv.expires_at("k")

    assert kv.incr("k") == 42
    assert kv.decr("k", 2) == 40

    assert kv.expires_at("k") == expires_at
    assert kv.rows("k") == (0, 1)


def test_incr_keeps_no_expiry(kv):
    kv.set("k", "1", "null")

    assert kv.incr("k") == 2
    assert kv.ttl("k") == (None, True)


def test_incr_null_by_rejected(kv):
    kv.set("k", "1")

    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_incr(%s, %s, NULL)", [kv.app_id, "k"])

    assert kv.value("k") == "1"


@pytest.mark.parametrize("stored", ["2.5", '"3"', "true", "1.0", "1.50", "[1]", '{"n": 1}'])
def test_incr_not_a_counter_changes_nothing(kv, stored):
    version, _ = kv.set("k", stored, "60")
    stored_text = kv.value("k")
    expires_at = kv.expires_at("k")

    with raises_sqlstate("KVNAC"):
        kv.incr("k")
    with raises_sqlstate("KVNAC"):
        kv.decr("k")

    assert kv.get("k")[:2] == (stored_text, version)
    assert kv.expires_at("k") == expires_at


def test_incr_to_max_bigint(kv):
    kv.set("k", str(MAX_BIGINT - 1))

    assert kv.incr("k") == MAX_BIGINT
    assert kv.value("k") == str(MAX_BIGINT)


def test_decr_to_min_bigint(kv):
    kv.set("k", str(MIN_BIGINT + 1))

    assert kv.decr("k") == MIN_BIGINT
    assert kv.value("k") == str(MIN_BIGINT)


@pytest.mark.parametrize(
    ("stored", "operation", "by"),
    [
        (str(MAX_BIGINT), "incr", 1),
        (str(MAX_BIGINT), "decr", -1),
        ("1", "incr", MAX_BIGINT),
        (str(MIN_BIGINT), "decr", 1),
        (str(MIN_BIGINT), "incr", -1),
        ("-2", "decr", MAX_BIGINT),
        ("0", "decr", MIN_BIGINT),
        (str(2**64), "incr", 1),
        (str(2**64), "decr", 2**62),
    ],
)
def test_counter_overflow_changes_nothing(kv, stored, operation, by):
    version, _ = kv.set("k", stored)

    with raises_sqlstate("KVOVF"):
        kv.scalar(f"SELECT kvapi.kv_{operation}(%s, %s, %s)", [kv.app_id, "k", by])

    assert kv.get("k")[:2] == (stored, version)


def test_counter_overflow_on_missing_key_creates_nothing(kv):
    with raises_sqlstate("KVOVF"):
        kv.decr("k", MIN_BIGINT)

    assert kv.exists("k") is False


def test_decr_by_min_bigint_within_range(kv):
    # -1 - (-2^63) = 2^63 - 1, which fits a signed 64-bit integer.
    kv.set("k", "-1")

    assert kv.decr("k", MIN_BIGINT) == MAX_BIGINT
    assert kv.value("k") == str(MAX_BIGINT)


# exists and del

def test_exists(kv):
    kv.set("k", "1")

    assert kv.exists("k") is True
    assert kv.exists("K") is False
    assert kv.exists("missing") is False


def test_del_existing_and_missing_key(kv):
    kv.set("k", "1", ephemeral=True)

    assert kv.scalar("SELECT kvapi.kv_del(%s, %s)", [kv.app_id, "k"]) is True
    assert kv.scalar("SELECT kvapi.kv_del(%s, %s)", [kv.app_id, "k"]) is False
    assert kv.get("k") == (None, None, None)
    assert kv.rows("k") == (0, 0)


# expire and ttl

def test_expire_sets_ttl(kv):
    kv.set("k", "1", "null")

    assert kv.scalar("SELECT kvapi.kv_expire(%s, %s, '75')", [kv.app_id, "k"]) is True
    assert kv.ttl("k") == (75, True)
    assert kv.value("k") == "1"


def test_expire_null_removes_expiry(kv):
    kv.set("k", "1", "60")

    assert kv.scalar("SELECT kvapi.kv_expire(%s, %s, 'null')", [kv.app_id, "k"]) is True
    assert kv.ttl("k") == (None, True)
    assert kv.expires_at("k") is None


def test_expire_missing_key_returns_false(kv):
    assert kv.scalar("SELECT kvapi.kv_expire(%s, %s, '60')", [kv.app_id, "k"]) is False
    assert kv.scalar("SELECT kvapi.kv_expire(%s, %s, 'null')", [kv.app_id, "k"]) is False
    assert kv.exists("k") is False


def test_expire_without_ttl_rejected(kv):
    kv.set("k", "1", "60")
    expires_at = kv.expires_at("k")

    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_expire(%s, %s, NULL)", [kv.app_id, "k"])

    assert kv.expires_at("k") == expires_at


def test_expire_keeps_tier(kv):
    kv.set("k", "1", "60", ephemeral=True)

    kv.scalar("SELECT kvapi.kv_expire(%s, %s, '600')", [kv.app_id, "k"])

    assert kv.rows("k") == (0, 1)


def test_ttl_missing_key_and_key_without_expiry(kv):
    kv.set("forever", "1", "null")

    assert kv.ttl("missing") == (None, False)
    assert kv.ttl("forever") == (None, True)


@pytest.mark.parametrize(("remaining", "reported"), [("10.9 seconds", 11), ("0.9 seconds", 1)])
def test_ttl_rounds_up(kv, remaining, reported):
    kv.set("k", "1", "60")
    kv.conn.execute(
        "UPDATE kvapi_data.entries SET expires_at = statement_timestamp() + %s::interval"
        " WHERE app_id = %s AND key = %s",
        [remaining, kv.app_id, "k"],
    )

    assert kv.ttl("k") == (reported, True)
    assert kv.get("k")[2] == reported


# mget

def test_mget_keeps_order_with_nulls(kv):
    kv.set("a", '"A"')
    kv.set("b", '{"b": 2}', ephemeral=True)

    values = kv.scalar("SELECT kvapi.kv_mget(%s, %s)", [kv.app_id, ["b", "missing", "a", "b"]])

    assert values == [{"b": 2}, None, "A", {"b": 2}]


def test_mget_no_keys(kv):
    assert kv.scalar("SELECT kvapi.kv_mget(%s, %s::text[])", [kv.app_id, []]) == []


def test_mget_1000_keys_accepted(kv):
    kv.set("k500", "500")
    keys = [f"k{i}" for i in range(1000)]

    values = kv.scalar("SELECT kvapi.kv_mget(%s, %s)", [kv.app_id, keys])

    assert len(values) == 1000
    assert values[500] == 500
    assert values.count(None) == 999


def test_mget_1001_keys_rejected(kv):
    keys = [f"k{i}" for i in range(1001)]

    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_mget(%s, %s)", [kv.app_id, keys])


@pytest.mark.parametrize("bad_key", ["", KEY_1025_BYTES, None], ids=["empty", "1025_bytes", "null"])
def test_mget_invalid_key_rejected(kv, bad_key):
    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_mget(%s, %s)", [kv.app_id, ["a", bad_key]])


# mset

def test_mset_writes_all_and_returns_count(kv):
    count = kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb({"a": 1, "b": "x", "c": [True]})])

    assert count == 3
    assert kv.value("a") == "1"
    assert kv.value("b") == '"x"'
    assert kv.value("c") == "[true]"
    assert kv.ttl("a") == (DEFAULT_TTL, True)
    assert kv.rows("b") == (1, 0)


def test_mset_ttl_and_tier(kv):
    kv.scalar("SELECT kvapi.kv_mset(%s, %s, '20', true)", [kv.app_id, Jsonb({"a": 1, "b": 2})])
    kv.scalar("SELECT kvapi.kv_mset(%s, %s, 'null')", [kv.app_id, Jsonb({"c": 3})])

    assert kv.ttl("a") == (20, True)
    assert kv.rows("b") == (0, 1)
    assert kv.ttl("c") == (None, True)


def test_mset_no_entries(kv):
    assert kv.scalar("SELECT kvapi.kv_mset(%s, '{}')", [kv.app_id]) == 0


@pytest.mark.parametrize("entries", ["[]", '"a"', "null", None])
def test_mset_entries_not_object_rejected(kv, entries):
    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_mset(%s, %s::jsonb)", [kv.app_id, entries])


@pytest.mark.parametrize(
    "bad_entry",
    [{"bad": None}, {"": 1}, {KEY_1025_BYTES: 1}],
    ids=["null_value", "empty_key", "key_1025_bytes"],
)
def test_mset_is_all_or_nothing(kv, bad_entry):
    old_version, _ = kv.set("existing", '"old"')
    entries = {"a": 1, "existing": "new", "zzz": 3, **bad_entry}

    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb(entries)])

    assert kv.exists("a") is False
    assert kv.exists("zzz") is False
    assert kv.get("existing")[:2] == ('"old"', old_version)


def test_mset_1000_entries_accepted(kv):
    entries = {f"k{i:04}": i for i in range(1000)}

    assert kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb(entries)]) == 1000
    assert kv.value("k0999") == "999"


def test_mset_1001_entries_rejected(kv):
    entries = {f"k{i:04}": i for i in range(1001)}

    with raises_sqlstate("KVINV"):
        kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb(entries)])

    assert kv.exists("k0000") is False


def test_mset_moves_tier(kv):
    kv.set("a", "1", ephemeral=True)

    kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb({"a": 2})])

    assert kv.rows("a") == (1, 0)


# list

def test_list_prefix_in_key_order(kv):
    for key in ["user:2", "user:10", "user", "usera", "user:1", "b", "user;"]:
        kv.set(key, "1")

    assert kv.listed_keys("user:") == ["user:1", "user:10", "user:2"]
    assert kv.listed_keys("user") == ["user", "user:1", "user:10", "user:2", "user;", "usera"]
    assert kv.listed_keys() == ["b", "user", "user:1", "user:10", "user:2", "user;", "usera"]
    assert kv.listed_keys("nothing") == []


def test_list_null_prefix_lists_all(kv):
    kv.set("a", "1")

    assert kv.list(None)["keys"] == [{"key": "a", "ttl": DEFAULT_TTL, "ephemeral": False}]


def test_list_reports_ttls(kv):
    kv.set("a", "1", "50")
    kv.set("b", "1", "null", ephemeral=True)

    assert kv.list() == {"keys": [{"key": "a", "ttl": 50, "ephemeral": False}, {"key": "b", "ttl": None, "ephemeral": True}], "cursor": None}


def test_list_utf8_byte_order(kv):
    # U+FF01 sorts before U+1F600 in UTF-8 and code point order, but after it
    # in UTF-16 order (a surrogate pair starts with 0xD83D).
    keys = ["a", "B", "\u00e9", "z", "\U0001F600", "\uFF01", "\u00e9a", "e\u0301", "\U0010FFFF", "~"]
    for key in keys:
        kv.set(key, "1")

    expected = sorted(keys, key=lambda key: key.encode())
    assert kv.listed_keys() == expected
    assert expected.index("\uFF01") < expected.index("\U0001F600")


def test_list_pages_over_both_tiers(kv):
    keys = [f"k{i}" for i in range(7)]
    for number, key in enumerate(keys):
        kv.set(key, "1", ephemeral=number % 2 == 0)
    kv.set("other", "1")

    pages = []
    cursor = None
    while True:
        page = kv.list("k", cursor, 3)
        pages.append([entry["key"] for entry in page["keys"]])
        cursor = page["cursor"]
        if cursor is None:
            break

    assert pages == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]


def test_list_full_last_page_has_no_cursor(kv):
    for key in ["a", "b", "c", "d"]:
        kv.set(key, "1", ephemeral=key in ("b", "d"))

    first = kv.list("", None, 2)
    second = kv.list("", first["cursor"], 2)

    assert [entry["key"] for entry in first["keys"]] == ["a", "b"]
    assert first["cursor"] is not None
    assert [entry["key"] for entry in second["keys"]] == ["c", "d"]
    assert second["cursor"] is None


def test_list_default_limit_is_100(kv):
    kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb({f"k{i:03}": i for i in range(101)})])

    page = kv.scalar("SELECT kvapi.kv_list(%s)", [kv.app_id])

    assert len(page["keys"]) == 100
    assert page["keys"][-1]["key"] == "k099"
    assert page["cursor"] is not None


def test_list_limit_bounds(kv):
    kv.scalar("SELECT kvapi.kv_mset(%s, %s, 'null')", [kv.app_id, Jsonb({f"k{i:04}": i for i in range(1000)})])
    kv.set("k1000", "1", "null")

    assert kv.list("", None, 1)["keys"] == [{"key": "k0000", "ttl": None, "ephemeral": False}]
    page = kv.list("", None, 1000)
    assert len(page["keys"]) == 1000
    assert page["keys"][-1] == {"key": "k0999", "ttl": None, "ephemeral": False}
    assert page["cursor"] is not None
    assert kv.list("", page["cursor"], 1000) == {"keys": [{"key": "k1000", "ttl": None, "ephemeral": False}], "cursor": None}


@pytest.mark.parametrize("limit", [0, -1, 1001, None])
def test_list_invalid_limit_rejected(kv, limit):
    with raises_sqlstate("KVINV"):
        kv.list("", None, limit)


def test_list_prefix_ending_in_max_code_point(kv):
    top = "\U0010FFFF"
    inside = [f"a{top}", f"a{top}z", f"a{top}{top}", f"a{top}\U0001F600"]
    for key in [*inside, "a", "az", "b", top, f"{top}a", f"{top}{top}"]:
        kv.set(key, "1")

    assert kv.listed_keys(f"a{top}") == sorted(inside, key=lambda key: key.encode())
    assert kv.listed_keys(top) == [top, f"{top}a", f"{top}{top}"]
    assert kv.listed_keys(f"{top}{top}") == [f"{top}{top}"]


def test_list_prefix_before_surrogate_range(kv):
    # U+D7FF is followed by U+E000 in UTF-8, because surrogates have no encoding.
    for key in ["x\uD7FF", "x\uD7FFa", "x\uD7FF\U0010FFFF", "x\uE000", "x\uD7FE"]:
        kv.set(key, "1")

    assert kv.listed_keys("x\uD7FF") == ["x\uD7FF", "x\uD7FFa", "x\uD7FF\U0010FFFF"]


def test_list_prefix_is_literal(kv):
    for key in ["a%b", "a%c", "axb", "a_b", "aab", "a\\b", "a:b", "a:", "a;"]:
        kv.set(key, "1")

    assert kv.listed_keys("a%") == ["a%b", "a%c"]
    assert kv.listed_keys("a_") == ["a_b"]
    assert kv.listed_keys("a\\") == ["a\\b"]
    assert kv.listed_keys("a:") == ["a:", "a:b"]


def test_list_cursor_continues_after_key(kv):
    for key in ["p:a", "p:b", "p:c"]:
        kv.set(key, "1")

    first = kv.list("p:", None, 1)
    kv.scalar("SELECT kvapi.kv_del(%s, %s)", [kv.app_id, "p:a"])
    kv.set("p:aa", "1")
    second = kv.list("p:", first["cursor"], 10)

    assert [entry["key"] for entry in second["keys"]] == ["p:aa", "p:b", "p:c"]


@pytest.mark.parametrize("cursor", ["!!!", "A", "_w", "AA", "wyg"], ids=["symbol", "length", "byte_ff", "nul", "truncated_utf8"])
def test_list_invalid_cursor_rejected(kv, cursor):
    kv.set("a", "1")

    with raises_sqlstate("KVINV"):
        kv.list("", cursor, 10)


# keys

def test_key_of_1024_bytes_accepted(kv):
    mixed = "\u20ac" * 341 + "a"
    assert len(KEY_1024_BYTES.encode()) == 1024
    assert len(mixed.encode()) == 1024

    kv.set(KEY_1024_BYTES, '"four"')
    kv.set(mixed, '"three"')

    assert kv.value(KEY_1024_BYTES) == '"four"'
    assert kv.value(mixed) == '"three"'
    assert kv.listed_keys() == [mixed, KEY_1024_BYTES]


@pytest.mark.parametrize("operation", KEY_OPERATIONS)
def test_key_of_1025_bytes_rejected(kv, operation):
    assert len(KEY_1025_BYTES.encode()) == 1025

    with raises_sqlstate("KVINV"):
        kv.one(KEY_OPERATIONS[operation], {"app": kv.app_id, "key": KEY_1025_BYTES})
    with raises_sqlstate("KVINV"):
        kv.one(KEY_OPERATIONS[operation], {"app": kv.app_id, "key": "\u20ac" * 342})

    assert kv.listed_keys() == []


@pytest.mark.parametrize("operation", KEY_OPERATIONS)
def test_empty_key_rejected(kv, operation):
    with raises_sqlstate("KVINV"):
        kv.one(KEY_OPERATIONS[operation], {"app": kv.app_id, "key": ""})

    assert kv.listed_keys() == []


def test_key_too_long_message_names_length(kv):
    with raises_sqlstate("KVINV") as excinfo:
        kv.set(KEY_1025_BYTES, "1")

    assert "1025" in excinfo.value.diag.message_primary


def test_special_character_keys_kept_exactly(kv):
    keys = ["a/b", "/lead", "trail/", "a//b", "%2F", "100%", "?q=1", "#frag", "with space", " ",
            "..", ".", "a/../b", "\U0001F600", "tab\there", "K", "k"]
    for number, key in enumerate(keys):
        kv.set(key, str(number))

    for number, key in enumerate(keys):
        assert kv.value(key) == str(number), key
    assert kv.listed_keys() == sorted(keys, key=lambda key: key.encode())


def test_nfc_and_nfd_are_different_keys(kv):
    nfc = "caf\u00e9"
    nfd = "cafe\u0301"
    kv.set(nfc, '"nfc"')
    kv.set(nfd, '"nfd"', ephemeral=True)

    assert kv.value(nfc) == '"nfc"'
    assert kv.value(nfd) == '"nfd"'
    assert kv.listed_keys("caf") == [nfd, nfc]
    assert kv.scalar("SELECT kvapi.kv_del(%s, %s)", [kv.app_id, nfd]) is True
    assert kv.value(nfc) == '"nfc"'


# values

@pytest.mark.parametrize(
    "number",
    [str(2**53 + 1), str(2**64 + 1), str(-(2**64) - 1), "123456789012345678901234567890123456789"],
)
def test_big_integers_round_trip(kv, number):
    kv.set("scalar", number)
    kv.set("nested", f'{{"n": {number}, "list": [{number}]}}')
    kv.scalar("SELECT kvapi.kv_mset(%s, %s::jsonb)", [kv.app_id, f'{{"m": {number}}}'])

    assert kv.value("scalar") == number
    assert kv.value("nested") == f'{{"n": {number}, "list": [{number}]}}'
    assert kv.value("m") == number
    assert kv.scalar("SELECT kvapi.kv_mget(%s, %s)::text", [kv.app_id, ["scalar"]]) == f"[{number}]"


@pytest.mark.parametrize("number", ["1.10", "2.500", "100.0", "-1.000", "0.1000000000000000055511151231257827"])
def test_numbers_keep_their_digits(kv, number):
    kv.set("k", number)

    assert kv.value("k") == number
    assert kv.cas("k", number, f"[{number}]") is True
    assert kv.value("k") == f"[{number}]"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM kvapi.kv_set(%(app)s, 'k', %(value)s::jsonb)",
        "SELECT * FROM kvapi.kv_setex(%(app)s, 'k', %(value)s::jsonb, '60')",
        "SELECT kvapi.kv_setnx(%(app)s, 'k', %(value)s::jsonb)",
        "SELECT kvapi.kv_mset(%(app)s, jsonb_build_object('k', %(value)s::jsonb))",
    ],
    ids=["set", "setex", "setnx", "mset"],
)
@pytest.mark.parametrize("value", ["null", None])
def test_null_value_rejected(kv, sql, value):
    with raises_sqlstate("KVINV"):
        kv.one(sql, {"app": kv.app_id, "value": value})

    assert kv.exists("k") is False


@pytest.mark.parametrize("text", ['"a\\u0000b"', '{"x": "\\u0000"}', '"\\ud800"', '"\\udc00x"'])
def test_unstorable_strings_rejected(kv, text):
    with pytest.raises(psycopg.Error) as excinfo:
        kv.set("k", text)

    assert excinfo.value.sqlstate[:2] == "22"
    assert kv.exists("k") is False


def test_nul_in_python_string_rejected(kv):
    with pytest.raises(psycopg.Error) as excinfo:
        kv.scalar("SELECT kvapi.kv_mset(%s, %s)", [kv.app_id, Jsonb({"k": "a\x00b"})])

    assert excinfo.value.sqlstate[:2] == "22"
    assert kv.exists("k") is False


def test_value_size_limit(kv):
    kv.use_plan(DEFAULT_TTL, max_value_bytes=100)
    largest = '"' + "a" * 98 + '"'
    too_large = '"' + "a" * 99 + '"'

    kv.set("k", largest)
    assert kv.value("k") == largest

    with raises_sqlstate("KVBIG"):
        kv.set("k", too_large)
    with raises_sqlstate("KVBIG"):
        kv.scalar("SELECT kvapi.kv_setnx(%s, 'new', %s::jsonb)", [kv.app_id, too_large])
    with raises_sqlstate("KVBIG"):
        kv.cas("k", largest, too_large)
    with raises_sqlstate("KVBIG"):
        kv.scalar("SELECT kvapi.kv_mset(%s, jsonb_build_object('a', 1, 'b', %s::jsonb))", [kv.app_id, too_large])

    assert kv.value("k") == largest
    assert kv.listed_keys() == ["k"]


def test_value_size_counts_stored_text(kv):
    # jsonb stores 1e100 as 1 followed by 100 zeros: 101 bytes, over the limit.
    kv.use_plan(DEFAULT_TTL, max_value_bytes=100)

    with raises_sqlstate("KVBIG") as excinfo:
        kv.set("k", "1e100")

    assert kv.exists("k") is False
    assert "101" in excinfo.value.diag.message_primary


def test_duplicate_object_keys_last_wins(kv):
    kv.set("k", '{"a": 1, "a": 2}')

    assert kv.value("k") == '{"a": 2}'


# TTL arguments

INVALID_TTLS = ["0", "-1", "1.5", "1.0", '"10"', "true", "false", "2147483648", "[60]", '{"ttl": 60}']

# TTL-taking writes, as SQL with %(app)s, %(key)s and %(ttl)s.
TTL_WRITES = {
    "set": "SELECT ttl FROM kvapi.kv_set(%(app)s, %(key)s, '1', p_ttl => %(ttl)s::jsonb)",
    "setex": "SELECT ttl FROM kvapi.kv_setex(%(app)s, %(key)s, '1', %(ttl)s::jsonb)",
    "setnx": "SELECT kvapi.kv_setnx(%(app)s, %(key)s, '1', %(ttl)s::jsonb)",
    "cas": "SELECT kvapi.kv_cas(%(app)s, %(key)s, NULL, '1', %(ttl)s::jsonb)",
    "mset": "SELECT kvapi.kv_mset(%(app)s, jsonb_build_object(%(key)s::text, 1), %(ttl)s::jsonb)",
}


@pytest.mark.parametrize("operation", TTL_WRITES)
def test_invalid_ttl_rejected(kv, operation):
    for ttl in INVALID_TTLS:
        with raises_sqlstate("KVINV"):
            kv.one(TTL_WRITES[operation], {"app": kv.app_id, "key": "k", "ttl": ttl})
        assert kv.exists("k") is False, ttl


@pytest.mark.parametrize("operation", TTL_WRITES)
def test_max_ttl_accepted(kv, operation):
    kv.one(TTL_WRITES[operation], {"app": kv.app_id, "key": "k", "ttl": str(MAX_TTL)})

    assert kv.ttl("k") == (MAX_TTL, True)


def test_expire_invalid_ttl_rejected(kv):
    kv.set("k", "1", "60")
    expires_at = kv.expires_at("k")

    for ttl in INVALID_TTLS:
        with raises_sqlstate("KVINV"):
            kv.scalar("SELECT kvapi.kv_expire(%s, %s, %s::jsonb)", [kv.app_id, "k", ttl])
        assert kv.expires_at("k") == expires_at, ttl

    assert kv.scalar("SELECT kvapi.kv_expire(%s, %s, %s::jsonb)", [kv.app_id, "k", str(MAX_TTL)]) is True
    assert kv.ttl("k") == (MAX_TTL, True)


def test_invalid_ttl_message_names_value(kv):
    with raises_sqlstate("KVINV") as excinfo:
        kv.set("k", "1", "2147483648")

    assert "2147483648" in excinfo.value.diag.message_primary


def test_default_ttl_follows_plan(kv):
    kv.use_plan(90)

    kv.set("set", "1")
    kv.set("keep", "1", keep_ttl=True)
    kv.scalar("SELECT kvapi.kv_setnx(%s, 'setnx', '1')", [kv.app_id])
    kv.cas("cas", None, "1")
    kv.incr("incr")
    kv.scalar("SELECT kvapi.kv_mset(%s, '{\"mset\": 1}')", [kv.app_id])
    kv.set("touched", "1", "5")
    kv.get("touched", touch="true")

    for key in ["set", "keep", "setnx", "cas", "incr", "mset", "touched"]:
        assert kv.ttl(key) == (90, True), key


def test_plan_change_applies_to_next_write(kv):
    kv.use_plan(90)
    kv.set("before", "1")

    kv.conn.execute("UPDATE kvapi_data.plans SET default_ttl_seconds = NULL WHERE plan_id = %s", [kv.app_id])
    kv.set("after", "1")
    kv.get("before", touch="true")

    assert kv.ttl("after") == (None, True)
    assert kv.ttl("before") == (None, True)


# versions

def test_every_write_gives_new_version(kv):
    app = kv.app_id
    versions = [kv.set("k", "1")[0]]
    versions.append(kv.one("SELECT version FROM kvapi.kv_setex(%s, 'k', '2', '60')", [app])[0])
    kv.incr("k")
    versions.append(kv.version("k"))
    kv.decr("k")
    versions.append(kv.version("k"))
    kv.scalar("SELECT kvapi.kv_expire(%s, 'k', '120')", [app])
    versions.append(kv.version("k"))
    kv.scalar("SELECT kvapi.kv_expire(%s, 'k', 'null')", [app])
    versions.append(kv.version("k"))
    kv.cas("k", "2", "5")
    versions.append(kv.version("k"))
    kv.scalar("SELECT kvapi.kv_mset(%s, '{\"k\": 6}')", [app])
    versions.append(kv.version("k"))
    versions.append(kv.set("k", "7", if_match=[versions[-1]])[0])
    versions.append(kv.set("k", "8", keep_ttl=True, ephemeral=True)[0])

    kv.scalar("SELECT kvapi.kv_del(%s, 'k')", [app])
    kv.scalar("SELECT kvapi.kv_setnx(%s, 'k', '1')", [app])
    versions.append(kv.version("k"))
    kv.cas("k", "1", None)
    kv.cas("k", None, "1")
    versions.append(kv.version("k"))
    kv.scalar("SELECT kvapi.kv_del(%s, 'k')", [app])
    kv.incr("k")
    versions.append(kv.version("k"))

    assert None not in versions
    assert len(set(versions)) == len(versions)


def test_set_returns_version_that_get_reports(kv):
    version, _ = kv.set("k", "1")

    assert kv.version("k") == version


def test_version_new_after_delete_and_recreate(kv):
    first, _ = kv.set("k", '"same"')
    kv.scalar("SELECT kvapi.kv_del(%s, 'k')", [kv.app_id])

    second, _ = kv.set("k", '"same"')

    assert second != first


def test_operations_without_write_keep_version(kv):
    version, _ = kv.set("k", '"text"', "60")

    kv.get("k", touch="true")
    kv.get("k", touch="30")
    kv.scalar("SELECT kvapi.kv_setnx(%s, 'k', '1')", [kv.app_id])
    kv.cas("k", '"other"', "1")
    kv.scalar("SELECT kvapi.kv_exists(%s, 'k')", [kv.app_id])
    kv.scalar("SELECT kvapi.kv_mget(%s, ARRAY['k'])", [kv.app_id])
    with raises_sqlstate("KVNAC"):
        kv.incr("k")
    with raises_sqlstate("KVVER"):
        kv.set("k", "1", if_absent=True)

    assert kv.version("k") == version


# tiers

def test_set_moves_key_between_tiers(kv):
    kv.set("k", "1", ephemeral=True)
    assert kv.rows("k") == (0, 1)

    kv.set("k", "2")
    assert kv.rows("k") == (1, 0)
    assert kv.value("k") == "2"

    kv.set("k", "3", ephemeral=True)
    assert kv.rows("k") == (0, 1)
    assert kv.value("k") == "3"


def test_setex_moves_key_between_tiers(kv):
    kv.set("k", "1", ephemeral=True)

    kv.one("SELECT * FROM kvapi.kv_setex(%s, 'k', '2', '60')", [kv.app_id])

    assert kv.rows("k") == (1, 0)


def test_set_keep_ttl_moves_tier_and_keeps_expiry(kv):
    kv.set("k", "1", "60", ephemeral=True)
    expires_at = kv.expires_at("k")

    kv.set("k", "2", keep_ttl=True)

    assert kv.rows("k") == (1, 0)
    assert kv.expires_at("k") == expires_at


def test_incr_and_cas_keep_ephemeral_tier(kv):
    kv.set("k", "1", ephemeral=True)

    kv.incr("k")
    kv.decr("k", 5)
    kv.cas("k", "-3", "10")
    kv.get("k", touch="true")

    assert kv.rows("k") == (0, 1)
    assert kv.value("k") == "10"


def test_cas_and_incr_keep_durable_tier(kv):
    kv.set("k", "1")

    kv.incr("k")
    kv.cas("k", "2", "3")

    assert kv.rows("k") == (1, 0)


# apps

@pytest.mark.parametrize("operation", APP_OPERATIONS)
def test_unknown_app_rejected(kv, operation):
    with raises_sqlstate("KVAPP"):
        kv.one(APP_OPERATIONS[operation], {"app": UNKNOWN_APP, "key": "k"})


def test_unknown_app_message_names_app(kv):
    with raises_sqlstate("KVAPP") as excinfo:
        kv.one("SELECT * FROM kvapi.kv_get(%s, 'k')", [UNKNOWN_APP])

    assert UNKNOWN_APP in excinfo.value.diag.message_primary


def test_apps_do_not_share_keys(kv, shared_url):
    other = create_app(shared_url).app_id
    kv.set("k", '"mine"')

    assert kv.one("SELECT value FROM kvapi.kv_get(%s, 'k')", [other]) == (None,)
    assert kv.scalar("SELECT kvapi.kv_exists(%s, 'k')", [other]) is False
    assert kv.scalar("SELECT kvapi.kv_list(%s)", [other]) == {"keys": [], "cursor": None}
    assert kv.scalar("SELECT kvapi.kv_del(%s, 'k')", [other]) is False
    assert kv.value("k") == '"mine"'
