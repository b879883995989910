"""The HTTP clients (kvapi.client.KV and AsyncKV) against a real `kvapi serve`."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest

import kvapi.client
from kvapi.client import (
    KV,
    UNSET,
    AsyncKV,
    Entry,
    Explanation,
    KeyInfo,
    KvAppNotFoundError,
    KvCounterOverflowError,
    KvError,
    KvExposeConflictError,
    KvForbiddenError,
    KvInvalidRequestError,
    KvNotACounterError,
    KvRateLimitedError,
    KvUnauthorizedError,
    KvUnavailableError,
    KvValueTooLargeError,
    KvVersionMismatchError,
    Page,
    SqlKV,
)
from kvapi.client._operations import Operations
from kvapi.errors import REGISTRY

DEFAULT_TTL = 30 * 86400
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def kv(http_server, http_app) -> Iterator[KV]:
    with KV(http_server.base_url, http_app.app_id, http_app.service_key) as client:
        yield client


@pytest.fixture
def db(http_server) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the shared server's database."""
    with psycopg.connect(http_server.database_url, autocommit=True) as connection:
        yield connection


def tier_of(db: psycopg.Connection, app_id: str, key: str) -> str | None:
    row = db.execute(
        "SELECT 'durable' FROM kvapi_data.entries WHERE app_id = %(app)s AND key = %(key)s "
        "UNION ALL SELECT 'ephemeral' FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s AND key = %(key)s",
        {"app": app_id, "key": key},
    ).fetchall()
    assert len(row) <= 1
    return row[0][0] if row else None


def backdate(db: psycopg.Connection, app_id: str, key: str) -> None:
    """Make a key expire one second ago, in whichever tier it lives."""
    for table in ("entries", "ephemeral_entries"):
        db.execute(
            f"UPDATE kvapi_data.{table} SET expires_at = now() - interval '1 second' WHERE app_id = %s AND key = %s",
            [app_id, key],
        )


def test_set_get_round_trip(kv):
    values = ["hello", 2**100, -(2**80), {"a": [1, {"b": None}], "c": "ünï €"}, [], True, 1.5, 0]
    for number, value in enumerate(values):
        kv.set(f"v:{number}", value)
    for number, value in enumerate(values):
        assert kv.get(f"v:{number}") == value


def test_big_integer_keeps_exact_digits(kv):
    kv.set("big", 123456789012345678901234567890123456789)
    assert kv.get("big") == 123456789012345678901234567890123456789


def test_get_missing_returns_none(kv):
    assert kv.get("missing") is None
    assert kv.get_entry("missing") is None


def test_get_entry_fields(kv):
    version = kv.set("entry", {"n": 1})
    entry = kv.get_entry("entry")
    assert entry == Entry("entry", {"n": 1}, version, DEFAULT_TTL)
    assert isinstance(version, str)


def test_versions_change_on_every_write(kv):
    first = kv.set("versioned", 1)
    second = kv.set("versioned", 1)
    assert first != second
    assert kv.get_entry("versioned").version == second


SPECIAL_KEYS = [
    "a/b", "/lead", "trail/", "a//b", ".", "..", "a/../b", "./x", "q?x=1#frag", "100%", "%2F",
    "sp ace", "plus+sign", "ключ:世界", "emoji:😀", "tab\tkey",
]


def test_special_keys_round_trip(kv, db, http_app):
    for key in SPECIAL_KEYS:
        kv.set(key, key)
    for key in SPECIAL_KEYS:
        assert kv.get(key) == key
    stored = [row[0] for row in db.execute(
        "SELECT key FROM kvapi_data.entries WHERE app_id = %s ORDER BY key", [http_app.app_id]
    )]
    assert stored == sorted(SPECIAL_KEYS, key=lambda key: key.encode("utf-8"))
    assert list(kv.list()) == stored


