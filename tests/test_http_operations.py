"""Operations of the HTTP API against a real `kvapi serve` process: status
codes, exact bodies, ETags and the effect of each request on the stored key.

JSON numbers are compared as text (json.loads with parse_int and
parse_float set to str), because a Python float would hide lost digits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest

DEFAULT_TTL = 30 * 24 * 3600


def key_path(app_id: str, key: str) -> str:
    return f"/v1/{app_id}/kv/{quote(key, safe='')}"


def exact_json(text: str) -> object:
    """Parse JSON keeping every number as the text the server sent."""
    return json.loads(text, parse_int=str, parse_float=str)


@pytest.fixture
def database(http_server) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the shared HTTP server's database."""
    with psycopg.connect(http_server.database_url, autocommit=True) as connection:
        yield connection


def expire_now(database: psycopg.Connection, app_id: str, key: str) -> None:
    """Move a key's expiry into the past in whichever tier stores it."""
    for table in ("entries", "ephemeral_entries"):
        database.execute(
            f"UPDATE kvapi_data.{table} SET expires_at = now() - interval '1 second' WHERE app_id = %s AND key = %s",
            [app_id, key],
        )


def tier_rows(database: psycopg.Connection, app_id: str, key: str) -> dict[str, int]:
    """Count a key's rows in each tier's table."""
    counts = {}
    for table in ("entries", "ephemeral_entries"):
        (counts[table],) = database.execute(
            f"SELECT count(*) FROM kvapi_data.{table} WHERE app_id = %s AND key = %s", [app_id, key]
        ).fetchone()
    return counts


def post_op(client, app_id: str, key: str, body: dict):
    return client.post(key_path(app_id, key), json=body)


def error_code(response) -> str:
    return response.json()["error"]["code"]


def outcome(response) -> tuple[int, str | None]:
    """Return the status and the error code (None for a success)."""
    if response.status_code < 400:
        return response.status_code, None
    return response.status_code, error_code(response)


INVALID = (400, "KV_INVALID_REQUEST")


# GET and HEAD


def test_get_existing_key(client, http_app):
    path = key_path(http_app.app_id, "greeting")
    put = client.put(path, json={"value": {"text": "hello", "n": [1, 2]}})
    version = put.json()["version"]

    response = client.get(path)

    assert response.status_code == 200
    assert response.json() == {"key": "greeting", "value": {"text": "hello", "n": [1, 2]}, "ttl": DEFAULT_TTL, "version": version}
    assert response.headers["etag"] == f'"{version}"'
    assert response.headers["content-type"] == "application/json"


def test_get_missing_key_is_404(client, http_app):
    response = client.get(key_path(http_app.app_id, "missing"))

    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"value", "error"}
    assert body["value"] is None
    assert body["error"]["code"] == "KV_NOT_FOUND"
    assert "missing" in body["error"]["message"]
    assert "etag" not in response.headers


def test_get_expired_key_is_404(client, http_app, database):
    path = key_path(http_app.app_id, "short")
    client.put(path, json={"value": 1, "ttl": 60})
    expire_now(database, http_app.app_id, "short")

    assert client.get(path).status_code == 404
    assert client.head(path).status_code == 404
    assert post_op(client, http_app.app_id, "short", {"op": "exists"}).json() == {"exists": False}
    assert post_op(client, http_app.app_id, "short", {"op": "ttl"}).json() == {"ttl": None, "exists": False}
    assert client.delete(path).json() == {"deleted": False}


def test_get_touch_seconds_resets_ttl(client, http_app):
    path = key_path(http_app.app_id, "session")
    client.put(path, json={"value": "s", "ttl": 100})

    touched = client.get(path, params={"touch": "500"})
    assert touched.status_code == 200
    assert touched.json()["ttl"] == 500
    assert touched.json()["value"] == "s"

    assert client.get(path).json()["ttl"] == 500


def test_get_touch_true_resets_default(client, http_app):
    path = key_path(http_app.app_id, "session")
    client.put(path, json={"value": "s", "ttl": 100})

    touched = client.get(path, params={"touch": "true"})
    assert touched.status_code == 200
    assert touched.json()["ttl"] == DEFAULT_TTL

    assert client.get(path).json()["ttl"] == DEFAULT_TTL


def test_get_touch_keeps_version(client, http_app):
    path = key_path(http_app.app_id, "session")
    version = client.put(path, json={"value": "s", "ttl": 100}).json()["version"]

    touched = client.get(path, params={"touch": "500"})

    assert touched.json()["version"] == version
    assert touched.headers["etag"] == f'"{version}"'


@pytest.mark.parametrize("touch", ["true", "60"])
def test_get_touch_keeps_no_expiry(client, http_app, touch):
    path = key_path(http_app.app_id, "forever")
    client.put(path, json={"value": 1, "ttl": None})

    touched = client.get(path, params={"touch": touch})
    assert touched.status_code == 200
    assert touched.json()["ttl"] is None

    assert client.get(path).json()["ttl"] is None


def test_get_touch_missing_key_is_404(client, http_app):
    response = client.get(key_path(http_app.app_id, "missing"), params={"touch": "true"})

    assert response.status_code == 404
    assert error_code(response) == "KV_NOT_FOUND"


