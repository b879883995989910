"""Errors of the HTTP API: the error body, credentials, malformed requests,
the service routes, and a server whose database has gone away.

Every error body is {"error": {"code", "message"}}, sent with the status of
its code. No request, however malformed, may get a 5xx while the database is
up, and a database outage is a 503, never a 500.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urlsplit

import httpx
import pytest

import pgserver
from conftest import create_app, start_kvapi_server, stop_kvapi_server
from kvapi import migrate


def key_path(app_id: str, key: str) -> str:
    return f"/v1/{app_id}/kv/{quote(key, safe='')}"


def outcome(response: httpx.Response) -> tuple[int, str | None]:
    """Return the status and the error code (None for a success)."""
    if response.status_code < 400:
        return response.status_code, None
    return response.status_code, response.json()["error"]["code"]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """Check the status and that the body is exactly {"error": {"code", "message"}}."""
    body = response.json()
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"] != ""


@pytest.fixture
def anonymous(http_server) -> Iterator[httpx.Client]:
    """A client of the shared server that sends no Authorization header."""
    with httpx.Client(base_url=http_server.base_url, timeout=30) as http_client:
        yield http_client


@pytest.fixture
def other_app(http_server):
    """A second app on the shared server, for cross-app credentials."""
    return create_app(http_server.database_url)


# One request per data route: (name, method, path under /v1/{app_id}, JSON body).
DATA_ROUTES = [
    ("get", "GET", "/kv/k", None),
    ("get-touch", "GET", "/kv/k?touch=true", None),
    ("put", "PUT", "/kv/k", {"value": "new"}),
    ("delete", "DELETE", "/kv/k", None),
    ("setnx", "POST", "/kv/k", {"op": "setnx", "value": "new"}),
    ("setex", "POST", "/kv/k", {"op": "setex", "value": "new", "ttl": 60}),
    ("cas", "POST", "/kv/k", {"op": "cas", "expected": "old", "next": "new"}),
    ("incr", "POST", "/kv/n", {"op": "incr"}),
    ("decr", "POST", "/kv/n", {"op": "decr"}),
    ("expire", "POST", "/kv/k", {"op": "expire", "ttl": 5}),
    ("ttl", "POST", "/kv/k", {"op": "ttl"}),
    ("exists", "POST", "/kv/k", {"op": "exists"}),
    ("mget", "POST", "/kv", {"op": "mget", "keys": ["k"]}),
    ("mset", "POST", "/kv", {"op": "mset", "entries": {"k": "new"}}),
]
ROUTE_IDS = [route[0] for route in DATA_ROUTES]


def send(http_client: httpx.Client, app_id: str, method: str, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return http_client.request(method, f"/v1/{app_id}{path}", json=body, headers=headers)


def assert_unchanged(client: httpx.Client, app_id: str) -> None:
    """Check that "k" is still "old" with a 600 s TTL and that "n" was never created."""
    stored = client.get(key_path(app_id, "k"))
    assert stored.json()["value"] == "old"
    assert stored.json()["ttl"] == 600
    assert client.get(key_path(app_id, "n")).status_code == 404


@pytest.fixture
def stored_key(client, http_app) -> str:
    """Store "k" = "old" with a 600 s TTL in http_app and return its version."""
    return client.put(key_path(http_app.app_id, "k"), json={"value": "old", "ttl": 600}).json()["version"]


# Error bodies


def test_error_bodies_by_status(client, http_app, anonymous):
    app_id = http_app.app_id
    client.put(key_path(app_id, "text"), json={"value": "not a number"})
    client.put(key_path(app_id, "max"), json={"value": 2**63 - 1})
    client.put(key_path(app_id, "cas"), json={"value": 1})

    assert_error(client.put(key_path(app_id, "k"), json={"value": 1, "ttl": 0}), 400, "KV_INVALID_REQUEST")
    assert_error(client.get(key_path(app_id, "k"), headers={"Authorization": "Bearer kvs_wrong"}), 401, "KV_UNAUTHORIZED")
    assert_error(anonymous.get(key_path(app_id, "k")), 403, "KV_FORBIDDEN")
    assert_error(client.get(key_path("no_such_app", "k")), 404, "KV_APP_NOT_FOUND")
    assert_error(client.post(key_path(app_id, "cas"), json={"op": "cas", "expected": 2, "next": 3}), 409, "KV_CAS_MISMATCH")
    assert_error(client.post(key_path(app_id, "text"), json={"op": "incr"}), 409, "KV_NOT_A_COUNTER")
    assert_error(client.post(key_path(app_id, "max"), json={"op": "incr"}), 409, "KV_COUNTER_OVERFLOW")
    assert_error(client.put(key_path(app_id, "text"), json={"value": 1}, headers={"If-Match": '"0"'}), 412, "KV_VERSION_MISMATCH")
    assert_error(client.put(key_path(app_id, "text"), json={"value": 1}, headers={"If-None-Match": "*"}), 412, "KV_VERSION_MISMATCH")
    assert_error(client.delete(key_path(app_id, "text"), headers={"If-Match": '"0"'}), 412, "KV_VERSION_MISMATCH")


def test_value_too_large_carries_limit(client, http_app):
    """A value over the default plan's 1 MiB limit is a 413 that states the
    limit and the value's size."""
    path = key_path(http_app.app_id, "big")
    text = "x" * (1024 * 1024)

    response = client.put(path, json={"value": text})

    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "KV_VALUE_TOO_LARGE"
    assert error["limit"] == 1048576
    assert error["actual"] == 1048578
    assert client.get(path).status_code == 404


