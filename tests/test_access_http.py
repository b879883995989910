"""Access rules over HTTP: end users with HS256 tokens signed with the app's
secret, anonymous requests and service keys against a real `kvapi serve`.

Every key operation is checked as an end user and as an anonymous request,
on keys that rules open for reading, writing, both or neither. A denied
request is a 403 whether or not the key exists, and it changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import psycopg
import pytest

SEED_TTL = 1000
UNKNOWN_APP = "no_such_app_for_access"


@dataclass
class RulesApp:
    """A fresh app on the shared server, with a client that sends no
    credentials unless a request passes them."""

    app_id: str
    service_key: str
    secret: str
    http: httpx.Client

    @property
    def service(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.service_key}"}

    def user(self, user_id: str, role: str | None = None) -> dict[str, str]:
        """Return the headers of an end user with a valid HS256 token."""
        claims: dict[str, Any] = {"sub": user_id, "exp": int(time.time()) + 600}
        if role is not None:
            claims["role"] = role
        return {"Authorization": f"Bearer {jwt.encode(claims, self.secret, algorithm='HS256')}"}

    def key_url(self, key: str) -> str:
        return f"/v1/{self.app_id}/kv/{quote(key, safe='')}"

    def expose(self, pattern: str, read: str, write: str) -> None:
        response = self.http.put(f"/v1/{self.app_id}/kv-rules", json={"pattern": pattern, "read": read, "write": write},
                                 headers=self.service)
        assert response.status_code == 200

    def seed(self, key: str, value: Any = 1) -> str:
        """Write key with the service key and return its ETag."""
        response = self.http.put(self.key_url(key), json={"value": value, "ttl": SEED_TTL}, headers=self.service)
        assert response.status_code == 200
        return response.headers["etag"]

    def stored(self, key: str) -> httpx.Response:
        """Read key with the service key."""
        return self.http.get(self.key_url(key), headers=self.service)

    def rules(self) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/{self.app_id}/kv-rules", headers=self.service)
        assert response.status_code == 200
        return response.json()["rules"]


def jwt_secret(database_url: str, app_id: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as connection:
        row = connection.execute("SELECT jwt_secret FROM kvapi_data.apps WHERE app_id = %s", [app_id]).fetchone()
    return row[0]


@pytest.fixture
def rules_app(http_server, http_app) -> Iterator[RulesApp]:
    with httpx.Client(base_url=http_server.base_url, timeout=30) as http:
        yield RulesApp(http_app.app_id, http_app.service_key, jwt_secret(http_server.database_url, http_app.app_id), http)


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# The scenarios of the access rules, end to end.

def test_owner_profile_read_write(rules_app):
    rules_app.expose("profile:{user.id}", "owner", "owner")
    alice = rules_app.user("alice")
    bob = rules_app.user("bob")
    url = rules_app.key_url("profile:alice")

    put = rules_app.http.put(url, json={"value": {"name": "Alice"}}, headers=alice)
    assert put.status_code == 200
    got = rules_app.http.get(url, headers=alice)
    assert got.status_code == 200
    assert got.json()["value"] == {"name": "Alice"}

    other_get = rules_app.http.get(url, headers=bob)
    assert other_get.status_code == 403
    assert error_code(other_get) == "KV_FORBIDDEN"
    other_put = rules_app.http.put(url, json={"value": {"name": "Mallory"}}, headers=bob)
    assert other_put.status_code == 403
    assert error_code(other_put) == "KV_FORBIDDEN"
    assert rules_app.stored("profile:alice").json()["value"] == {"name": "Alice"}

    own_bob = rules_app.http.put(rules_app.key_url("profile:bob"), json={"value": 1}, headers=bob)
    assert own_bob.status_code == 200


def test_flags_authed_read_deny_write(rules_app):
    rules_app.expose("flags:**", "authed", "deny")
    rules_app.seed("flags:beta", True)
    url = rules_app.key_url("flags:beta")
    user = rules_app.user("alice")

    anonymous = rules_app.http.get(url)
    assert anonymous.status_code == 403
    assert error_code(anonymous) == "KV_FORBIDDEN"
    read = rules_app.http.get(url, headers=user)
    assert read.status_code == 200
    assert read.json()["value"] is True
    write = rules_app.http.put(url, json={"value": False}, headers=user)
    assert write.status_code == 403
    assert error_code(write) == "KV_FORBIDDEN"
    assert rules_app.stored("flags:beta").json()["value"] is True


def test_public_anonymous_read(rules_app):
    rules_app.expose("public:**", "public", "deny")
    rules_app.seed("public:motd", "hello")
    response = rules_app.http.get(rules_app.key_url("public:motd"))
    assert response.status_code == 200
    assert response.json()["value"] == "hello"
    missing = rules_app.http.get(rules_app.key_url("public:missing"))
    assert missing.status_code == 404
    assert error_code(missing) == "KV_NOT_FOUND"


def test_hits_counter_service_incr(rules_app):
    rules_app.expose("hits:home", "public", "deny")
    url = rules_app.key_url("hits:home")

    first = rules_app.http.post(url, json={"op": "incr"}, headers=rules_app.service)
    assert first.status_code == 200
    assert first.json() == {"value": 1}
    second = rules_app.http.post(url, json={"op": "incr"}, headers=rules_app.service)
    assert second.json() == {"value": 2}

    anonymous_read = rules_app.http.get(url)
    assert anonymous_read.status_code == 200
    assert anonymous_read.json()["value"] == 2
    anonymous_incr = rules_app.http.post(url, json={"op": "incr"})
    assert anonymous_incr.status_code == 403
    assert error_code(anonymous_incr) == "KV_FORBIDDEN"
    assert rules_app.stored("hits:home").json()["value"] == 2


def test_role_claim_reaches_role_rule(rules_app):
    rules_app.expose("staff:{user.role}:**", "public", "public")
    rules_app.seed("staff:admin:note", "x")
    url = rules_app.key_url("staff:admin:note")
    assert rules_app.http.get(url, headers=rules_app.user("alice", "admin")).status_code == 200
    assert rules_app.http.get(url, headers=rules_app.user("alice", "editor")).status_code == 403
    assert rules_app.http.get(url, headers=rules_app.user("alice")).status_code == 403
    assert rules_app.http.get(url).status_code == 403


# Every key operation with the access it needs: "read", "write", or both
# for a get with touch, which changes the expiry. KEY in a body stands for
# the key of the request. Allowed on a key that holds the integer 1, every
# operation returns 200.
KEY = "{KEY}"
OPERATIONS = [
    ("get", {"read"}, "GET", "key", None),
    ("get_touch", {"read", "write"}, "GET", "touch", None),
    ("head", {"read"}, "HEAD", "key", None),
    ("exists", {"read"}, "POST", "key", {"op": "exists"}),
    ("ttl", {"read"}, "POST", "key", {"op": "ttl"}),
    ("mget", {"read"}, "POST", "batch", {"op": "mget", "keys": [KEY]}),
    ("set", {"write"}, "PUT", "key", {"value": 1}),
    ("setex", {"write"}, "POST", "key", {"op": "setex", "value": 1, "ttl": 100}),
    ("setnx", {"write"}, "POST", "key", {"op": "setnx", "value": 1}),
    ("cas", {"write"}, "POST", "key", {"op": "cas", "expected": 1, "next": 1}),
    ("incr", {"write"}, "POST", "key", {"op": "incr"}),
    ("decr", {"write"}, "POST", "key", {"op": "decr"}),
    ("expire", {"write"}, "POST", "key", {"op": "expire", "ttl": 100}),
    ("del", {"write"}, "DELETE", "key", None),
    ("mset", {"write"}, "POST", "batch", {"op": "mset", "entries": {KEY: 1}}),
]

# Key prefixes of the guarded-operation tests and the access their rule
# grants to anonymous requests and to a signed-in user. "closed:" has no
# rule at all.
PREFIX_RULES = {
    "both:": ("public", "public"),
    "read:": ("public", "deny"),
    "write:": ("deny", "public"),
    "users:": ("authed", "authed"),
    "denied:": ("deny", "deny"),
}
PREFIX_GRANTS = {
    "anonymous": {"both:": {"read", "write"}, "read:": {"read"}, "write:": {"write"}, "users:": set(),
                  "denied:": set(), "closed:": set()},
    "user": {"both:": {"read", "write"}, "read:": {"read"}, "write:": {"write"}, "users:": {"read", "write"},
             "denied:": set(), "closed:": set()},
}


def fill(body: Any, key: str) -> Any:
    """Return body with every KEY placeholder, as a value or a dict key, replaced by key."""
    if isinstance(body, dict):
        return {fill(name, key): fill(value, key) for name, value in body.items()}
    if isinstance(body, list):
        return [fill(item, key) for item in body]
    if body == KEY:
        return key
    return body


def send(rules_app: RulesApp, operation: tuple, key: str, headers: dict[str, str]) -> httpx.Response:
    _, _, method, target, body = operation
    if target == "batch":
        url = f"/v1/{rules_app.app_id}/kv"
    elif target == "touch":
        url = rules_app.key_url(key) + "?touch=true"
    else:
        url = rules_app.key_url(key)
    return rules_app.http.request(method, url, json=fill(body, key), headers=headers)


@pytest.mark.parametrize("requester", ["anonymous", "user"])
@pytest.mark.parametrize("operation", OPERATIONS, ids=[operation[0] for operation in OPERATIONS])
def test_guarded_operation(rules_app, operation, requester):
    for pattern_prefix, (read, write) in PREFIX_RULES.items():
        rules_app.expose(pattern_prefix + "**", read, write)
    headers = {} if requester == "anonymous" else rules_app.user("alice")
    needs = operation[1]

    for prefix, grants in PREFIX_GRANTS[requester].items():
        existing = f"{prefix}existing"
        etag = rules_app.seed(existing)
        response = send(rules_app, operation, existing, headers)
        after = rules_app.stored(existing)

        if needs <= grants:
            assert response.status_code == 200, (prefix, response.text)
            continue
        assert response.status_code == 403, (prefix, response.text)
        if operation[2] != "HEAD":
            assert error_code(response) == "KV_FORBIDDEN"
        assert after.status_code == 200
        assert after.headers["etag"] == etag
        assert after.json()["value"] == 1
        assert after.json()["ttl"] == SEED_TTL

        missing = f"{prefix}missing"
        response = send(rules_app, operation, missing, headers)
        assert response.status_code == 403, (prefix, response.text)
        assert rules_app.stored(missing).status_code == 404


def test_mget_any_denied_key_is_403(rules_app):
    rules_app.expose("open:**", "public", "public")
    rules_app.seed("open:a", "a")
    url = f"/v1/{rules_app.app_id}/kv"

    allowed = rules_app.http.post(url, json={"op": "mget", "keys": ["open:a", "open:b"]})
    assert allowed.status_code == 200
    assert allowed.json() == {"values": ["a", None]}
    denied = rules_app.http.post(url, json={"op": "mget", "keys": ["open:a", "closed:b", "open:b"]})
    assert denied.status_code == 403
    assert error_code(denied) == "KV_FORBIDDEN"
    empty = rules_app.http.post(url, json={"op": "mget", "keys": []})
    assert empty.status_code == 200
    assert empty.json() == {"values": []}


def test_mset_any_denied_key_writes_nothing(rules_app):
    rules_app.expose("open:**", "public", "public")
    etag = rules_app.seed("open:a", "old")
    url = f"/v1/{rules_app.app_id}/kv"

    denied = rules_app.http.post(url, json={"op": "mset", "entries": {"open:a": "new", "open:z": 1, "closed:m": 2}})
    assert denied.status_code == 403
    assert error_code(denied) == "KV_FORBIDDEN"
    assert rules_app.stored("open:a").headers["etag"] == etag
    assert rules_app.stored("open:a").json()["value"] == "old"
    assert rules_app.stored("open:z").status_code == 404
    assert rules_app.stored("closed:m").status_code == 404

    allowed = rules_app.http.post(url, json={"op": "mset", "entries": {"open:a": "new", "open:z": 1}})
    assert allowed.status_code == 200
    assert allowed.json() == {"count": 2}
    assert rules_app.stored("open:a").json()["value"] == "new"


@pytest.mark.parametrize("requester", ["anonymous", "user"])
def test_service_routes_need_service_key(rules_app, requester):
    rules_app.expose("open:**", "public", "public")
    rules_app.seed("open:a")
    headers = {} if requester == "anonymous" else rules_app.user("alice")
    base = f"/v1/{rules_app.app_id}"
    requests = [
        ("GET", f"{base}/kv", None),
        ("GET", f"{base}/kv?prefix=open:", None),
        ("GET", f"{base}/kv-rules", None),
        ("PUT", f"{base}/kv-rules", {"pattern": "all:**", "read": "public", "write": "public"}),
        ("DELETE", f"{base}/kv-rules?pattern=open:**", None),
        ("POST", f"{base}/kv-rules/explain", {"key": "open:a", "user": None}),
    ]
    for method, url, body in requests:
        response = rules_app.http.request(method, url, json=body, headers=headers)
        assert response.status_code == 401, (method, url)
        assert error_code(response) == "KV_UNAUTHORIZED", (method, url)
    assert [rule["pattern"] for rule in rules_app.rules()] == ["open:**"]


def test_rule_routes_with_service_key(rules_app):
    url = f"/v1/{rules_app.app_id}/kv-rules"
    body = {"pattern": "open:**", "read": "public", "write": "deny"}

    created = rules_app.http.put(url, json=body, headers=rules_app.service)
    assert created.status_code == 200
    assert created.json() == body
    again = rules_app.http.put(url, json=body, headers=rules_app.service)
    assert again.status_code == 200
    conflict = rules_app.http.put(url, json={**body, "write": "public"}, headers=rules_app.service)
    assert conflict.status_code == 409
    assert error_code(conflict) == "KV_EXPOSE_CONFLICT"
    invalid = rules_app.http.put(url, json={**body, "pattern": "a:***"}, headers=rules_app.service)
    assert invalid.status_code == 400
    assert error_code(invalid) == "KV_INVALID_REQUEST"
    owner = rules_app.http.put(url, json={"pattern": "x:*", "read": "owner", "write": "deny"}, headers=rules_app.service)
    assert owner.status_code == 400
    assert error_code(owner) == "KV_INVALID_REQUEST"

    rules = rules_app.rules()
    assert rules == [{"pattern": "open:**", "read": "public", "write": "deny", "order": rules[0]["order"]}]
    removed = rules_app.http.delete(url, params={"pattern": "open:**"}, headers=rules_app.service)
    assert removed.json() == {"removed": True}
    removed_again = rules_app.http.delete(url, params={"pattern": "open:**"}, headers=rules_app.service)
    assert removed_again.json() == {"removed": False}
    assert rules_app.rules() == []


def test_explain_names_deciding_rule(rules_app):
    rules_app.expose("user:{user.id}:**", "owner", "owner")
    rules_app.expose("user:**", "public", "deny")
    rules_app.expose("staff:{user.role}", "authed", "authed")
    orders = {rule["pattern"]: rule["order"] for rule in rules_app.rules()}
    url = f"/v1/{rules_app.app_id}/kv-rules/explain"

    def explain(key: str, user: dict | None) -> dict:
        response = rules_app.http.post(url, json={"key": key, "user": user}, headers=rules_app.service)
        assert response.status_code == 200
        return response.json()

    per_user = {"pattern": "user:{user.id}:**", "read": "owner", "write": "owner", "order": orders["user:{user.id}:**"]}
    assert explain("user:alice:x", {"id": "bob"}) == {"key": "user:alice:x", "rule": per_user, "read": False, "write": False}
    assert explain("user:alice:x", {"id": "alice"}) == {"key": "user:alice:x", "rule": per_user, "read": True, "write": True}
    assert explain("user:alice:x", None) == {"key": "user:alice:x", "rule": per_user, "read": False, "write": False}

    broad = {"pattern": "user:**", "read": "public", "write": "deny", "order": orders["user:**"]}
    assert explain("user:", None) == {"key": "user:", "rule": broad, "read": True, "write": False}

    staff = {"pattern": "staff:{user.role}", "read": "authed", "write": "authed", "order": orders["staff:{user.role}"]}
    assert explain("staff:admin", {"id": "alice", "role": "admin"}) == {"key": "staff:admin", "rule": staff, "read": True, "write": True}
    assert explain("staff:admin", {"id": "alice"}) == {"key": "staff:admin", "rule": staff, "read": False, "write": False}
    assert explain("staff:authenticated", {"id": "alice"}) == {
        "key": "staff:authenticated", "rule": staff, "read": True, "write": True,
    }

    assert explain("other", {"id": "alice"}) == {"key": "other", "rule": None, "read": False, "write": False}


def test_explain_invalid_body_is_400(rules_app):
    url = f"/v1/{rules_app.app_id}/kv-rules/explain"
    for body in [{"key": "", "user": None}, {"key": "k", "user": {"id": ""}}, {"key": "k", "user": {"role": "x"}},
                 {"user": None}, {"key": "k", "user": {"id": 1}}]:
        response = rules_app.http.post(url, json=body, headers=rules_app.service)
        assert response.status_code == 400, body
        assert error_code(response) == "KV_INVALID_REQUEST", body


def test_unknown_app_is_404_for_everyone(http_server, rules_app):
    rules_app.expose("open:**", "public", "public")
    token = rules_app.user("alice")["Authorization"]
    credentials = {
        "anonymous": {},
        "token": {"Authorization": token},
        "foreign service key": rules_app.service,
        "garbage token": {"Authorization": "Bearer not.a.token"},
    }
    base = f"/v1/{UNKNOWN_APP}"
    requests = [
        ("GET", f"{base}/kv/open:a", None),
        ("HEAD", f"{base}/kv/open:a", None),
        ("PUT", f"{base}/kv/open:a", {"value": 1}),
        ("DELETE", f"{base}/kv/open:a", None),
        ("POST", f"{base}/kv/open:a", {"op": "incr"}),
        ("POST", f"{base}/kv", {"op": "mget", "keys": ["open:a"]}),
        ("POST", f"{base}/kv", {"op": "mget", "keys": []}),
        ("POST", f"{base}/kv", {"op": "mset", "entries": {"open:a": 1}}),
        ("GET", f"{base}/kv", None),
        ("GET", f"{base}/kv-rules", None),
        ("PUT", f"{base}/kv-rules", {"pattern": "a", "read": "public", "write": "public"}),
        ("POST", f"{base}/kv-rules/explain", {"key": "a", "user": None}),
    ]
    for name, headers in credentials.items():
        for method, url, body in requests:
            response = rules_app.http.request(method, url, json=body, headers=headers)
            assert response.status_code == 404, (name, method, url, response.text)
            if method != "HEAD":
                assert error_code(response) == "KV_APP_NOT_FOUND", (name, method, url)


def test_service_key_ignores_rules(rules_app):
    rules_app.expose("closed:**", "deny", "deny")
    response = rules_app.http.put(rules_app.key_url("closed:a"), json={"value": 1}, headers=rules_app.service)
    assert response.status_code == 200
    assert rules_app.stored("closed:a").json()["value"] == 1