def test_get_invalid_touch_is_400(client, http_app):
    path = key_path(http_app.app_id, "session")
    client.put(path, json={"value": "s", "ttl": 100})
    touches = ["", "abc", "false", "0", "-1", "1.5", "1e2", "TRUE", "2147483648", "null", " 5", "\x00"]

    observed = {touch: outcome(client.get(path, params={"touch": touch})) for touch in touches}

    assert observed == dict.fromkeys(touches, INVALID)
    assert client.get(path).json()["ttl"] == 100


def test_head_existing_and_missing(client, http_app):
    path = key_path(http_app.app_id, "present")
    client.put(path, json={"value": "x"})

    present = client.head(path)
    assert present.status_code == 200
    assert present.content == b""

    missing = client.head(key_path(http_app.app_id, "absent"))
    assert missing.status_code == 404
    assert missing.content == b""


# PUT


def test_put_returns_key_ttl_version(client, http_app):
    response = client.put(key_path(http_app.app_id, "k"), json={"value": "v"})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"key", "ttl", "version"}
    assert body["key"] == "k"
    assert body["ttl"] == DEFAULT_TTL
    assert isinstance(body["version"], str)
    assert response.headers["etag"] == f'"{body["version"]}"'


def test_put_ttl_and_no_expiry(client, http_app):
    path = key_path(http_app.app_id, "k")

    assert client.put(path, json={"value": 1, "ttl": 60}).json()["ttl"] == 60
    assert client.get(path).json()["ttl"] == 60

    assert client.put(path, json={"value": 1, "ttl": None}).json()["ttl"] is None
    assert client.get(path).json()["ttl"] is None


def test_put_omitted_ttl_is_default(client, http_app):
    """An omitted ttl means the default TTL, not the key's old TTL."""
    path = key_path(http_app.app_id, "k")
    client.put(path, json={"value": 1, "ttl": 60})

    assert client.put(path, json={"value": 2}).json()["ttl"] == DEFAULT_TTL
    assert client.get(path).json()["ttl"] == DEFAULT_TTL


def test_put_keep_ttl(client, http_app):
    path = key_path(http_app.app_id, "k")
    client.put(path, json={"value": 1, "ttl": 60})

    kept_ttl = client.put(path, json={"value": 2, "keepTtl": True})
    assert kept_ttl.status_code == 200
    assert kept_ttl.json()["ttl"] == 60
    assert client.get(path).json()["value"] == 2

    client.put(path, json={"value": 3, "ttl": None})
    assert client.put(path, json={"value": 4, "keepTtl": True}).json()["ttl"] is None

    new_key = client.put(key_path(http_app.app_id, "new"), json={"value": 1, "keepTtl": True})
    assert new_key.json()["ttl"] == DEFAULT_TTL


def test_put_keep_ttl_with_ttl_is_400(client, http_app):
    path = key_path(http_app.app_id, "k")

    response = client.put(path, json={"value": 1, "ttl": 60, "keepTtl": True})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"
    assert client.get(path).status_code == 404


def test_put_if_match_current_etag(client, http_app):
    path = key_path(http_app.app_id, "k")
    etag = client.put(path, json={"value": 1}).headers["etag"]

    response = client.put(path, json={"value": 2}, headers={"If-Match": etag})

    assert response.status_code == 200
    assert response.headers["etag"] != etag
    assert client.get(path).json()["value"] == 2


def test_put_if_match_stale_is_412(client, http_app):
    path = key_path(http_app.app_id, "k")
    stale = client.put(path, json={"value": 1}).headers["etag"]
    current = client.put(path, json={"value": 2}).json()["version"]

    response = client.put(path, json={"value": 3}, headers={"If-Match": stale})

    assert response.status_code == 412
    assert error_code(response) == "KV_VERSION_MISMATCH"
    after = client.get(path)
    assert after.json()["value"] == 2
    assert after.json()["version"] == current


@pytest.mark.parametrize("if_match", ['"1"', "*", 'W/"1"'])
def test_put_if_match_missing_key_is_412(client, http_app, if_match):
    path = key_path(http_app.app_id, "absent")

    response = client.put(path, json={"value": 1}, headers={"If-Match": if_match})

    assert response.status_code == 412
    assert error_code(response) == "KV_VERSION_MISMATCH"
    assert client.get(path).status_code == 404


def test_put_if_match_star_and_list(client, http_app):
    path = key_path(http_app.app_id, "k")
    etag = client.put(path, json={"value": 1}).headers["etag"]

    assert client.put(path, json={"value": 2}, headers={"If-Match": "*"}).status_code == 200
    stale_list = f'"0", {etag}'
    assert client.put(path, json={"value": 3}, headers={"If-Match": stale_list}).status_code == 412
    current = client.get(path).headers["etag"]
    assert client.put(path, json={"value": 4}, headers={"If-Match": f'"0", {current}'}).status_code == 200


def test_put_if_match_weak_etag_is_412(client, http_app):
    """If-Match compares strongly, so a weak validator never matches."""
    path = key_path(http_app.app_id, "k")
    etag = client.put(path, json={"value": 1}).headers["etag"]

    response = client.put(path, json={"value": 2}, headers={"If-Match": f"W/{etag}"})

    assert response.status_code == 412
    assert client.get(path).json()["value"] == 1


def test_put_if_match_unquoted_is_400(client, http_app):
    path = key_path(http_app.app_id, "k")
    version = client.put(path, json={"value": 1}).json()["version"]

    response = client.put(path, json={"value": 2}, headers={"If-Match": version})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"