def test_ttl_omitted_none_and_seconds(kv):
    kv.set("t", 1)
    assert kv.ttl("t") == DEFAULT_TTL
    kv.set("t", 1, ttl=None)
    assert kv.ttl("t") is None
    assert kv.get_entry("t").ttl is None
    kv.set("t", 1, ttl=60)
    assert kv.ttl("t") == 60
    kv.set("t", 2, keep_ttl=True)
    assert kv.ttl("t") == 60
    kv.set("t", 3, ttl=UNSET)
    assert kv.ttl("t") == DEFAULT_TTL


def test_keep_ttl_with_ttl_is_invalid(kv):
    with pytest.raises(KvInvalidRequestError) as caught:
        kv.set("t", 1, ttl=5, keep_ttl=True)
    assert caught.value.status == 400
    assert caught.value.code == "KV_INVALID_REQUEST"


def test_ephemeral_moves_between_tiers(kv, db, http_app):
    kv.set("tiered", 1, ephemeral=True)
    assert tier_of(db, http_app.app_id, "tiered") == "ephemeral"
    kv.set("tiered", 2)
    assert tier_of(db, http_app.app_id, "tiered") == "durable"
    assert kv.get("tiered") == 2


def test_set_preconditions(kv):
    first = kv.set("p", 1)
    second = kv.set("p", 2, if_version=first)
    with pytest.raises(KvVersionMismatchError) as caught:
        kv.set("p", 3, if_version=first)
    assert caught.value.status == 412
    assert caught.value.code == "KV_VERSION_MISMATCH"
    assert kv.get("p") == 2
    with pytest.raises(KvVersionMismatchError):
        kv.set("p", 4, if_absent=True)
    assert kv.set("fresh", 1, if_absent=True) != second
    with pytest.raises(KvVersionMismatchError):
        kv.delete("p", if_version=first)
    assert kv.delete("p", if_version=second) is True


def test_setex_and_setnx(kv):
    kv.setex("ex", "v", 30)
    assert kv.ttl("ex") == 30
    with pytest.raises(KvInvalidRequestError):
        kv.setex("ex", "v", None)
    assert kv.setnx("ex", "other") is False
    assert kv.get("ex") == "v"
    assert kv.setnx("nx", "new", ttl=None) is True
    assert kv.ttl("nx") is None
    assert kv.get("nx") == "new"


def test_cas(kv):
    kv.set("c", {"a": 1, "b": [1, 2]}, ttl=90)
    assert kv.cas("c", {"b": [1, 2], "a": 1.0}, "swapped") is True
    assert kv.get("c") == "swapped"
    assert kv.ttl("c") == 90
    assert kv.cas("c", "stale", "lost") is False
    assert kv.get("c") == "swapped"
    assert kv.cas("c", "swapped", None) is True
    assert kv.exists("c") is False
    assert kv.cas("c", None, "created") is True
    assert kv.ttl("c") == DEFAULT_TTL
    assert kv.cas("c", None, "again") is False


def test_incr_decr(kv):
    assert kv.incr("n") == 1
    assert kv.incr("n", 10) == 11
    assert kv.decr("n") == 10
    assert kv.decr("n", by=20) == -10
    assert kv.ttl("n") == DEFAULT_TTL


def test_incr_not_a_counter(kv):
    kv.set("s", "3")
    with pytest.raises(KvNotACounterError) as caught:
        kv.incr("s")
    assert caught.value.status == 409
    assert caught.value.code == "KV_NOT_A_COUNTER"
    assert kv.get("s") == "3"


def test_incr_overflow(kv):
    kv.set("max", 2**63 - 1)
    with pytest.raises(KvCounterOverflowError) as caught:
        kv.incr("max")
    assert caught.value.code == "KV_COUNTER_OVERFLOW"
    assert kv.get("max") == 2**63 - 1


def test_concurrent_incr_loses_no_update(http_server, http_app):
    def worker() -> None:
        with KV(http_server.base_url, http_app.app_id, http_app.service_key) as client:
            for _ in range(25):
                client.incr("shared")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with KV(http_server.base_url, http_app.app_id, http_app.service_key) as client:
        assert client.get("shared") == 100