def test_value_at_limit_accepted(client, http_app):
    path = key_path(http_app.app_id, "big")

    response = client.put(path, json={"value": "x" * (1024 * 1024 - 2)})

    assert response.status_code == 200
    assert len(client.get(path).json()["value"]) == 1024 * 1024 - 2


def send_oversized_put(server, app, *, chunked: bool) -> tuple[int, dict]:
    """PUT a body of 17 MiB over a plain socket and return (status, JSON body).

    The server may send 413 and close before it has read the whole body,
    and httpx then sometimes loses the response to the failed write. A
    socket lets the test finish writing, ignore that error, and still read
    the response."""
    address = urlsplit(server.base_url)
    payload = b'{"value": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    head = f"PUT /v1/{app.app_id}/kv/huge HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {app.service_key}\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        step = 1024 * 1024
        pieces = [b"%x\r\n%s\r\n" % (len(payload[i:i + step]), payload[i:i + step]) for i in range(0, len(payload), step)]
        body = b"".join(pieces) + b"0\r\n\r\n"
    else:
        head += f"Content-Length: {len(payload)}\r\n\r\n"
        body = payload

    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head.encode("ascii") + body)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while not response_complete(received):
                data = sock.recv(65536)
                if not data:
                    break
                received += data

    head, _, body = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0]
    return int(status_line.split()[1]), json.loads(body)


def response_complete(received: bytes) -> bool:
    """Return whether `received` contains the headers and the Content-Length body."""
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_16_mib_is_413(client, http_app, http_server, chunked):
    status, body = send_oversized_put(http_server, http_app, chunked=chunked)

    assert status == 413
    assert body["error"]["code"] == "KV_VALUE_TOO_LARGE"
    assert client.get(key_path(http_app.app_id, "huge")).status_code == 404


def test_unknown_route_is_404(client):
    assert_error(client.get("/v1"), 404, "KV_NOT_FOUND")
    assert_error(client.get("/nothing/here"), 404, "KV_NOT_FOUND")


def test_unsupported_method_is_405(client, http_app):
    response = client.request("PATCH", key_path(http_app.app_id, "k"), json={"value": 1})

    assert_error(response, 405, "KV_INVALID_REQUEST")


# Credentials


def route_outcomes(http_client: httpx.Client, app_id: str, headers: dict[str, str] | None = None) -> dict[str, tuple[int, str | None]]:
    """Send one request per data route and return each route's outcome."""
    return {name: outcome(send(http_client, app_id, method, path, body, headers)) for name, method, path, body in DATA_ROUTES}


def test_no_service_key_is_403(client, http_app, anonymous, stored_key):
    """No access rules exist, so every key of the app is private."""
    observed = route_outcomes(anonymous, http_app.app_id)

    assert observed == dict.fromkeys(ROUTE_IDS, (403, "KV_FORBIDDEN"))
    assert_unchanged(client, http_app.app_id)