def test_put_if_none_match_creates_only(client, http_app):
    path = key_path(http_app.app_id, "k")

    created = client.put(path, json={"value": 1}, headers={"If-None-Match": "*"})
    assert created.status_code == 200

    again = client.put(path, json={"value": 2}, headers={"If-None-Match": "*"})
    assert again.status_code == 412
    assert error_code(again) == "KV_VERSION_MISMATCH"
    assert client.get(path).json()["value"] == 1
    assert client.get(path).json()["version"] == created.json()["version"]


def test_put_if_none_match_expired_key(client, http_app, database):
    path = key_path(http_app.app_id, "k")
    client.put(path, json={"value": 1, "ttl": 60})
    expire_now(database, http_app.app_id, "k")

    response = client.put(path, json={"value": 2}, headers={"If-None-Match": "*"})

    assert response.status_code == 200
    assert client.get(path).json()["value"] == 2


def test_put_if_none_match_etag_is_400(client, http_app):
    path = key_path(http_app.app_id, "k")
    etag = client.put(path, json={"value": 1}).headers["etag"]

    response = client.put(path, json={"value": 2}, headers={"If-None-Match": etag})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"


# DELETE


def test_delete_existing_then_missing(client, http_app):
    path = key_path(http_app.app_id, "k")
    client.put(path, json={"value": 1})

    first = client.delete(path)
    assert first.status_code == 200
    assert first.json() == {"deleted": True}
    assert client.get(path).status_code == 404

    second = client.delete(path)
    assert second.status_code == 200
    assert second.json() == {"deleted": False}


def test_delete_if_match(client, http_app):
    path = key_path(http_app.app_id, "k")
    stale = client.put(path, json={"value": 1}).headers["etag"]
    current = client.put(path, json={"value": 2}).headers["etag"]

    rejected = client.delete(path, headers={"If-Match": stale})
    assert rejected.status_code == 412
    assert error_code(rejected) == "KV_VERSION_MISMATCH"
    assert client.get(path).json()["value"] == 2

    accepted = client.delete(path, headers={"If-Match": current})
    assert accepted.status_code == 200
    assert accepted.json() == {"deleted": True}
    assert client.get(path).status_code == 404


def test_delete_if_match_missing_is_412(client, http_app):
    response = client.delete(key_path(http_app.app_id, "absent"), headers={"If-Match": "*"})

    assert response.status_code == 412
    assert error_code(response) == "KV_VERSION_MISMATCH"


# POST /kv/{key}: setnx, setex, cas


def test_setnx_creates_once(client, http_app):
    app_id = http_app.app_id

    first = post_op(client, app_id, "lock", {"op": "setnx", "value": "first", "ttl": 30})
    assert first.status_code == 200
    assert first.json() == {"created": True}

    second = post_op(client, app_id, "lock", {"op": "setnx", "value": "second"})
    assert second.status_code == 200
    assert second.json() == {"created": False}

    stored = client.get(key_path(app_id, "lock")).json()
    assert stored["value"] == "first"
    assert stored["ttl"] == 30


def test_setnx_over_expired_key(client, http_app, database):
    app_id = http_app.app_id
    client.put(key_path(app_id, "lock"), json={"value": "old", "ttl": 60})
    expire_now(database, app_id, "lock")

    response = post_op(client, app_id, "lock", {"op": "setnx", "value": "new"})

    assert response.json() == {"created": True}
    assert client.get(key_path(app_id, "lock")).json()["value"] == "new"


def test_setex_returns_key_ttl_version(client, http_app):
    app_id = http_app.app_id

    response = post_op(client, app_id, "k", {"op": "setex", "value": [1], "ttl": 90})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"key", "ttl", "version"}
    assert body["key"] == "k"
    assert body["ttl"] == 90
    stored = client.get(key_path(app_id, "k"))
    assert stored.json()["value"] == [1]
    assert stored.json()["version"] == body["version"]


@pytest.mark.parametrize("body", [{"op": "setex", "value": 1, "ttl": None}, {"op": "setex", "value": 1}])
def test_setex_without_ttl_is_400(client, http_app, body):
    response = post_op(client, http_app.app_id, "k", body)

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"
    assert client.get(key_path(http_app.app_id, "k")).status_code == 404


def test_cas_swaps_on_match(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": {"a": 1, "b": [1, 2]}, "ttl": 60})

    response = post_op(client, app_id, "k", {"op": "cas", "expected": {"b": [1, 2], "a": 1}, "next": "swapped"})

    assert response.status_code == 200
    assert response.json() == {"swapped": True}
    stored = client.get(key_path(app_id, "k")).json()
    assert stored["value"] == "swapped"
    assert stored["ttl"] == 60


def test_cas_integer_matches_decimal(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), content=b'{"value": 1}')

    response = client.post(key_path(app_id, "k"), content=b'{"op": "cas", "expected": 1.0, "next": 2}')

    assert response.json() == {"swapped": True}


def test_cas_mismatch_is_409(client, http_app):
    app_id = http_app.app_id
    version = client.put(key_path(app_id, "k"), json={"value": "current"}).json()["version"]

    response = post_op(client, app_id, "k", {"op": "cas", "expected": "other", "next": "new"})

    assert response.status_code == 409
    assert error_code(response) == "KV_CAS_MISMATCH"
    stored = client.get(key_path(app_id, "k")).json()
    assert stored["value"] == "current"
    assert stored["version"] == version