def test_exists_delete_expire_ttl(kv):
    assert kv.exists("e") is False
    assert kv.expire("e", 10) is False
    assert kv.ttl("e") is None
    kv.set("e", 1)
    assert kv.exists("e") is True
    assert kv.expire("e", 100) is True
    assert kv.ttl("e") == 100
    assert kv.expire("e", None) is True
    assert kv.ttl("e") is None
    assert kv.delete("e") is True
    assert kv.delete("e") is False
    assert kv.exists("e") is False


def test_expired_key_is_missing(kv, db, http_app):
    kv.set("old", 1, ttl=1000)
    kv.set("old:eph", 1, ttl=1000, ephemeral=True)
    backdate(db, http_app.app_id, "old")
    backdate(db, http_app.app_id, "old:eph")
    for key in ("old", "old:eph"):
        assert kv.get(key) is None
        assert kv.exists(key) is False
        assert kv.ttl(key) is None
    assert list(kv.list(prefix="old")) == []
    assert kv.setnx("old", 2) is True


def test_touch(kv):
    kv.set("touched", "v", ttl=10)
    assert kv.get("touched", touch=500) == "v"
    assert kv.ttl("touched") == 500
    assert kv.get_entry("touched", touch=True).ttl == DEFAULT_TTL
    kv.set("forever", "v", ttl=None)
    assert kv.get("forever", touch=True) == "v"
    assert kv.ttl("forever") is None


def test_mget_mset(kv, db, http_app):
    assert kv.mset({"m:1": 1, "m:2": {"x": 2**70}, "m/3": "three"}, ttl=120) == 3
    assert kv.mget(["m:1", "missing", "m:2", "m/3"]) == [1, None, {"x": 2**70}, "three"]
    assert kv.ttl("m:2") == 120
    assert kv.mset({"m:e": 1}, ephemeral=True, ttl=None) == 1
    assert tier_of(db, http_app.app_id, "m:e") == "ephemeral"
    assert kv.ttl("m:e") is None
    assert kv.mget([]) == []
    assert kv.mset({}) == 0


def test_list_follows_cursors(kv):
    keys = [f"p:{number}" for number in range(7)]
    kv.mset({key: 1 for key in keys})
    kv.mset({"other": 1, "p": 1, "q:1": 1})
    assert list(kv.list(prefix="p:", limit=2)) == keys
    assert list(kv.list(limit=1000)) == ["other", "p", *keys, "q:1"]
    page = kv.list_page(prefix="p:", limit=3)
    assert page.keys == [KeyInfo("p:0", DEFAULT_TTL), KeyInfo("p:1", DEFAULT_TTL), KeyInfo("p:2", DEFAULT_TTL)]
    assert isinstance(page.cursor, str)
    last = kv.list_page(prefix="p:", cursor=page.cursor, limit=10)
    assert last == Page([KeyInfo(key, DEFAULT_TTL) for key in keys[3:]], None)


def test_list_rejects_bad_limit(kv):
    with pytest.raises(KvInvalidRequestError):
        list(kv.list(limit=0))


def test_wrong_service_key(http_server, http_app):
    with KV(http_server.base_url, http_app.app_id, "kvs_wrong") as client:
        with pytest.raises(KvUnauthorizedError) as caught:
            client.get("k")
    assert caught.value.status == 401
    assert caught.value.code == "KV_UNAUTHORIZED"


def test_unknown_app(http_server, http_app):
    with KV(http_server.base_url, "no_such_app", http_app.service_key) as client:
        with pytest.raises(KvAppNotFoundError) as caught:
            client.set("k", 1)
    assert caught.value.status == 404
    assert caught.value.code == "KV_APP_NOT_FOUND"


