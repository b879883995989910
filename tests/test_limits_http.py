"""Plan limits through a real `kvapi serve` process and the CLI: status
codes and error bodies at the exact boundaries, the kv-usage route, and
`kvapi plans` / `kvapi apps set-plan` / `kvapi apps usage`.

Each test works in a fresh app with a plan of its own (named after the
app) on the shared server's database. Expiry is simulated by backdating
expires_at, never by sleeping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

UNLIMITED_VALUE_BYTES = 1048576


def key_path(app_id: str, key: str) -> str:
    return f"/v1/{app_id}/kv/{quote(key, safe='')}"


def string_of_size(size: int) -> str:
    """Return a string whose JSON text is `size` bytes."""
    return "x" * (size - 2)


@pytest.fixture
def database(http_server) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the shared HTTP server's database."""
    with psycopg.connect(http_server.database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def use_plan(database, http_app):
    """Move http_app to a plan of its own with the given limits."""

    def move(*, max_value_bytes: int = UNLIMITED_VALUE_BYTES, max_keys: int | None = None,
             max_total_bytes: int | None = None) -> None:
        database.execute(
            "SELECT kvapi.plan_set(%s, %s, p_max_keys => %s, p_max_total_bytes => %s)",
            [http_app.app_id, max_value_bytes, max_keys, max_total_bytes],
        )
        database.execute("SELECT kvapi.app_set_plan(%s, %s)", [http_app.app_id, http_app.app_id])

    return move


def put(client: httpx.Client, app_id: str, key: str, value: Any, **options: Any) -> httpx.Response:
    return client.put(key_path(app_id, key), json={"value": value, **options})


def assert_limit_error(response: httpx.Response, status: int, code: str, limit: int, actual: int) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["limit"] == limit
    assert error["actual"] == actual
    assert sorted(error) == ["actual", "code", "limit", "message"]


def backdate(database: psycopg.Connection, app_id: str, key: str) -> None:
    """Move a key's expiry one second into the past, in whichever tier stores it."""
    updated = 0
    for table in ("entries", "ephemeral_entries"):
        updated += database.execute(
            f"UPDATE kvapi_data.{table} SET expires_at = now() - interval '1 second' WHERE app_id = %s AND key = %s",
            [app_id, key],
        ).rowcount
    assert updated == 1


def write_request(client: httpx.Client, app_id: str, operation: str, key: str, value: Any) -> httpx.Response:
    """Send a request that writes `value` to a key, creating the key when absent."""
    if operation == "put":
        return put(client, app_id, key, value)
    if operation == "setex":
        return client.post(key_path(app_id, key), json={"op": "setex", "value": value, "ttl": 600})
    if operation == "setnx":
        return client.post(key_path(app_id, key), json={"op": "setnx", "value": value})
    if operation == "cas":
        return client.post(key_path(app_id, key), json={"op": "cas", "expected": None, "next": value})
    if operation == "mset":
        return client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": {key: value}})
    raise ValueError(f"unknown operation {operation!r}")


WRITE_OPERATIONS = ["put", "setex", "setnx", "cas", "mset"]


# value size: 413

@pytest.mark.parametrize("operation", WRITE_OPERATIONS)
def test_value_size_limit_boundary_http(client, http_app, use_plan, operation):
    use_plan(max_value_bytes=10)
    app = http_app.app_id

    fits = write_request(client, app, operation, "fits", string_of_size(10))
    over = write_request(client, app, operation, "over", string_of_size(11))

    assert fits.status_code == 200
    assert client.get(key_path(app, "fits")).json()["value"] == string_of_size(10)
    assert_limit_error(over, 413, "KV_VALUE_TOO_LARGE", 10, 11)
    assert client.get(key_path(app, "over")).status_code == 404


def test_value_size_stored_text_http(client, http_app, use_plan):
    use_plan(max_value_bytes=7)
    app = http_app.app_id

    # PostgreSQL stores {"a":1} as {"a": 1} (8 bytes) and 1e3 as 1000.
    spaced = client.put(key_path(app, "object"), content=b'{"value": {"a":1}}', headers={"content-type": "application/json"})
    number = client.put(key_path(app, "number"), content=b'{"value": 1e3}', headers={"content-type": "application/json"})

    assert_limit_error(spaced, 413, "KV_VALUE_TOO_LARGE", 7, 8)
    assert number.status_code == 200
    assert client.get(key_path(app, "number")).text == f'{{"key":"number","value":1000,"ttl":2592000,"version":"{number.json()["version"]}"}}'


def test_counter_growth_past_size_http(client, http_app, use_plan):
    use_plan(max_value_bytes=2)
    app = http_app.app_id
    assert put(client, app, "counter", 98).status_code == 200

    fits = client.post(key_path(app, "counter"), json={"op": "incr"})
    over = client.post(key_path(app, "counter"), json={"op": "incr"})

    assert fits.json() == {"value": 99}
    assert_limit_error(over, 413, "KV_VALUE_TOO_LARGE", 2, 3)
    assert client.get(key_path(app, "counter")).json()["value"] == 99


# key count: 507 KV_KEYS_EXHAUSTED

@pytest.mark.parametrize("operation", [*WRITE_OPERATIONS, "incr"])
def test_key_limit_boundary_http(client, http_app, use_plan, operation):
    use_plan(max_keys=2)
    app = http_app.app_id
    assert put(client, app, "k1", 1).status_code == 200

    if operation == "incr":
        second = client.post(key_path(app, "k2"), json={"op": "incr"})
        third = client.post(key_path(app, "k3"), json={"op": "incr"})
    else:
        second = write_request(client, app, operation, "k2", 1)
        third = write_request(client, app, operation, "k3", 1)

    assert second.status_code == 200
    assert_limit_error(third, 507, "KV_KEYS_EXHAUSTED", 2, 3)
    assert client.get(key_path(app, "k3")).status_code == 404


def test_mset_over_key_limit_http(client, http_app, use_plan):
    use_plan(max_keys=3)
    app = http_app.app_id
    assert put(client, app, "a", "old").status_code == 200

    response = client.post(f"/v1/{app}/kv", json={"op": "mset", "entries": {"a": "new", "b": 1, "c": 1, "d": 1}})

    assert_limit_error(response, 507, "KV_KEYS_EXHAUSTED", 3, 4)
    values = client.post(f"/v1/{app}/kv", json={"op": "mget", "keys": ["a", "b", "c", "d"]}).json()
    assert values == {"values": ["old", None, None, None]}


@pytest.fixture
def full_app(client, http_app, use_plan) -> str:
    """Fill http_app to its key limit of 3 ("a" and "c" durable, "b" ephemeral) and return its id."""
    use_plan(max_keys=3)
    app = http_app.app_id
    assert put(client, app, "a", "aa").status_code == 200
    assert put(client, app, "b", "bb", ephemeral=True).status_code == 200
    assert put(client, app, "c", 5).status_code == 200
    assert put(client, app, "new", 1).status_code == 507
    return app


def test_full_app_reads_work_http(client, full_app):
    app = full_app

    got = client.get(key_path(app, "a"), params={"touch": "60"})
    head = client.head(key_path(app, "b"))
    exists = client.post(key_path(app, "c"), json={"op": "exists"})
    ttl = client.post(key_path(app, "a"), json={"op": "ttl"})
    values = client.post(f"/v1/{app}/kv", json={"op": "mget", "keys": ["a", "b", "c"]})
    listed = client.get(f"/v1/{app}/kv")

    assert got.json()["value"] == "aa"
    assert head.status_code == 200
    assert exists.json() == {"exists": True}
    assert ttl.json() == {"ttl": 60, "exists": True}
    assert values.json() == {"values": ["aa", "bb", 5]}
    assert [entry["key"] for entry in listed.json()["keys"]] == ["a", "b", "c"]


def test_full_app_overwrites_http(client, full_app):
    app = full_app

    overwrite = put(client, app, "a", "a2")
    move = put(client, app, "c", 6, ephemeral=True)
    incr = client.post(key_path(app, "c"), json={"op": "incr", "by": 4})
    cas = client.post(key_path(app, "b"), json={"op": "cas", "expected": "bb", "next": "b2"})
    setnx = client.post(key_path(app, "b"), json={"op": "setnx", "value": "b3"})
    mset = client.post(f"/v1/{app}/kv", json={"op": "mset", "entries": {"a": "a3", "b": "b4"}})
    expire = client.post(key_path(app, "a"), json={"op": "expire", "ttl": None})

    assert overwrite.status_code == 200
    assert move.status_code == 200
    assert incr.json() == {"value": 10}
    assert cas.json() == {"swapped": True}
    assert setnx.json() == {"created": False}
    assert mset.json() == {"count": 2}
    assert expire.json() == {"updated": True}
    assert client.get(f"/v1/{app}/kv-usage").json()["keys"] == 3


def test_full_app_delete_frees_a_key_http(client, full_app):
    app = full_app

    deleted = client.delete(key_path(app, "b"))
    created = put(client, app, "new", 1)
    rejected = put(client, app, "newer", 1)

    assert deleted.json() == {"deleted": True}
    assert created.status_code == 200
    assert_limit_error(rejected, 507, "KV_KEYS_EXHAUSTED", 3, 4)


def test_full_app_expiry_frees_a_key_http(client, database, full_app):
    app = full_app

    backdate(database, app, "b")
    created = put(client, app, "new", 1)
    rejected = put(client, app, "newer", 1)

    assert created.status_code == 200
    assert_limit_error(rejected, 507, "KV_KEYS_EXHAUSTED", 3, 4)


# total storage: 507 KV_STORAGE_FULL

def test_storage_limit_boundary_http(client, http_app, use_plan):
    use_plan(max_total_bytes=20)
    app = http_app.app_id

    # Each row is 2 key bytes + 8 value bytes: 20 bytes in all.
    first = put(client, app, "k1", string_of_size(8))
    second = client.post(key_path(app, "k2"), json={"op": "setnx", "value": string_of_size(8)})
    third = put(client, app, "k3", 1)
    larger = put(client, app, "k1", string_of_size(9))
    smaller = put(client, app, "k1", string_of_size(4))
    refill = client.post(key_path(app, "k2"), json={"op": "setex", "value": string_of_size(12), "ttl": 60})

    assert first.status_code == 200
    assert second.json() == {"created": True}
    assert_limit_error(third, 507, "KV_STORAGE_FULL", 20, 23)
    assert_limit_error(larger, 507, "KV_STORAGE_FULL", 20, 21)
    assert smaller.status_code == 200
    assert refill.status_code == 200
    assert client.get(key_path(app, "k1")).json()["value"] == string_of_size(4)
    usage = client.get(f"/v1/{app}/kv-usage").json()
    assert usage["keys"] == 2
    assert usage["bytes"] == 20


def test_storage_full_cas_and_mset_http(client, http_app, use_plan):
    use_plan(max_total_bytes=20)
    app = http_app.app_id
    assert put(client, app, "k1", string_of_size(8)).status_code == 200
    assert put(client, app, "k2", string_of_size(8), ephemeral=True).status_code == 200

    cas = client.post(key_path(app, "k1"), json={"op": "cas", "expected": string_of_size(8), "next": string_of_size(9)})
    entries = {"k1": "x", "k3": string_of_size(9)}
    mset = client.post(f"/v1/{app}/kv", json={"op": "mset", "entries": entries})
    unchanged = client.get(key_path(app, "k1"))
    delete = client.delete(key_path(app, "k2"))
    after_delete = client.post(f"/v1/{app}/kv", json={"op": "mset", "entries": entries})

    assert_limit_error(cas, 507, "KV_STORAGE_FULL", 20, 21)
    # k1 shrinks from 10 to 5 bytes and k3 adds 11: 20 - 5 + 11.
    assert_limit_error(mset, 507, "KV_STORAGE_FULL", 20, 26)
    assert unchanged.json()["value"] == string_of_size(8)
    assert delete.json() == {"deleted": True}
    assert after_delete.json() == {"count": 2}


# usage report

def test_usage_route_reports_exact_usage(client, database, http_app, use_plan):
    use_plan(max_value_bytes=100, max_keys=10, max_total_bytes=1000)
    app = http_app.app_id
    put(client, app, "ключ", {"a": "é"})
    put(client, app, "e", [1, 2], ephemeral=True)
    put(client, app, "gone", string_of_size(10))
    backdate(database, app, "gone")

    response = client.get(f"/v1/{app}/kv-usage")

    # Stored text: {"a": "é"} is 11 bytes and [1, 2] is 6; the key ключ is 8.
    assert response.status_code == 200
    assert response.json() == {
        "keys": 2,
        "bytes": (8 + 11) + (1 + 6),
        "plan": {
            "plan_id": app,
            "ops_per_second": None,
            "max_value_bytes": 100,
            "max_keys": 10,
            "max_total_bytes": 1000,
            "default_ttl_seconds": 2592000,
        },
    }


def test_usage_route_needs_service_key(http_server, http_app):
    response = httpx.get(f"{http_server.base_url}/v1/{http_app.app_id}/kv-usage")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "KV_UNAUTHORIZED"


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url, "KVAPI_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "kvapi", *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_plans_and_usage(client, http_server, http_app):
    app = http_app.app_id
    plan = f"{app}_cli"

    saved = run_cli(http_server.database_url, "plans", "set", plan, "--max-value-bytes", "10", "--max-keys", "2",
                    "--max-total-bytes", "none", "--default-ttl", "none")
    moved = run_cli(http_server.database_url, "apps", "set-plan", app, plan)
    first = put(client, app, "a", string_of_size(10))
    second = put(client, app, "bb", 7)
    third = put(client, app, "c", 1)
    usage = run_cli(http_server.database_url, "apps", "usage", app)
    plans = run_cli(http_server.database_url, "plans", "list")

    assert saved.returncode == 0
    assert moved.returncode == 0
    assert first.json()["ttl"] is None
    assert second.status_code == 200
    assert_limit_error(third, 507, "KV_KEYS_EXHAUSTED", 2, 3)
    assert usage.returncode == 0
    expected_plan = {
        "plan_id": plan,
        "ops_per_second": None,
        "max_value_bytes": 10,
        "max_keys": 2,
        "max_total_bytes": None,
        "default_ttl_seconds": None,
    }
    assert json.loads(usage.stdout) == {"keys": 2, "bytes": (1 + 10) + (2 + 1), "plan": expected_plan}
    assert expected_plan in json.loads(plans.stdout)


def test_cli_usage_unknown_app(http_server):
    result = run_cli(http_server.database_url, "apps", "usage", "no_such_app")

    assert result.returncode == 1
    assert result.stdout == ""
    assert "app 'no_such_app' not found" in result.stderr


def test_cli_set_plan_unknown_plan(http_server, http_app):
    result = run_cli(http_server.database_url, "apps", "set-plan", http_app.app_id, "no_such_plan")

    assert result.returncode == 1
    assert "plan 'no_such_plan' not found" in result.stderr