def test_cas_missing_key_mismatch_is_409(client, http_app):
    response = post_op(client, http_app.app_id, "absent", {"op": "cas", "expected": 1, "next": 2})

    assert response.status_code == 409
    assert error_code(response) == "KV_CAS_MISMATCH"
    assert client.get(key_path(http_app.app_id, "absent")).status_code == 404


def test_cas_expected_null_creates(client, http_app):
    app_id = http_app.app_id

    created = post_op(client, app_id, "k", {"op": "cas", "expected": None, "next": "new"})
    assert created.status_code == 200
    assert created.json() == {"swapped": True}
    stored = client.get(key_path(app_id, "k")).json()
    assert stored["value"] == "new"
    assert stored["ttl"] == DEFAULT_TTL

    again = post_op(client, app_id, "k", {"op": "cas", "expected": None, "next": "newer"})
    assert again.status_code == 409
    assert error_code(again) == "KV_CAS_MISMATCH"
    assert client.get(key_path(app_id, "k")).json()["value"] == "new"


def test_cas_next_null_deletes(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": "old"})

    response = post_op(client, app_id, "k", {"op": "cas", "expected": "old", "next": None})

    assert response.status_code == 200
    assert response.json() == {"swapped": True}
    assert client.get(key_path(app_id, "k")).status_code == 404


def test_cas_with_ttl(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": 1, "ttl": None})

    post_op(client, app_id, "k", {"op": "cas", "expected": 1, "next": 2, "ttl": 45})

    assert client.get(key_path(app_id, "k")).json()["ttl"] == 45


# POST /kv/{key}: incr and decr


def test_incr_decr_counts(client, http_app):
    app_id = http_app.app_id

    assert post_op(client, app_id, "n", {"op": "incr"}).json() == {"value": 1}
    assert post_op(client, app_id, "n", {"op": "incr", "by": 10}).json() == {"value": 11}
    assert post_op(client, app_id, "n", {"op": "decr"}).json() == {"value": 10}
    assert post_op(client, app_id, "n", {"op": "decr", "by": 15}).json() == {"value": -5}
    assert post_op(client, app_id, "n", {"op": "incr", "by": -5}).json() == {"value": -10}

    stored = client.get(key_path(app_id, "n")).json()
    assert stored["value"] == -10
    assert stored["ttl"] == DEFAULT_TTL


def test_decr_missing_key_starts_at_zero(client, http_app):
    response = post_op(client, http_app.app_id, "n", {"op": "decr"})

    assert response.status_code == 200
    assert response.json() == {"value": -1}


def test_incr_keeps_ttl_and_tier(client, http_app, database):
    app_id = http_app.app_id
    client.put(key_path(app_id, "n"), json={"value": 5, "ttl": 77, "ephemeral": True})

    assert post_op(client, app_id, "n", {"op": "incr"}).json() == {"value": 6}

    assert client.get(key_path(app_id, "n")).json()["ttl"] == 77
    assert tier_rows(database, app_id, "n") == {"entries": 0, "ephemeral_entries": 1}


def test_incr_invalid_by_is_400(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "n"), json={"value": 3})
    cases = [(op, by) for op in ("incr", "decr") for by in ("1.0", '"2"', "true", "null", "1e2", "2.5", "[1]")]

    observed = {}
    for op, by in cases:
        response = client.post(key_path(app_id, "n"), content=f'{{"op": "{op}", "by": {by}}}'.encode())
        observed[(op, by)] = outcome(response)

    assert observed == dict.fromkeys(cases, INVALID)
    assert client.get(key_path(app_id, "n")).json()["value"] == 3


@pytest.mark.parametrize("op", ["incr", "decr"])
def test_incr_not_a_counter_is_409(client, http_app, op):
    app_id = http_app.app_id
    stored_values = ["2.5", '"3"', "true", "1.0", "[1]", '{"n": 1}', "-0.5", '"text"']
    before = {}
    for index, stored in enumerate(stored_values):
        path = key_path(app_id, f"n{index}")
        client.put(path, content=f'{{"value": {stored}}}'.encode())
        before[stored] = client.get(path).text

    observed = {stored: outcome(post_op(client, app_id, f"n{index}", {"op": op})) for index, stored in enumerate(stored_values)}
    after = {stored: client.get(key_path(app_id, f"n{index}")).text for index, stored in enumerate(stored_values)}

    assert observed == dict.fromkeys(stored_values, (409, "KV_NOT_A_COUNTER"))
    assert after == before


def test_incr_overflow_is_409(client, http_app):
    """A result outside the signed 64-bit range is rejected and the stored
    value keeps its exact digits."""
    app_id = http_app.app_id
    cases = [
        (2**63 - 1, "incr", 1),
        (2**63 - 10, "incr", 10),
        (-(2**63), "decr", 1),
        (-(2**63), "incr", -1),
        (0, "decr", -(2**63)),
        (2**63, "incr", 1),
        (-(2**63) - 1, "decr", 1),
    ]
    for index, (start, _, _) in enumerate(cases):
        client.put(key_path(app_id, f"n{index}"), json={"value": start})

    observed = {}
    after = {}
    for index, (start, op, by) in enumerate(cases):
        observed[(start, op, by)] = outcome(post_op(client, app_id, f"n{index}", {"op": op, "by": by}))
        after[(start, op, by)] = exact_json(client.get(key_path(app_id, f"n{index}")).text)["value"]

    assert observed == dict.fromkeys(observed, (409, "KV_COUNTER_OVERFLOW"))
    assert after == {case: str(case[0]) for case in cases}


def test_incr_reaches_int64_bounds(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "max"), json={"value": 2**63 - 2})
    client.put(key_path(app_id, "min"), json={"value": -(2**63) + 1})
    client.put(key_path(app_id, "minus-one"), json={"value": -1})

    assert post_op(client, app_id, "max", {"op": "incr"}).text == '{"value":9223372036854775807}'
    assert post_op(client, app_id, "min", {"op": "decr"}).text == '{"value":-9223372036854775808}'
    # -1 - (-2^63) fits, although -(-2^63) alone does not.
    decr_min = post_op(client, app_id, "minus-one", {"op": "decr", "by": -(2**63)})
    assert decr_min.text == '{"value":9223372036854775807}'