def test_anonymous_request_is_forbidden(kv, http_server, http_app):
    kv.set("private", 1)
    with KV(http_server.base_url, http_app.app_id) as anonymous:
        with pytest.raises(KvForbiddenError) as caught:
            anonymous.get("private")
    assert caught.value.status == 403


def test_invalid_ttl(kv):
    with pytest.raises(KvInvalidRequestError) as caught:
        kv.set("k", 1, ttl=0)
    assert caught.value.status == 400
    assert "ttl" in caught.value.message


def test_value_too_large_carries_limit(kv, db, http_app):
    plan = f"sdk_tiny_{secrets.token_hex(4)}"
    db.execute("INSERT INTO kvapi_data.plans (plan_id, default_ttl_seconds, max_value_bytes) VALUES (%s, 2592000, 10)", [plan])
    db.execute("UPDATE kvapi_data.apps SET plan_id = %s WHERE app_id = %s", [plan, http_app.app_id])
    with pytest.raises(KvValueTooLargeError) as caught:
        kv.set("big", "x" * 20)
    assert caught.value.status == 413
    assert caught.value.limit == 10
    assert caught.value.actual == 22


def test_unreachable_server_is_unavailable(http_app):
    with KV("http://127.0.0.1:9", http_app.app_id, http_app.service_key, timeout=2) as client:
        with pytest.raises(KvUnavailableError) as caught:
            client.get("k")
    assert caught.value.code == "KV_UNAVAILABLE"


def test_error_classes_follow_registry():
    for entry in REGISTRY:
        cls = getattr(kvapi.client, entry.exception)
        assert issubclass(cls, KvError)
        assert cls.code == entry.code
        assert kvapi.client.error_class(entry.code) is cls
    assert kvapi.client.error_class("KV_INTERNAL_ERROR") is KvError


def test_sync_and_async_clients_share_signatures():
    names = [name for name, _ in inspect.getmembers(Operations, inspect.isfunction) if not name.startswith("_")]
    for name in [*names, "list", "from_env"]:
        assert inspect.signature(getattr(KV, name)).parameters == inspect.signature(getattr(AsyncKV, name)).parameters, name
    for name in names:
        assert getattr(KV, name).__doc__ == getattr(Operations, name).__doc__
        assert getattr(AsyncKV, name).__doc__ == getattr(Operations, name).__doc__


