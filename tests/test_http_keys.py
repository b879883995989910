"""Keys in the HTTP path: percent-decoding exactly once, raw slashes and
dot segments kept as sent, invalid escapes and length limits.

httpx normalises dot segments ("a/../b" becomes "b"), so requests whose
raw path must reach the server unchanged go through http.client, which
sends the request target exactly as given.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote, urlsplit

import httpx
import pytest

PUT_BODY = b'{"value": "stored"}'


def key_path(app_id: str, key: str) -> str:
    """Return the path of a key with every reserved character and every dot
    percent-encoded, so that no client treats part of it as a dot segment."""
    return f"/v1/{app_id}/kv/{quote(key, safe='').replace('.', '%2E')}"


def send_raw(server, service_key: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """Send a request whose target is exactly `path` and return (status, body)."""
    address = urlsplit(server.base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    headers = {"Authorization": f"Bearer {service_key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def listed_keys(client: httpx.Client, app_id: str) -> list[str]:
    response = client.get(f"/v1/{app_id}/kv", params={"limit": "1000"})
    assert response.status_code == 200
    return [entry["key"] for entry in response.json()["keys"]]


# Keys whose characters are reserved or unusual in a URL path. Each travels
# fully percent-encoded and must be stored as exactly this text.
ENCODED_KEYS = [
    "a/b",
    "100%",
    "%2F",
    "%41",
    "what?",
    "a?b=c&d=e",
    "page#top",
    "with space",
    " leading and trailing ",
    "a+b",
    "user:42:profile",
    "back\\slash",
    "semi;colon",
    "tab\there",
    "line\nbreak",
    "quote\"and'apostrophe",
    "<angle>",
    "café",
    "日本語のキー",
    "emoji 😀 key",
    "ключ",
    "e\u0301",
    "Key",
    "key",
    "..",
    ".",
]


def test_encoded_keys_round_trip(client, http_app):
    """Every key of ENCODED_KEYS is stored under its exact text and read back
    from the same path. No case folding, Unicode normalisation or second
    decoding merges two of them."""
    app_id = http_app.app_id
    expected = {key: (200, key, 200, key, key) for key in ENCODED_KEYS}

    observed = {}
    for key in ENCODED_KEYS:
        put = client.put(key_path(app_id, key), json={"value": key})
        got = client.get(key_path(app_id, key))
        observed[key] = (put.status_code, put.json().get("key"), got.status_code, got.json().get("key"), got.json().get("value"))

    assert observed == expected
    assert listed_keys(client, app_id) == sorted(ENCODED_KEYS, key=lambda key: key.encode("utf-8"))


def test_raw_and_encoded_slash_same_key(client, http_app):
    app_id = http_app.app_id

    put = client.put(f"/v1/{app_id}/kv/users/42/name", json={"value": "raw"})
    assert put.status_code == 200
    assert put.json()["key"] == "users/42/name"

    encoded = client.get(f"/v1/{app_id}/kv/users%2F42%2Fname")
    assert encoded.status_code == 200
    assert encoded.json()["value"] == "raw"

    mixed = client.put(f"/v1/{app_id}/kv/users%2F42/name", json={"value": "mixed"})
    assert mixed.status_code == 200
    assert client.get(f"/v1/{app_id}/kv/users/42/name").json()["value"] == "mixed"
    assert listed_keys(client, app_id) == ["users/42/name"]


def test_lowercase_escapes_decode(client, http_app):
    app_id = http_app.app_id

    assert client.put(f"/v1/{app_id}/kv/a%2fb%c3%a9", json={"value": 1}).status_code == 200

    response = client.get(f"/v1/{app_id}/kv/a%2Fb%C3%A9")
    assert response.status_code == 200
    assert response.json()["key"] == "a/bé"


def test_decoded_exactly_once(client, http_app):
    app_id = http_app.app_id

    response = client.put(f"/v1/{app_id}/kv/%252F", json={"value": "percent"})
    assert response.status_code == 200
    assert response.json()["key"] == "%2F"

    # %2F alone is the one-character key "/", which was never written.
    assert client.get(f"/v1/{app_id}/kv/%2F").status_code == 404
    assert client.get(f"/v1/{app_id}/kv/%252F").json()["value"] == "percent"

    response = client.put(f"/v1/{app_id}/kv/%2525", json={"value": "twice"})
    assert response.status_code == 200
    assert response.json()["key"] == "%25"
    assert listed_keys(client, app_id) == ["%25", "%2F"]


# Raw request targets (sent without normalisation) and the key each names.
RAW_PATH_KEYS = [
    ("/leading", "/leading"),
    ("trailing/", "trailing/"),
    ("/both/", "/both/"),
    ("a//b", "a//b"),
    ("//", "//"),
    ("/", "/"),
    (".", "."),
    ("..", ".."),
    ("./x", "./x"),
    ("../x", "../x"),
    ("a/./b", "a/./b"),
    ("a/../b", "a/../b"),
    ("a/..", "a/.."),
    ("a/.", "a/."),
    ("/../../etc", "/../../etc"),
    ("%2E%2E", ".."),
    ("%2e", "."),
    ("a/%2E%2E/b", "a/../b"),
    ("%2F%2Fx", "//x"),
]


@pytest.mark.parametrize("read_path", ["raw", "encoded"])
def test_raw_paths_keep_key_text(client, http_app, http_server, read_path):
    """Write each key through its raw path, then read it back through the
    same raw path or through the key fully percent-encoded, %2E included."""
    app_id = http_app.app_id
    expected = {raw: (200, key, 200, "stored") for raw, key in RAW_PATH_KEYS}

    observed = {}
    for raw, key in RAW_PATH_KEYS:
        status, body = send_raw(http_server, http_app.service_key, "PUT", f"/v1/{app_id}/kv/{raw}", PUT_BODY)
        stored_key = json.loads(body).get("key")
        if read_path == "raw":
            response = send_raw(http_server, http_app.service_key, "GET", f"/v1/{app_id}/kv/{raw}")
            read_status, read_body = response[0], json.loads(response[1])
        else:
            encoded = "".join(f"%{byte:02X}" for byte in key.encode("utf-8"))
            response = client.get(f"/v1/{app_id}/kv/{encoded}")
            read_status, read_body = response.status_code, response.json()
        observed[raw] = (status, stored_key, read_status, read_body.get("value"))

    assert observed == expected
    stored = sorted({key for _, key in RAW_PATH_KEYS}, key=lambda key: key.encode("utf-8"))
    assert listed_keys(client, app_id) == stored


def test_dot_segment_keys_distinct(client, http_app, http_server):
    app_id = http_app.app_id
    raws = ["a/../b", "b", "a/./b", "a/b", "a//b", "/a/b", "a/b/"]
    for raw in raws:
        status, _ = send_raw(http_server, http_app.service_key, "PUT", f"/v1/{app_id}/kv/{raw}", PUT_BODY)
        assert status == 200

    assert listed_keys(client, app_id) == sorted(raws)


# Key paths that must be rejected, and a word the error message must contain.
INVALID_KEY_PATHS = {
    "%FF": "not valid UTF-8",
    "abc%FF": "not valid UTF-8",
    "%C3": "not valid UTF-8",
    "%C3%28": "not valid UTF-8",
    "%ED%A0%80": "not valid UTF-8",
    "%F4%90%80%80": "not valid UTF-8",
    "%C0%AF": "not valid UTF-8",
    "%00": "U+0000",
    "a%00b": "U+0000",
    "": "empty",
}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "POST"])
def test_invalid_key_is_400(http_app, http_server, method):
    bodies = {"PUT": PUT_BODY, "POST": b'{"op": "exists"}'}
    expected = {raw: (400, "KV_INVALID_REQUEST", True) for raw in INVALID_KEY_PATHS}

    observed = {}
    for raw, problem in INVALID_KEY_PATHS.items():
        status, body = send_raw(http_server, http_app.service_key, method, f"/v1/{http_app.app_id}/kv/{raw}", bodies.get(method))
        error = json.loads(body)["error"]
        observed[raw] = (status, error["code"], problem in error["message"])

    assert observed == expected


def test_head_invalid_key_is_400(http_app, http_server):
    status, body = send_raw(http_server, http_app.service_key, "HEAD", f"/v1/{http_app.app_id}/kv/%FF")
    assert status == 400
    assert body == b""


@pytest.mark.parametrize(
    ("key", "status"),
    [
        ("k" * 1024, 200),
        ("k" * 1025, 400),
        ("é" * 512, 200),
        ("é" * 512 + "k", 400),
        ("😀" * 256, 200),
        ("k" * 1021 + "😀", 400),
        ("k" * 1020 + "😀", 200),
    ],
)
def test_key_length_limit(client, http_app, key, status):
    path = key_path(http_app.app_id, key)

    put = client.put(path, json={"value": 1})
    assert put.status_code == status

    got = client.get(path)
    if status == 200:
        assert put.json()["key"] == key
        assert got.status_code == 200
        assert got.json()["key"] == key
    else:
        assert put.json()["error"]["code"] == "KV_INVALID_REQUEST"
        assert got.status_code == 400
        assert got.json()["error"]["code"] == "KV_INVALID_REQUEST"


NEVER_REDIRECTED_PATHS = [
    "/v1/{app}/kv/",
    "/v1/{app}/kv//",
    "/v1/{app}/kv///",
    "/v1/{app}/kv/a/",
    "/v1/{app}/kv/a//b",
    "/v1/{app}/kv/.",
    "/v1/{app}/kv/..",
    "/v1/{app}/kv/a/../b",
    "/v1/{app}/kv/a/./b",
    "/v1/{app}/kv/%2E%2E/x",
    "/v1/{app}/kv/%2F",
    "/v1/{app}/kv/x?touch=true",
    "/v1/{app}/kv/%FF",
    "/v1/{app}/kv",
    "/v1/{app}/kv/../../health",
    "/v1/{app}/",
    "/v1/{app}/kv-rules/",
    "/v1/{app}//kv/x",
    "/v1//{app}/kv/x",
    "/health/",
    "//health",
]


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_paths_never_redirect(http_app, http_server, method):
    statuses = {}
    for template in NEVER_REDIRECTED_PATHS:
        path = template.replace("{app}", http_app.app_id)
        statuses[path], _ = send_raw(http_server, http_app.service_key, method, path)

    redirects = {path: status for path, status in statuses.items() if 300 <= status < 400}
    assert redirects == {}