def test_incr_by_beyond_int64_is_400(client, http_app):
    amounts = [2**63, -(2**63) - 1, 2**64]

    observed = {by: outcome(post_op(client, http_app.app_id, "n", {"op": "incr", "by": by})) for by in amounts}

    assert observed == dict.fromkeys(amounts, INVALID)
    assert client.get(key_path(http_app.app_id, "n")).status_code == 404


# POST /kv/{key}: expire, ttl, exists


def test_expire_sets_and_removes_ttl(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": 1})

    assert post_op(client, app_id, "k", {"op": "expire", "ttl": 120}).json() == {"updated": True}
    assert client.get(key_path(app_id, "k")).json()["ttl"] == 120

    assert post_op(client, app_id, "k", {"op": "expire", "ttl": None}).json() == {"updated": True}
    assert client.get(key_path(app_id, "k")).json()["ttl"] is None


def test_expire_missing_key(client, http_app):
    response = post_op(client, http_app.app_id, "absent", {"op": "expire", "ttl": 10})

    assert response.status_code == 200
    assert response.json() == {"updated": False}
    assert client.get(key_path(http_app.app_id, "absent")).status_code == 404


def test_expire_without_ttl_is_400(client, http_app):
    client.put(key_path(http_app.app_id, "k"), json={"value": 1, "ttl": 60})

    response = post_op(client, http_app.app_id, "k", {"op": "expire"})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"
    assert client.get(key_path(http_app.app_id, "k")).json()["ttl"] == 60


def test_ttl_op(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "expiring"), json={"value": 1, "ttl": 300})
    client.put(key_path(app_id, "forever"), json={"value": 1, "ttl": None})

    assert post_op(client, app_id, "expiring", {"op": "ttl"}).json() == {"ttl": 300, "exists": True}
    assert post_op(client, app_id, "forever", {"op": "ttl"}).json() == {"ttl": None, "exists": True}
    assert post_op(client, app_id, "absent", {"op": "ttl"}).json() == {"ttl": None, "exists": False}


def test_ttl_rounds_up(client, http_app, database):
    """A key with less than a second left reports 1, never 0."""
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": 1, "ttl": 60})
    database.execute(
        "UPDATE kvapi_data.entries SET expires_at = now() + interval '300 milliseconds' WHERE app_id = %s AND key = 'k'",
        [app_id],
    )

    assert post_op(client, app_id, "k", {"op": "ttl"}).json() == {"ttl": 1, "exists": True}


def test_exists_op(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": False})

    assert post_op(client, app_id, "k", {"op": "exists"}).json() == {"exists": True}
    assert post_op(client, app_id, "absent", {"op": "exists"}).json() == {"exists": False}


# POST /kv: mget and mset


def test_mget_values_in_order(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "a"), json={"value": "A"})
    client.put(key_path(app_id, "b"), json={"value": {"x": 1}})

    response = client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": ["b", "missing", "a", "b"]})

    assert response.status_code == 200
    assert response.json() == {"values": [{"x": 1}, None, "A", {"x": 1}]}


def test_mget_empty_and_limits(client, http_app):
    app_id = http_app.app_id

    assert client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": []}).json() == {"values": []}

    thousand = client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": [f"k{i}" for i in range(1000)]})
    assert thousand.status_code == 200
    assert thousand.json() == {"values": [None] * 1000}

    too_many = client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": [f"k{i}" for i in range(1001)]})
    assert too_many.status_code == 400
    assert error_code(too_many) == "KV_INVALID_REQUEST"


def test_mget_invalid_keys_is_400(client, http_app):
    key_lists = {"empty key": [""], "long key": ["k" * 1025], "nul in key": ["a\u0000b"], "number": [1], "string": "a", "null": None}

    observed = {
        name: outcome(client.post(f"/v1/{http_app.app_id}/kv", json={"op": "mget", "keys": keys}))
        for name, keys in key_lists.items()
    }

    assert observed == dict.fromkeys(key_lists, INVALID)