class RateLimitingProxy:
    """A loopback HTTP proxy to a kvapi server that rejects the first
    `reject` requests with 429 and Retry-After, as a rate-limited server does."""

    def __init__(self, upstream: str, reject: int, retry_after: str) -> None:
        self.upstream = upstream
        self.reject = reject
        self.retry_after = retry_after
        self.request_times: list[float] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                proxy.request_times.append(time.monotonic())
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if len(proxy.request_times) <= proxy.reject:
                    payload = json.dumps({"error": {
                        "code": "KV_RATE_LIMITED", "message": "over 1 operations per second",
                        "retry_after": int(proxy.retry_after),
                    }}).encode()
                    self.send_response(429)
                    self.send_header("Retry-After", proxy.retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {name: value for name, value in self.headers.items() if name.lower() in ("authorization", "content-type", "if-match", "if-none-match")}
                response = httpx.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                self.send_response(response.status_code)
                for name in ("Content-Type", "ETag"):
                    if name in response.headers:
                        self.send_header(name, response.headers[name])
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            do_GET = do_PUT = do_POST = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RateLimitingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_rate_limited_without_retries_raises(http_server, http_app):
    with RateLimitingProxy(http_server.base_url, reject=1, retry_after="7") as proxy:
        with KV(proxy.url, http_app.app_id, http_app.service_key) as client:
            with pytest.raises(KvRateLimitedError) as caught:
                client.set("k", 1)
    assert caught.value.status == 429
    assert caught.value.retry_after == 7
    assert len(proxy.request_times) == 1


def test_retries_honour_retry_after(http_server, http_app):
    with RateLimitingProxy(http_server.base_url, reject=2, retry_after="1") as proxy:
        with KV(proxy.url, http_app.app_id, http_app.service_key, retries=2) as client:
            assert isinstance(client.set("k", "v"), str)
    assert len(proxy.request_times) == 3
    assert proxy.request_times[1] - proxy.request_times[0] >= 1.0
    assert proxy.request_times[2] - proxy.request_times[1] >= 1.0


def test_retries_run_out(http_server, http_app):
    with RateLimitingProxy(http_server.base_url, reject=5, retry_after="0") as proxy:
        with KV(proxy.url, http_app.app_id, http_app.service_key, retries=2) as client:
            with pytest.raises(KvRateLimitedError):
                client.get("k")
    assert len(proxy.request_times) == 3


def test_async_retries(http_server, http_app):
    async def scenario() -> str:
        async with AsyncKV(proxy.url, http_app.app_id, http_app.service_key, retries=1) as client:
            await client.set("k", "v")
            return await client.get("k")

    with RateLimitingProxy(http_server.base_url, reject=1, retry_after="0") as proxy:
        assert asyncio.run(scenario()) == "v"
    assert len(proxy.request_times) == 3


def test_async_client_operations(http_server, http_app):
    async def scenario() -> dict[str, object]:
        results: dict[str, object] = {}
        async with AsyncKV(http_server.base_url, http_app.app_id, http_app.service_key) as client:
            results["version"] = await client.set("a/b", {"n": 2**64})
            results["get"] = await client.get("a/b")
            results["missing"] = await client.get("missing")
            results["incr"] = await client.incr("count", 5)
            results["cas_miss"] = await client.cas("a/b", 1, 2)
            results["setnx"] = await client.setnx("a/b", 1)
            results["mset"] = await client.mset({"l:1": 1, "l:2": 2, "l:3": 3})
            results["mget"] = await client.mget(["l:1", "l:9"])
            results["list"] = [key async for key in client.list(prefix="l:", limit=2)]
            results["ttl"] = await client.ttl("l:1")
            results["delete"] = await client.delete("l:1")
            try:
                await client.incr("a/b")
            except KvNotACounterError as error:
                results["error"] = error.code
        return results

    results = asyncio.run(scenario())
    assert isinstance(results["version"], str)
    assert results["get"] == {"n": 2**64}
    assert results["missing"] is None
    assert results["incr"] == 5
    assert results["cas_miss"] is False
    assert results["setnx"] is False
    assert results["mset"] == 3
    assert results["mget"] == [1, None]
    assert results["list"] == ["l:1", "l:2", "l:3"]
    assert results["ttl"] == DEFAULT_TTL
    assert results["delete"] is True
    assert results["error"] == "KV_NOT_A_COUNTER"


def test_from_env(http_server, http_app, monkeypatch):
    monkeypatch.setenv("KVAPI_URL", http_server.base_url)
    monkeypatch.setenv("KVAPI_APP", http_app.app_id)
    monkeypatch.setenv("KVAPI_KEY", http_app.service_key)
    with KV.from_env() as client:
        client.set("env", 1)
        assert client.get("env") == 1
    monkeypatch.delenv("KVAPI_APP")
    with pytest.raises(ValueError, match="KVAPI_APP"):
        KV.from_env()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_docs_sdk_examples_run(http_server, http_app, monkeypatch):
    """Every ```python block of docs/sdk.md runs, in order, in one namespace."""
    monkeypatch.setenv("KVAPI_URL", http_server.base_url)
    monkeypatch.setenv("KVAPI_APP", http_app.app_id)
    monkeypatch.setenv("KVAPI_KEY", http_app.service_key)
    monkeypatch.setenv("DATABASE_URL", http_server.database_url)
    blocks = python_blocks(DOCS / "sdk.md")
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "docs_sdk"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/sdk.md block {number}", "exec"), namespace)


def test_rules_expose_list_explain_unexpose(kv, http_server, http_app):
    kv.expose("public:*", "public", "deny")
    kv.expose("users:{user.id}:**", "owner", "owner")
    kv.expose("public:*", "public", "deny")
    rules = kv.list_rules()
    assert [(rule.pattern, rule.read, rule.write) for rule in rules] == [
        ("public:*", "public", "deny"),
        ("users:{user.id}:**", "owner", "owner"),
    ]
    assert rules[0].order < rules[1].order

    assert kv.explain("public:news") == Explanation("public:news", rules[0], True, False)
    assert kv.explain("users:u1:cart", user_id="u1") == Explanation("users:u1:cart", rules[1], True, True)
    assert kv.explain("users:u1:cart", user_id="u2", role="admin") == Explanation("users:u1:cart", rules[1], False, False)
    assert kv.explain("secret") == Explanation("secret", None, False, False)

    kv.set("public:news", "hello")
    with KV(http_server.base_url, http_app.app_id) as anonymous:
        assert anonymous.get("public:news") == "hello"
        with pytest.raises(KvForbiddenError):
            anonymous.set("public:news", "defaced")

    assert kv.unexpose("public:*") is True
    assert kv.unexpose("public:*") is False
    assert [rule.pattern for rule in kv.list_rules()] == ["users:{user.id}:**"]


def test_expose_conflict(kv):
    kv.expose("a:*", "public", "deny")
    with pytest.raises(KvExposeConflictError) as caught:
        kv.expose("a:*", "authed", "deny")
    assert caught.value.status == 409
    assert caught.value.code == "KV_EXPOSE_CONFLICT"


def test_expose_owner_without_placeholder_is_invalid(kv):
    with pytest.raises(KvInvalidRequestError):
        kv.expose("a:*", "owner", "deny")


def test_rules_need_service_key(http_server, http_app):
    with KV(http_server.base_url, http_app.app_id) as anonymous:
        with pytest.raises(KvUnauthorizedError):
            anonymous.list_rules()


def test_docs_sdk_lists_every_method_and_exception():
    text = (DOCS / "sdk.md").read_text()
    names = [name for name, _ in inspect.getmembers(Operations, inspect.isfunction) if not name.startswith("_")]
    for name in [*names, "list"]:
        assert f"| `{name}(" in text or f" / `{name}(" in text, name
    for entry in REGISTRY:
        assert f"| `{entry.exception}` | {entry.code} | {entry.http_status} |" in text, entry.exception


def test_sql_client_has_every_method():
    names = [name for name, _ in inspect.getmembers(Operations, inspect.isfunction) if not name.startswith("_")]
    for name in [*names, "list"]:
        assert inspect.signature(getattr(SqlKV, name)).parameters == inspect.signature(getattr(KV, name)).parameters, name


def move_to_plan(db: psycopg.Connection, app_id: str, ops_per_second: int) -> None:
    plan = f"sdk_rate_{secrets.token_hex(4)}"
    db.execute(
        "INSERT INTO kvapi_data.plans (plan_id, default_ttl_seconds, max_value_bytes, ops_per_second) VALUES (%s, 2592000, 1048576, %s)",
        [plan, ops_per_second],
    )
    db.execute("UPDATE kvapi_data.apps SET plan_id = %s WHERE app_id = %s", [plan, app_id])


def test_server_rate_limit_raises_with_retry_after(kv, db, http_app):
    move_to_plan(db, http_app.app_id, 3)
    with pytest.raises(KvRateLimitedError) as caught:
        for number in range(20):
            kv.set(f"r:{number}", number)
    assert caught.value.status == 429
    assert caught.value.code == "KV_RATE_LIMITED"
    assert caught.value.limit == 3
    assert caught.value.retry_after >= 1


def test_retries_absorb_server_rate_limit(http_server, db, http_app):
    move_to_plan(db, http_app.app_id, 4)
    with KV(http_server.base_url, http_app.app_id, http_app.service_key, retries=5) as client:
        for _ in range(8):
            client.incr("paced")
        assert client.get("paced") == 8