def test_no_service_key_missing_key_is_403(http_app, anonymous):
    """A denied request gets 403 whether or not the key exists."""
    observed = route_outcomes(anonymous, http_app.app_id)

    assert observed == dict.fromkeys(ROUTE_IDS, (403, "KV_FORBIDDEN"))


def test_forbidden_error_body(http_app, anonymous, stored_key):
    assert_error(anonymous.get(key_path(http_app.app_id, "k")), 403, "KV_FORBIDDEN")


def test_no_service_key_head_is_403(http_app, anonymous, stored_key):
    response = anonymous.head(key_path(http_app.app_id, "k"))

    assert response.status_code == 403
    assert response.content == b""


def test_wrong_service_key_is_401(client, http_app, anonymous, stored_key):
    headers = {"Authorization": "Bearer kvs_" + "A" * 43}

    observed = route_outcomes(anonymous, http_app.app_id, headers)

    assert observed == dict.fromkeys(ROUTE_IDS, (401, "KV_UNAUTHORIZED"))
    assert_unchanged(client, http_app.app_id)


def test_other_app_service_key_is_401(client, http_app, other_app, anonymous, stored_key):
    headers = {"Authorization": f"Bearer {other_app.service_key}"}

    observed = route_outcomes(anonymous, http_app.app_id, headers)

    assert observed == dict.fromkeys(ROUTE_IDS, (401, "KV_UNAUTHORIZED"))
    assert_unchanged(client, http_app.app_id)


def test_other_app_key_cannot_list(http_app, other_app, anonymous, stored_key):
    response = anonymous.get(f"/v1/{http_app.app_id}/kv", headers={"Authorization": f"Bearer {other_app.service_key}"})

    assert_error(response, 401, "KV_UNAUTHORIZED")


def test_apps_do_not_share_keys(client, http_app, other_app, anonymous, stored_key):
    other = {"Authorization": f"Bearer {other_app.service_key}"}

    assert anonymous.get(key_path(other_app.app_id, "k"), headers=other).status_code == 404
    assert anonymous.put(key_path(other_app.app_id, "k"), json={"value": "other"}, headers=other).status_code == 200
    assert client.get(key_path(http_app.app_id, "k")).json()["value"] == "old"
    assert anonymous.get(key_path(other_app.app_id, "k"), headers=other).json()["value"] == "other"


@pytest.mark.parametrize("credentials", ["none", "wrong", "other-app"])
def test_unknown_app_is_404(http_app, anonymous, credentials):
    """An unknown app is a 404 whatever the credentials, on every route."""
    headers = {
        "none": {},
        "wrong": {"Authorization": "Bearer kvs_wrong"},
        "other-app": {"Authorization": f"Bearer {http_app.service_key}"},
    }[credentials]

    observed = route_outcomes(anonymous, "no_such_app", headers)
    observed["list"] = outcome(anonymous.get("/v1/no_such_app/kv", headers=headers))

    assert observed == dict.fromkeys([*ROUTE_IDS, "list"], (404, "KV_APP_NOT_FOUND"))