def test_mset_writes_all(client, http_app, database):
    app_id = http_app.app_id

    response = client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": {"a": 1, "b": [2], "c/d": "3"}, "ttl": 40, "ephemeral": True})

    assert response.status_code == 200
    assert response.json() == {"count": 3}
    values = client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": ["a", "b", "c/d"]}).json()
    assert values == {"values": [1, [2], "3"]}
    assert client.get(key_path(app_id, "c/d")).json()["ttl"] == 40
    assert tier_rows(database, app_id, "a") == {"entries": 0, "ephemeral_entries": 1}


def test_mset_empty(client, http_app):
    response = client.post(f"/v1/{http_app.app_id}/kv", json={"op": "mset", "entries": {}})

    assert response.status_code == 200
    assert response.json() == {"count": 0}


@pytest.mark.parametrize(
    "entries",
    [
        {"a": 10, "b": None, "c": 30},
        {"a": 10, "b": "x\u0000y", "c": 30},
        {"a": 10, "": 20, "c": 30},
        {"a": 10, "k" * 1025: 20, "c": 30},
    ],
)
def test_mset_all_or_nothing(client, http_app, entries):
    app_id = http_app.app_id
    client.put(key_path(app_id, "a"), json={"value": "old"})

    response = client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": entries})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"
    values = client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": ["a", "b", "c"]}).json()
    assert values == {"values": ["old", None, None]}


def test_mset_invalid_ttl_writes_nothing(client, http_app):
    app_id = http_app.app_id
    ttls = ["0", "-1", "1.5", "1.0", '"10"', "true", "2147483648"]

    observed = {}
    for ttl in ttls:
        body = f'{{"op": "mset", "entries": {{"a": 1}}, "ttl": {ttl}}}'.encode()
        observed[ttl] = outcome(client.post(f"/v1/{app_id}/kv", content=body))

    assert observed == dict.fromkeys(ttls, INVALID)
    assert client.get(key_path(app_id, "a")).status_code == 404


def test_mset_entries_not_object_is_400(client, http_app):
    entries_texts = ['[["a", 1]]', '"a"', "1", "null"]

    observed = {}
    for entries in entries_texts:
        body = f'{{"op": "mset", "entries": {entries}}}'.encode()
        observed[entries] = outcome(client.post(f"/v1/{http_app.app_id}/kv", content=body))

    assert observed == dict.fromkeys(entries_texts, INVALID)


def test_mset_over_1000_entries_is_400(client, http_app):
    entries = {f"k{i}": i for i in range(1001)}

    response = client.post(f"/v1/{http_app.app_id}/kv", json={"op": "mset", "entries": entries})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"
    assert client.get(key_path(http_app.app_id, "k0")).status_code == 404


# GET /kv: list


def test_list_keys_with_ttl(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "b"), json={"value": 1, "ttl": None})
    client.put(key_path(app_id, "a"), json={"value": 1, "ttl": 50})

    response = client.get(f"/v1/{app_id}/kv")

    assert response.status_code == 200
    assert response.json() == {"keys": [{"key": "a", "ttl": 50, "ephemeral": False}, {"key": "b", "ttl": None, "ephemeral": False}], "cursor": None}


def test_list_prefix(client, http_app):
    app_id = http_app.app_id
    for key in ["user:1", "user:2", "user:", "users", "usex", "admin:1"]:
        client.put(key_path(app_id, key), json={"value": 1, "ttl": None})

    response = client.get(f"/v1/{app_id}/kv", params={"prefix": "user:"})

    assert response.status_code == 200
    assert response.json() == {
        "keys": [
            {"key": "user:", "ttl": None, "ephemeral": False},
            {"key": "user:1", "ttl": None, "ephemeral": False},
            {"key": "user:2", "ttl": None, "ephemeral": False},
        ],
        "cursor": None,
    }


def test_list_skips_expired(client, http_app, database):
    app_id = http_app.app_id
    client.put(key_path(app_id, "live"), json={"value": 1, "ttl": None})
    client.put(key_path(app_id, "dead"), json={"value": 1, "ttl": 60, "ephemeral": True})
    expire_now(database, app_id, "dead")

    assert client.get(f"/v1/{app_id}/kv").json() == {"keys": [{"key": "live", "ttl": None, "ephemeral": False}], "cursor": None}


def test_list_pages_visit_each_once(client, http_app):
    app_id = http_app.app_id
    keys = [f"k{i:02d}" for i in range(23)]
    durable = {key: i for i, key in enumerate(keys) if i % 2 == 0}
    ephemeral = {key: i for i, key in enumerate(keys) if i % 2 == 1}
    client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": durable})
    client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": ephemeral, "ephemeral": True})

    seen = []
    pages = 0
    cursor = None
    while True:
        params = {"limit": "5"}
        if cursor is not None:
            params["cursor"] = cursor
        response = client.get(f"/v1/{app_id}/kv", params=params)
        assert response.status_code == 200
        page = response.json()
        pages += 1
        seen.extend(entry["key"] for entry in page["keys"])
        cursor = page["cursor"]
        if cursor is None:
            break
        assert len(page["keys"]) == 5

    assert seen == keys
    assert pages == 5


def test_list_exact_page_ends_with_null_cursor(client, http_app):
    app_id = http_app.app_id
    client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": {"a": 1, "b": 2, "c": 3, "d": 4}})

    first = client.get(f"/v1/{app_id}/kv", params={"limit": "2"}).json()
    assert [entry["key"] for entry in first["keys"]] == ["a", "b"]
    assert isinstance(first["cursor"], str)

    second = client.get(f"/v1/{app_id}/kv", params={"limit": "2", "cursor": first["cursor"]}).json()
    assert [entry["key"] for entry in second["keys"]] == ["c", "d"]
    assert second["cursor"] is None


def test_list_prefix_pages(client, http_app):
    app_id = http_app.app_id
    entries = {f"p:{i}": i for i in range(5)} | {"q": 1, "o": 1}
    client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": entries})

    first = client.get(f"/v1/{app_id}/kv", params={"prefix": "p:", "limit": "3"}).json()
    second = client.get(f"/v1/{app_id}/kv", params={"prefix": "p:", "limit": "3", "cursor": first["cursor"]}).json()

    assert [entry["key"] for entry in first["keys"]] == ["p:0", "p:1", "p:2"]
    assert [entry["key"] for entry in second["keys"]] == ["p:3", "p:4"]
    assert second["cursor"] is None


def test_list_invalid_limit_is_400(client, http_app):
    limits = ["0", "1001", "abc", "", "-1", "1.5", "99999999999", " 5"]

    observed = {limit: outcome(client.get(f"/v1/{http_app.app_id}/kv", params={"limit": limit})) for limit in limits}

    assert observed == dict.fromkeys(limits, INVALID)


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_list_limit_bounds_accepted(client, http_app, limit):
    response = client.get(f"/v1/{http_app.app_id}/kv", params={"limit": limit})

    assert response.status_code == 200
    assert response.json() == {"keys": [], "cursor": None}


def test_list_invalid_cursor_is_400(client, http_app):
    cursors = ["@@@", "%%%", "_w", "a", "\x00"]

    observed = {cursor: outcome(client.get(f"/v1/{http_app.app_id}/kv", params={"cursor": cursor})) for cursor in cursors}

    assert observed == dict.fromkeys(cursors, INVALID)


# Values


def test_value_numbers_keep_digits(client, http_app):
    cases = {
        "9007199254740993": "9007199254740993",
        "-9007199254740993": "-9007199254740993",
        "18446744073709551617": "18446744073709551617",
        "123456789012345678901234567890123456789": "123456789012345678901234567890123456789",
        "1.10": "1.10",
        "0.1000000000000000000000000001": "0.1000000000000000000000000001",
        "1.000": "1.000",
        # PostgreSQL stores jsonb numbers as numeric, which expands
        # exponents and has no negative zero.
        "1E+2": "100",
        "2.50e-3": "0.00250",
        "-0.0": "0.0",
    }
    path = key_path(http_app.app_id, "n")

    observed = {}
    for sent in cases:
        put = client.put(path, content=f'{{"value": {sent}}}'.encode())
        observed[sent] = (put.status_code, exact_json(client.get(path).text)["value"])

    assert observed == {sent: (200, stored) for sent, stored in cases.items()}


def test_value_big_integers_exact(client, http_app):
    app_id = http_app.app_id
    client.put(key_path(app_id, "big"), content=b'{"value": {"a": 9007199254740993, "b": [18446744073709551617, 1.10]}}')

    got = client.get(key_path(app_id, "big"))
    assert exact_json(got.text)["value"] == {"a": "9007199254740993", "b": ["18446744073709551617", "1.10"]}

    mget = client.post(f"/v1/{app_id}/kv", json={"op": "mget", "keys": ["big"]})
    assert exact_json(mget.text)["values"] == [{"a": "9007199254740993", "b": ["18446744073709551617", "1.10"]}]


def test_value_decimal_text_exact(client, http_app):
    path = key_path(http_app.app_id, "n")
    client.put(path, content=b'{"value": 1.10}')

    assert '"value":1.10,' in client.get(path).text


def test_value_json_types_round_trip(client, http_app):
    values = ["", "text", 0, -1, True, False, [], {}, [None], {"a": None}, "😀 日本 \u00e9", "\\\"", 1.5, {"nested": {"list": [1, "two", None]}}]
    path = key_path(http_app.app_id, "v")

    read_back = []
    for value in values:
        client.put(path, json={"value": value})
        read_back.append(client.get(path).json()["value"])

    assert read_back == values


def test_value_duplicate_object_keys_last_wins(client, http_app):
    path = key_path(http_app.app_id, "v")
    client.put(path, content=b'{"value": {"a": 1, "a": 2}}')

    assert client.get(path).json()["value"] == {"a": 2}


def test_value_invalid_is_400(client, http_app):
    """null, U+0000 anywhere in a string and lone surrogates cannot be stored."""
    path = key_path(http_app.app_id, "v")
    client.put(path, json={"value": "before"})
    bodies = [
        b'{"value": null}',
        b'{"value": "a\\u0000b"}',
        b'{"value": {"k\\u0000": 1}}',
        b'{"value": ["\\u0000"]}',
        b'{"value": "\\ud800"}',
        b'{"value": "\\udc00x"}',
    ]

    observed = {body: outcome(client.put(path, content=body)) for body in bodies}

    assert observed == dict.fromkeys(bodies, INVALID)
    assert client.get(path).json()["value"] == "before"


def test_put_missing_value_is_400(client, http_app):
    response = client.put(key_path(http_app.app_id, "v"), json={"ttl": 10})

    assert response.status_code == 400
    assert error_code(response) == "KV_INVALID_REQUEST"
    assert "value" in response.json()["error"]["message"]


# TTL validation