def test_invalid_app_id_is_404(client):
    """An app id that no app can have names an unknown app on every route."""
    app_ids = ["bad%20app", "a" * 65, "%FF", "dots.in.id", "caf%C3%A9", "%00"]

    observed = {}
    for app_id in app_ids:
        observed[(app_id, "key")] = outcome(client.get(f"/v1/{app_id}/kv/k"))
        observed[(app_id, "list")] = outcome(client.get(f"/v1/{app_id}/kv"))
        observed[(app_id, "batch")] = outcome(client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": ["k"]}))

    assert observed == dict.fromkeys(observed, (404, "KV_APP_NOT_FOUND"))


def test_app_id_is_case_sensitive(client, http_app):
    response = client.get(key_path(http_app.app_id.upper(), "k"))

    assert_error(response, 404, "KV_APP_NOT_FOUND")


def test_malformed_authorization_is_401(http_app, anonymous, stored_key):
    headers = ["Basic dXNlcjpwYXNz", "Bearer", "Token kvs_abc", "", "kvs_abc", "Bearer\tkvs_abc", "Digest username=x"]

    observed = {}
    for header in headers:
        response = anonymous.get(key_path(http_app.app_id, "k"), headers={"Authorization": header})
        observed[header] = (*outcome(response), "Authorization" in response.json()["error"]["message"])

    assert observed == dict.fromkeys(headers, (401, "KV_UNAUTHORIZED", True))


def test_bearer_scheme_is_case_insensitive(http_app, anonymous, stored_key):
    """HTTP authentication scheme names are case-insensitive, so "bearer" works too."""
    response = anonymous.get(key_path(http_app.app_id, "k"), headers={"Authorization": f"bearer {http_app.service_key}"})

    assert response.status_code == 200
    assert response.json()["value"] == "old"


def test_list_without_service_key_is_401(http_app, anonymous, stored_key):
    response = anonymous.get(f"/v1/{http_app.app_id}/kv")

    assert_error(response, 401, "KV_UNAUTHORIZED")


def test_list_wrong_service_key_is_401(http_app, anonymous, stored_key):
    response = anonymous.get(f"/v1/{http_app.app_id}/kv", headers={"Authorization": "Bearer kvs_wrong"})

    assert_error(response, 401, "KV_UNAUTHORIZED")


# Malformed bodies


# Malformed bodies: (method, path under the app, body, a word the message must contain).
MALFORMED_BODIES = [
    ("PUT", "/kv/k", b'{"value": 1, "extra": 2}', "extra"),
    ("PUT", "/kv/k", b'{"value": 1, "keep_ttl": true}', "keep_ttl"),
    ("PUT", "/kv/k", b"not json", "malformed"),
    ("PUT", "/kv/k", b'{"value": 1', "truncated"),
    ("PUT", "/kv/k", b"", "empty"),
    ("PUT", "/kv/k", b"[1]", "object"),
    ("PUT", "/kv/k", b'{"ttl": 5}', "value"),
    ("PUT", "/kv/k", b'{"value": 1, "ttl": "10"}', "ttl"),
    ("PUT", "/kv/k", b'{"value": 1, "ephemeral": "yes"}', "ephemeral"),
    ("POST", "/kv/k", b'{"op": "frob"}', "frob"),
    ("POST", "/kv/k", b'{"op": "mget", "keys": ["k"]}', "mget"),
    ("POST", "/kv/k", b'{"value": 1}', "op"),
    ("POST", "/kv/k", b'{"op": "incr", "amount": 2}', "amount"),
    ("POST", "/kv/k", b'{"op": "exists", "value": 1}', "value"),
    ("POST", "/kv/k", b"", "empty"),
    ("POST", "/kv/k", b"{{", "malformed"),
    ("POST", "/kv/k", b'{"op": "cas", "expected": 1}', "next"),
    ("POST", "/kv", b'{"op": "frob"}', "frob"),
    ("POST", "/kv", b'{"op": "incr"}', "incr"),
    ("POST", "/kv", b'{"op": "mget"}', "keys"),
    ("POST", "/kv", b'{"op": "mget", "keys": ["k"], "extra": 1}', "extra"),
    ("POST", "/kv", b'{"op": "mset", "entries": {}, "keepTtl": true}', "keepTtl"),
    ("POST", "/kv", b"", "empty"),
    ("POST", "/kv", b"nope", "malformed"),
]


def test_malformed_body_is_400(client, http_app):
    """Each malformed body is a 400 whose message names the problem."""
    observed = {}
    for method, path, body, problem in MALFORMED_BODIES:
        response = client.request(method, f"/v1/{http_app.app_id}{path}", content=body)
        observed[(method, path, body)] = (*outcome(response), problem in response.json()["error"]["message"])

    assert observed == dict.fromkeys(observed, (400, "KV_INVALID_REQUEST", True))
    assert client.get(key_path(http_app.app_id, "k")).status_code == 404


def test_malformed_body_error_shape(client, http_app):
    assert_error(client.put(key_path(http_app.app_id, "k"), content=b"not json"), 400, "KV_INVALID_REQUEST")


# Service routes


def test_health_ok(anonymous):
    response = anonymous.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_openapi_lists_key_route(anonymous):
    response = anonymous.get("/schema/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/v1/{app_id}/kv/{key}" in paths
    assert set(paths["/v1/{app_id}/kv/{key}"]) >= {"get", "put", "delete", "post", "head"}
    assert "/v1/{app_id}/kv" in paths


# Fuzz-style table: malformed or odd requests, where {app} is a live app.
# Each row names the statuses it may get, and none of them is a 5xx.
FUZZ_CASES = [
    ("truncated-json", "PUT", "/v1/{app}/kv/k", {}, b'{"value": ', {400}),
    ("trailing-data", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1}{"value": 2}', {400}),
    ("json-array", "PUT", "/v1/{app}/kv/k", {}, b"[]", {400}),
    ("json-string", "PUT", "/v1/{app}/kv/k", {}, b'"value"', {400}),
    ("json-null", "PUT", "/v1/{app}/kv/k", {}, b"null", {400}),
    ("bom", "PUT", "/v1/{app}/kv/k", {}, b'\xef\xbb\xbf{"value": 1}', {400}),
    ("nan", "PUT", "/v1/{app}/kv/k", {}, b'{"value": NaN}', {400}),
    ("infinity", "PUT", "/v1/{app}/kv/k", {}, b'{"value": Infinity}', {400}),
    ("single-quotes", "PUT", "/v1/{app}/kv/k", {}, b"{'value': 1}", {400}),
    ("comment", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1 /* c */}', {400}),
    ("leading-zero-ttl", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1, "ttl": 010}', {400}),
    ("huge-ttl", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1, "ttl": 1e999}', {400}),
    ("negative-zero-ttl", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1, "ttl": -0}', {400}),
    ("huge-integer-ttl", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1, "ttl": 123456789012345678901234567890}', {400}),
    ("number-overflows-numeric", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1e999999}', {400}),
    ("number-underflows-numeric", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1e-999999}', {400}),
    ("number-100001-digits", "PUT", "/v1/{app}/kv/k", {}, b'{"value": 1e100000}', {200}),
    ("invalid-utf8-in-value", "PUT", "/v1/{app}/kv/k", {}, b'{"value": "\xff"}', {400}),
    ("invalid-utf8-in-mget", "POST", "/v1/{app}/kv", {}, b'{"op": "mget", "keys": ["\xff"]}', {400}),
    ("lone-surrogate", "PUT", "/v1/{app}/kv/k", {}, b'{"value": "\\udfff"}', {400}),
    ("nesting-500", "PUT", "/v1/{app}/kv/k", {}, b'{"value": ' + b"[" * 500 + b"]" * 500 + b"}", {200}),
    ("nesting-5000", "PUT", "/v1/{app}/kv/k", {}, b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}", {200, 400}),
    ("op-number", "POST", "/v1/{app}/kv/k", {}, b'{"op": 5}', {400}),
    ("op-uppercase", "POST", "/v1/{app}/kv/k", {}, b'{"op": "INCR"}', {400}),
    ("op-duplicated", "POST", "/v1/{app}/kv/k", {}, b'{"op": "incr", "op": "decr"}', {200, 400}),
    ("by-huge", "POST", "/v1/{app}/kv/k", {}, b'{"op": "incr", "by": 1e400}', {400}),
    ("by-huge-integer", "POST", "/v1/{app}/kv/k", {}, b'{"op": "incr", "by": 99999999999999999999999}', {400}),
    ("by-string", "POST", "/v1/{app}/kv/k", {}, b'{"op": "incr", "by": "1"}', {400}),
    ("mget-null-key", "POST", "/v1/{app}/kv", {}, b'{"op": "mget", "keys": [null]}', {400}),
    ("mget-nul-key", "POST", "/v1/{app}/kv", {}, b'{"op": "mget", "keys": ["a\\u0000"]}', {400}),
    ("mset-nul-key", "POST", "/v1/{app}/kv", {}, b'{"op": "mset", "entries": {"\\u0000": 1}}', {400}),
    ("mset-huge-number", "POST", "/v1/{app}/kv", {}, b'{"op": "mset", "entries": {"a": 1e999999}}', {400}),
    ("touch-huge", "GET", "/v1/{app}/kv/k?touch=99999999999999999999999", {}, None, {400}),
    ("touch-invalid-utf8", "GET", "/v1/{app}/kv/k?touch=%FF", {}, None, {400}),
    ("touch-nul", "GET", "/v1/{app}/kv/k?touch=%00", {}, None, {400}),
    ("limit-huge", "GET", "/v1/{app}/kv?limit=99999999999999999999", {}, None, {400}),
    ("prefix-too-long", "GET", "/v1/{app}/kv?prefix=" + "p" * 2000, {}, None, {400}),
    ("prefix-nul", "GET", "/v1/{app}/kv?prefix=%00", {}, None, {400}),
    ("cursor-nul", "GET", "/v1/{app}/kv?cursor=%00", {}, None, {400}),
    ("cursor-invalid-utf8", "GET", "/v1/{app}/kv?cursor=%FF", {}, None, {400}),
    ("cursor-not-base64", "GET", "/v1/{app}/kv?cursor=a", {}, None, {400}),
    ("cursor-decodes-to-invalid-utf8", "GET", "/v1/{app}/kv?cursor=____", {}, None, {400}),
    ("if-match-unterminated", "PUT", "/v1/{app}/kv/k", {"If-Match": '"abc'}, b'{"value": 1}', {400}),
    ("if-match-empty", "DELETE", "/v1/{app}/kv/k", {"If-Match": ""}, None, {400}),
    ("if-match-and-if-none-match", "PUT", "/v1/{app}/kv/k", {"If-Match": "*", "If-None-Match": "*"}, b'{"value": 1}', {400}),
    ("if-none-match-etag", "PUT", "/v1/{app}/kv/k", {"If-None-Match": '"1"'}, b'{"value": 1}', {400}),
    ("content-type-text", "PUT", "/v1/{app}/kv/k", {"Content-Type": "text/plain"}, b'{"value": 1}', {200}),
    ("content-type-form", "PUT", "/v1/{app}/kv/k", {"Content-Type": "application/x-www-form-urlencoded"}, b"value=1", {400}),
    ("long-header", "GET", "/v1/{app}/kv/never-written", {"X-Padding": "x" * 8000}, None, {404}),
    ("accept-html", "GET", "/v1/{app}/kv/never-written", {"Accept": "text/html"}, None, {404}),
    ("authorization-long", "GET", "/v1/{app}/kv/k", {"Authorization": "Bearer " + "x" * 10000}, None, {401}),
    ("authorization-latin1", "GET", "/v1/{app}/kv/k", {"Authorization": b"Bearer \xe9\xff"}, None, {401}),
    ("authorization-three-words", "GET", "/v1/{app}/kv/k", {"Authorization": "Bearer a b"}, None, {401}),
    ("app-id-nul", "GET", "/v1/%00/kv/k", {}, None, {400, 404}),
    ("app-id-nul-list", "GET", "/v1/%00/kv", {}, None, {400, 404}),
    ("app-id-empty", "GET", "/v1//kv/k", {}, None, {404}),
]


def test_fuzz_never_5xx(client, http_app):
    observed = {}
    for name, method, path, headers, body, _ in FUZZ_CASES:
        response = client.request(method, path.replace("{app}", http_app.app_id), headers=headers, content=body)
        observed[name] = response.status_code

    unexpected = {
        name: observed[name]
        for name, _, _, _, _, statuses in FUZZ_CASES
        if observed[name] not in statuses
    }
    assert unexpected == {}


def test_invalid_utf8_in_body_is_400(client, http_app):
    """A JSON body whose strings are not valid UTF-8 is a client error."""
    app_id = http_app.app_id
    requests = {
        "put": ("PUT", f"/v1/{app_id}/kv/k", b'{"value": "\xff"}'),
        "setnx": ("POST", f"/v1/{app_id}/kv/k", b'{"op": "setnx", "value": "\xfe\xff"}'),
        "setex": ("POST", f"/v1/{app_id}/kv/k", b'{"op": "setex", "value": ["\xc3"], "ttl": 5}'),
        "cas": ("POST", f"/v1/{app_id}/kv/k", b'{"op": "cas", "expected": null, "next": {"a": "\xed\xa0\x80"}}'),
        "mset": ("POST", f"/v1/{app_id}/kv", b'{"op": "mset", "entries": {"a": "\xff"}}'),
        "mset-key": ("POST", f"/v1/{app_id}/kv", b'{"op": "mset", "entries": {"\xff": 1}}'),
        "mget": ("POST", f"/v1/{app_id}/kv", b'{"op": "mget", "keys": ["\xff"]}'),
    }

    observed = {name: outcome(client.request(method, path, content=body)) for name, (method, path, body) in requests.items()}

    assert observed == dict.fromkeys(requests, (400, "KV_INVALID_REQUEST"))


def test_deeply_nested_value_not_5xx(client, http_app):
    """Nesting depth is no reason for a server error: a deep value is either
    stored or rejected as a bad request."""
    path = key_path(http_app.app_id, "deep")
    bodies = {
        "arrays-1000": b'{"value": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        "arrays-5000": b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "objects-5000": b'{"value": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
        "unbalanced-5000": b'{"value": ' + b"[" * 5000 + b"}",
        "cas-5000": b'{"op": "cas", "expected": null, "next": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    }

    observed = {}
    for name, body in bodies.items():
        method = "POST" if name.startswith("cas") else "PUT"
        observed[name] = client.request(method, path, content=body).status_code

    server_errors = {name: status for name, status in observed.items() if status >= 500}
    assert server_errors == {}


# Database outage


def test_database_down_is_503(tmp_path):
    """Stopping PostgreSQL under a running server turns data routes and
    /health into 503 KV_UNAVAILABLE, never 500."""
    database = pgserver.start_server()
    server = None
    try:
        url = database.url()
        migrate.upgrade(url)
        app = create_app(url)
        server = start_kvapi_server(url, tmp_path / "serve.log")
        headers = {"Authorization": f"Bearer {app.service_key}"}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http_client:
            assert http_client.put(key_path(app.app_id, "k"), json={"value": 1}).status_code == 200

            # A fast shutdown disconnects the server's pooled connections;
            # the default smart shutdown would wait for them.
            database.stop(_signal=signal.SIGINT)

            # A request may wait for the pool's connection timeout before it
            # fails, so the requests run in parallel to keep the test short.
            requests = [("health", "GET", "/health", None), ("list", "GET", f"/v1/{app.app_id}/kv", None)]
            requests += [(name, method, f"/v1/{app.app_id}{path}", body) for name, method, path, body in DATA_ROUTES]
            with ThreadPoolExecutor(max_workers=len(requests) + 1) as executor:
                head = executor.submit(http_client.head, key_path(app.app_id, "k"))
                responses = {
                    name: executor.submit(http_client.request, method, path, json=body)
                    for name, method, path, body in requests
                }
            statuses = {name: future.result().status_code for name, future in responses.items()}
            codes = {name: future.result().json()["error"]["code"] for name, future in responses.items()}
            assert statuses == dict.fromkeys(responses, 503)
            assert codes == dict.fromkeys(responses, "KV_UNAVAILABLE")
            assert head.result().status_code == 503
    finally:
        if server is not None:
            stop_kvapi_server(server)
        database.stop(_signal=signal.SIGINT)


def test_repeated_touch_uses_last_value(client, http_app, stored_key):
    response = client.get(key_path(http_app.app_id, "k") + "?touch=5&touch=7")

    assert response.status_code == 200
    assert response.json()["ttl"] == 7


def test_repeated_touch_checks_last_value(client, http_app, stored_key):
    response = client.get(key_path(http_app.app_id, "k") + "?touch=5&touch=abc")

    assert_error(response, 400, "KV_INVALID_REQUEST")
    assert "'abc'" in response.json()["error"]["message"]


@pytest.mark.parametrize("touch", ["0", "2147483648"])
def test_touch_out_of_range_names_range(client, http_app, stored_key, touch):
    response = client.get(key_path(http_app.app_id, "k") + f"?touch={touch}")

    assert_error(response, 400, "KV_INVALID_REQUEST")
    assert response.json()["error"]["message"] == (
        f"invalid touch '{touch}': use touch=true for the default TTL or touch=N for N seconds from 1 to 2147483647"
    )