INVALID_TTLS = ["0", "-1", "1.5", "1.0", '"10"', "true", "false", "2147483648", "1e2", "[]", "{}", "99999999999999999999999"]


def test_put_invalid_ttl_is_400(client, http_app):
    path = key_path(http_app.app_id, "k")

    observed = {ttl: outcome(client.put(path, content=f'{{"value": 1, "ttl": {ttl}}}'.encode())) for ttl in INVALID_TTLS}

    assert observed == dict.fromkeys(INVALID_TTLS, INVALID)
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("op", ["setnx", "setex"])
def test_write_ops_invalid_ttl_is_400(client, http_app, op):
    path = key_path(http_app.app_id, "k")

    observed = {}
    for ttl in INVALID_TTLS:
        body = f'{{"op": "{op}", "value": 1, "ttl": {ttl}}}'.encode()
        observed[ttl] = outcome(client.post(path, content=body))

    assert observed == dict.fromkeys(INVALID_TTLS, INVALID)
    assert client.get(path).status_code == 404


def test_expire_invalid_ttl_is_400(client, http_app):
    path = key_path(http_app.app_id, "k")
    client.put(path, json={"value": 1, "ttl": 60})

    observed = {ttl: outcome(client.post(path, content=f'{{"op": "expire", "ttl": {ttl}}}'.encode())) for ttl in INVALID_TTLS}

    assert observed == dict.fromkeys(INVALID_TTLS, INVALID)
    assert client.get(path).json()["ttl"] == 60


def test_ttl_maximum_accepted(client, http_app):
    path = key_path(http_app.app_id, "k")

    response = client.put(path, json={"value": 1, "ttl": 2147483647})

    assert response.status_code == 200
    assert response.json()["ttl"] == 2147483647
    assert client.get(path).json()["ttl"] == 2147483647


def test_ttl_one_accepted(client, http_app):
    response = client.put(key_path(http_app.app_id, "k"), json={"value": 1, "ttl": 1})

    assert response.status_code == 200
    assert response.json()["ttl"] == 1


# Versions and tiers


def test_versions_change_on_every_write(client, http_app):
    app_id = http_app.app_id
    path = key_path(app_id, "k")
    versions = [
        client.put(path, json={"value": 1}).json()["version"],
        client.put(path, json={"value": 1}).json()["version"],
        post_op(client, app_id, "k", {"op": "setex", "value": 1, "ttl": 60}).json()["version"],
    ]
    post_op(client, app_id, "k", {"op": "incr"})
    versions.append(client.get(path).json()["version"])
    post_op(client, app_id, "k", {"op": "expire", "ttl": 90})
    versions.append(client.get(path).json()["version"])
    post_op(client, app_id, "k", {"op": "cas", "expected": 2, "next": 3})
    versions.append(client.get(path).json()["version"])
    client.put(path, json={"value": 3, "keepTtl": True, "ephemeral": True})
    versions.append(client.get(path).json()["version"])
    client.delete(path)
    post_op(client, app_id, "k", {"op": "setnx", "value": 1})
    versions.append(client.get(path).json()["version"])
    client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": {"k": 1}})
    versions.append(client.get(path).json()["version"])

    assert len(set(versions)) == len(versions)


def test_etag_matches_version_after_each_write(client, http_app):
    path = key_path(http_app.app_id, "k")
    for value in [1, 2, 3]:
        put = client.put(path, json={"value": value})
        got = client.get(path)
        assert put.headers["etag"] == f'"{put.json()["version"]}"'
        assert got.headers["etag"] == put.headers["etag"]


def test_tier_move_leaves_one_row(client, http_app, database):
    app_id = http_app.app_id
    path = key_path(app_id, "k")

    client.put(path, json={"value": "ephemeral", "ephemeral": True})
    assert tier_rows(database, app_id, "k") == {"entries": 0, "ephemeral_entries": 1}

    client.put(path, json={"value": "durable", "ephemeral": False})
    assert tier_rows(database, app_id, "k") == {"entries": 1, "ephemeral_entries": 0}
    assert client.get(path).json()["value"] == "durable"
    assert client.get(f"/v1/{app_id}/kv").json() == {"keys": [{"key": "k", "ttl": DEFAULT_TTL, "ephemeral": False}], "cursor": None}

    client.put(path, json={"value": "back", "ephemeral": True})
    assert tier_rows(database, app_id, "k") == {"entries": 0, "ephemeral_entries": 1}
    assert client.get(path).json()["value"] == "back"
    assert client.get(f"/v1/{app_id}/kv").json() == {"keys": [{"key": "k", "ttl": DEFAULT_TTL, "ephemeral": True}], "cursor": None}
    assert client.delete(path).json() == {"deleted": True}
    assert tier_rows(database, app_id, "k") == {"entries": 0, "ephemeral_entries": 0}


def test_tier_move_by_mset(client, http_app, database):
    app_id = http_app.app_id
    client.put(key_path(app_id, "k"), json={"value": 1, "ephemeral": True})

    client.post(f"/v1/{app_id}/kv", json={"op": "mset", "entries": {"k": 2}})

    assert tier_rows(database, app_id, "k") == {"entries": 1, "ephemeral_entries": 0}
    assert client.get(f"/v1/{app_id}/kv").json()["keys"] == [{"key": "k", "ttl": DEFAULT_TTL, "ephemeral": False}]
