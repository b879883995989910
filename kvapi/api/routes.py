"""HTTP routes of the key-value API.

Each handler authenticates, decodes its arguments, and makes one call of a
kvapi SQL function, which enforces the contract. Handlers build responses
as bytes with msgspec, copying stored JSON values through unparsed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response, delete, get, head, post, put
from litestar.params import FromPath, FromQuery

from kvapi import statements
from kvapi.api import bodies
from kvapi.api.auth import CredentialCache, parse_authorization
from kvapi.api.keypath import APP_ID_SCOPE, KEY_ERROR_SCOPE, KEY_SCOPE
from kvapi.database import translate_error
from kvapi.errors import KvError

logger = logging.getLogger(__name__)

JSON = "application/json"
# p_requester of an anonymous request; see kvapi_data.check_access.
ANONYMOUS = "{}"
encode_json = msgspec.json.encode
_TOUCH_SECONDS = re.compile(r"[0-9]{1,20}")
# The largest TTL kvapi_data.ttl_seconds accepts.
MAX_TTL_SECONDS = 2147483647
_LIMIT = re.compile(r"[0-9]{1,9}")
APP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# (status, extra headers, JSON body) of a response, shared by the Litestar
# routes and the raw ASGI handlers.
ResponseParts = tuple[int, dict[str, str] | None, bytes]


def parts_response(parts: ResponseParts) -> Response:
    status, headers, body = parts
    return Response(content=body, status_code=status, media_type=JSON, headers=headers)


def json_response(content: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=encode_json(content), status_code=status_code, media_type=JSON, headers=headers)


def etag(version: str) -> str:
    return f'"{version}"'


def parse_if_match(header: str | None) -> list[str] | None:
    """Return the versions an If-Match header lists ("*" included), or None.
    Weak validators (W/"...") never match, since If-Match compares strongly."""
    if header is None:
        return None
    versions = []
    for item in header.split(","):
        item = item.strip()
        if item == "*":
            versions.append("*")
        elif len(item) >= 2 and item[0] == '"' and item[-1] == '"':
            versions.append(item[1:-1])
        elif item.startswith("W/"):
            continue
        else:
            raise KvError("KV_INVALID_REQUEST", f"invalid If-Match header {header!r}: expected quoted ETags or *")
    return versions


def parse_if_none_match(header: str | None) -> bool:
    if header is None:
        return False
    if header.strip() != "*":
        raise KvError(
            "KV_INVALID_REQUEST",
            f"invalid If-None-Match header {header!r}: only If-None-Match: * (create only) is supported",
        )
    return True


def key_from_scope(request: Request) -> tuple[str, str]:
    """Return (app id, key) decoded from the raw path by KeyPathRouter."""
    error = request.scope.get(KEY_ERROR_SCOPE)
    if error is not None:
        raise KvError("KV_INVALID_REQUEST", error)
    key = request.scope.get(KEY_SCOPE)
    if key is None:
        raise KvError("KV_NOT_FOUND", "route not found")
    if key == "":
        raise KvError("KV_INVALID_REQUEST", "invalid key: the key is empty; send /v1/{app_id}/kv/{key}")
    return request.scope[APP_ID_SCOPE], key


# Failures that happen before the SQL function counts the request, or that
# are the rate limit itself, are not counted again.
_UNCOUNTED_FAILURES = frozenset({"KV_RATE_LIMITED", "KV_APP_NOT_FOUND", "KV_UNAUTHORIZED"})


async def run(request: Request, app_id: str, statement: str, params: dict[str, Any], **options: bool) -> tuple[Any, ...] | None:
    """Run one statement for a Litestar request; see call_function."""
    return await call_function(request.app.state, request.headers.get("authorization"), app_id, statement, params, **options)


async def call_function(
    state: Any,
    authorization: str | None,
    app_id: str,
    statement: str,
    params: dict[str, Any],
    *,
    service_only: bool = False,
    rate_limited: bool = True,
) -> tuple[Any, ...] | None:
    """Authenticate a request for app_id, run one statement, and return its row.

    state is the app state holding the pool and the credential cache, and
    authorization the request's Authorization header. Service keys run the
    statement as a trusted caller. End users and anonymous requests pass
    their identity as p_requester, so the SQL function checks the access
    rules in the same call. Database errors become KvErrors by their
    SQLSTATE, while connection failures and pool timeouts propagate to the
    caller's 503 handling."""
    if not APP_ID.fullmatch(app_id):
        # No such app can exist (kvapi_data.apps checks the same pattern).
        raise KvError("KV_APP_NOT_FOUND", f"app {app_id!r} not found")
    credentials = parse_authorization(authorization)
    cache: CredentialCache = state.credentials
    params["app_id"] = app_id
    async with state.pool.connection() as connection:
        try:
            if credentials.is_service:
                await cache.authenticate_service_key(connection, app_id, credentials.key_hash)
                params["requester"] = None
            elif service_only:
                # Raises KV_APP_NOT_FOUND for an unknown app, else KV_UNAUTHORIZED.
                await connection.execute(statements.AUTHENTICATE, {"app_id": app_id, "key_hash": None})
            elif credentials.token is not None:
                params["requester"] = await cache.requester_for_token(connection, app_id, credentials.token)
            else:
                params["requester"] = ANONYMOUS
            cursor = await connection.execute(statement, params)
            return await cursor.fetchone()
        except psycopg.Error as error:
            translated = translate_error(error)
            if translated is None:
                raise
            if service_only and translated.code == "KV_UNAUTHORIZED" and not credentials.is_service:
                raise KvError("KV_UNAUTHORIZED", "this route needs a service key: send Authorization: Bearer <service key>") from None
            if rate_limited and translated.code not in _UNCOUNTED_FAILURES:
                await count_failed_request(connection, app_id, translated.code)
            raise translated from None


async def count_failed_request(connection: psycopg.AsyncConnection, app_id: str, code: str) -> None:
    """Count a failed operation against the rate limit: its own count was
    rolled back with it. A failure to count is logged, not raised, so the
    client still gets the operation's error."""
    try:
        await connection.execute(statements.COUNT_REQUEST, {"app_id": app_id})
    except psycopg.Error as error:
        logger.warning(
            "failed to count a failed request against the rate limit",
            extra={"event": "request.count_failed", "app_id": app_id, "code": code, "error": str(error)},
        )


def touch_param(touch: str | None) -> str | None:
    if touch is None:
        return None
    if touch == "true":
        return "true"
    if _TOUCH_SECONDS.fullmatch(touch) and 1 <= int(touch) <= MAX_TTL_SECONDS:
        return touch
    raise KvError(
        "KV_INVALID_REQUEST",
        f"invalid touch {touch!r}: use touch=true for the default TTL or touch=N for N seconds from 1 to {MAX_TTL_SECONDS}",
    )


@get(
    "/v1/{app_id:str}/kv/{key:path}",
    summary="Read a key",
    description="200 `{key, value, ttl, version}` with an `ETag`; 404 `{value: null, error}`. "
    "`?touch=true` resets an expiring key's TTL to the default, `?touch=N` to N seconds; "
    "when `touch` is repeated, the last one counts.",
)
async def get_key(request: Request, touch: FromQuery[str | None] = None) -> Response:
    app_id, key = key_from_scope(request)
    return parts_response(await read_key(request.app.state, request.headers.get("authorization"), app_id, key, touch))


async def read_key(state: Any, authorization: str | None, app_id: str, key: str, touch: str | None) -> ResponseParts:
    """Read one key for GET and return (status, extra headers, JSON body).
    The Litestar route and KeyPathRouter's raw ASGI path share it. Raises
    KvError and database errors like every handler."""
    row = await call_function(state, authorization, app_id, statements.GET, {"key": key, "touch": touch_param(touch)})
    value, version, ttl = row
    if value is None:
        body = {"value": None, "error": {"code": "KV_NOT_FOUND", "message": f"key {key!r} not found"}}
        return 404, None, encode_json(body)
    body = {"key": key, "value": msgspec.Raw(value), "ttl": ttl, "version": version}
    return 200, {"ETag": etag(version)}, encode_json(body)


@head("/v1/{app_id:str}/kv/{key:path}", summary="Check that a key exists", description="200 when the key exists, else 404; no body.")
async def head_key(request: Request) -> Response[None]:
    app_id, key = key_from_scope(request)
    (found,) = await run(request, app_id, statements.EXISTS, {"key": key})
    return Response(content=b"", status_code=200 if found else 404)


@put(
    "/v1/{app_id:str}/kv/{key:path}",
    summary="Write a key",
    description="Body `{value, ttl?, keepTtl?, ephemeral?}`; 200 `{key, ttl, version}` with an `ETag`. "
    "Without `ttl` the key gets the plan's default TTL, even when it had no expiry; `keepTtl: true` keeps the current one. "
    "`If-Match: \"<version>\"` makes the write conditional and `If-None-Match: *` create-only (412 otherwise).",
    status_code=200,
)
async def put_key(request: Request) -> Response:
    app_id, key = key_from_scope(request)
    return parts_response(await write_key(request.app.state, request.headers, app_id, key, await request.body()))


async def write_key(state: Any, headers: Mapping[str, str], app_id: str, key: str, body: bytes) -> ResponseParts:
    """Write one key for PUT and return (status, extra headers, JSON body).
    headers maps lower-case request header names to values. The Litestar
    route and KeyPathRouter's raw ASGI path share it."""
    decoded = bodies.decode(body, bodies.PutBody, '{"value": ..., "ttl"?, "keepTtl"?, "ephemeral"?}')
    params = {
        "key": key,
        "value": bodies.raw_text(decoded.value),
        "ttl": bodies.ttl_param(decoded.ttl),
        "keep_ttl": decoded.keep_ttl,
        "ephemeral": decoded.ephemeral,
        "if_match": parse_if_match(headers.get("if-match")),
        "if_absent": parse_if_none_match(headers.get("if-none-match")),
    }
    version, ttl = await call_function(state, headers.get("authorization"), app_id, statements.SET, params)
    return 200, {"ETag": etag(version)}, encode_json({"key": key, "ttl": ttl, "version": version})


@delete(
    "/v1/{app_id:str}/kv/{key:path}",
    summary="Delete a key",
    description="200 `{deleted}`; `If-Match` makes it conditional (412 otherwise).",
    status_code=200,
)
async def delete_key(request: Request) -> Response:
    app_id, key = key_from_scope(request)
    params = {"key": key, "if_match": parse_if_match(request.headers.get("if-match"))}
    (deleted,) = await run(request, app_id, statements.DELETE, params)
    return json_response({"deleted": deleted})


@post(
    "/v1/{app_id:str}/kv/{key:path}",
    summary="Run setnx, setex, cas, incr, decr, expire, ttl or exists on a key",
    description="Body `{op, ...arguments}`. Responses: setnx `{created}`; setex `{key, ttl, version}`; "
    "cas `{swapped: true}` or 409 `KV_CAS_MISMATCH`; incr and decr `{value}`; expire `{updated}`; "
    "ttl `{ttl, exists}`; exists `{exists}`.",
    status_code=200,
)
async def post_key(request: Request) -> Response:
    app_id, key = key_from_scope(request)
    op = bodies.decode(
        await request.body(), bodies.KeyOp,
        '{"op": "setnx"|"setex"|"cas"|"incr"|"decr"|"expire"|"ttl"|"exists", ...arguments}',
    )
    params: dict[str, Any] = {"key": key}

    if isinstance(op, bodies.SetnxOp):
        params.update(value=bodies.raw_text(op.value), ttl=bodies.ttl_param(op.ttl), ephemeral=op.ephemeral)
        (created,) = await run(request, app_id, statements.SETNX, params)
        return json_response({"created": created})

    if isinstance(op, bodies.SetexOp):
        if op.ttl is msgspec.UNSET or op.ttl is None:
            raise KvError("KV_INVALID_REQUEST", "invalid ttl: setex requires a ttl in seconds; use set for a key without expiry")
        params.update(value=bodies.raw_text(op.value), ttl=bodies.ttl_param(op.ttl), ephemeral=op.ephemeral)
        version, ttl = await run(request, app_id, statements.SETEX, params)
        return json_response({"key": key, "ttl": ttl, "version": version}, headers={"ETag": etag(version)})

    if isinstance(op, bodies.CasOp):
        params.update(expected=bodies.raw_text(op.expected), next=bodies.raw_text(op.next), ttl=bodies.ttl_param(op.ttl))
        (swapped,) = await run(request, app_id, statements.CAS, params)
        if not swapped:
            raise KvError("KV_CAS_MISMATCH", f"cas on key {key!r} failed: the current value does not match expected")
        return json_response({"swapped": True})

    if isinstance(op, (bodies.IncrOp, bodies.DecrOp)):
        params["by"] = bodies.check_by(op.by)
        statement = statements.INCR if isinstance(op, bodies.IncrOp) else statements.DECR
        (value,) = await run(request, app_id, statement, params)
        return json_response({"value": value})

    if isinstance(op, bodies.ExpireOp):
        if op.ttl is msgspec.UNSET:
            raise KvError("KV_INVALID_REQUEST", "invalid ttl: expire requires ttl (seconds, or null to remove the expiry)")
        params["ttl"] = bodies.ttl_param(op.ttl)
        (updated,) = await run(request, app_id, statements.EXPIRE, params)
        return json_response({"updated": updated})

    if isinstance(op, bodies.TtlOp):
        ttl, exists = await run(request, app_id, statements.TTL, params)
        return json_response({"ttl": ttl, "exists": exists})

    (exists,) = await run(request, app_id, statements.EXISTS, params)
    return json_response({"exists": exists})


@post(
    "/v1/{app_id:str}/kv",
    summary="Run mget or mset",
    description="`{op: \"mget\", keys}` returns `{values}` (null where missing); "
    "`{op: \"mset\", entries: {key: value}, ttl?, ephemeral?}` returns `{count}`, all or nothing.",
    status_code=200,
)
async def post_batch(request: Request, app_id: FromPath[str]) -> Response:
    op = bodies.decode(
        await request.body(), bodies.BatchOp,
        '{"op": "mget", "keys": [...]} or {"op": "mset", "entries": {...}, "ttl"?, "ephemeral"?}',
    )
    if isinstance(op, bodies.MgetOp):
        if any("\x00" in key for key in op.keys):
            raise KvError("KV_INVALID_REQUEST", "invalid key: keys cannot contain U+0000")
        (values,) = await run(request, app_id, statements.MGET, {"keys": op.keys})
        return json_response({"values": msgspec.Raw(values)})

    params = {"entries": bodies.raw_text(op.entries), "ttl": bodies.ttl_param(op.ttl), "ephemeral": op.ephemeral}
    (count,) = await run(request, app_id, statements.MSET, params)
    return json_response({"count": count})


@get(
    "/v1/{app_id:str}/kv",
    summary="List keys (service key only)",
    description="200 `{keys: [{key, ttl, ephemeral}], cursor}` in key order; pass `cursor` back for the next page (null on the last).",
)
async def list_keys(request: Request, app_id: FromPath[str], prefix: FromQuery[str | None] = None,
    cursor: FromQuery[str | None] = None, limit: FromQuery[str | None] = None,
) -> Response:
    if limit is not None and not _LIMIT.fullmatch(limit):
        raise KvError("KV_INVALID_REQUEST", f"invalid limit {limit!r}: expected an integer from 1 to 1000")
    if prefix is not None and "\x00" in prefix:
        raise KvError("KV_INVALID_REQUEST", "invalid prefix: prefixes cannot contain U+0000")
    params = {"prefix": prefix or "", "cursor": cursor or None, "limit": int(limit) if limit else 100}
    (page,) = await run(request, app_id, statements.LIST, params, service_only=True)
    return Response(content=page, media_type=JSON)


@get("/v1/{app_id:str}/kv-rules", summary="List access rules (service key only)", description="200 `{rules: [{pattern, read, write, order}]}`.")
async def list_rules(request: Request, app_id: FromPath[str]) -> Response:
    (rules,) = await run(request, app_id, statements.LIST_RULES, {}, service_only=True, rate_limited=False)
    return Response(content=b'{"rules":' + rules + b"}", media_type=JSON)


@put(
    "/v1/{app_id:str}/kv-rules",
    summary="Expose keys matching a pattern to end users (service key only)",
    description="Body `{pattern, read, write}` with roles deny, public, authed or owner; "
    "409 `KV_EXPOSE_CONFLICT` when the pattern has other roles.",
    status_code=200,
)
async def expose(request: Request, app_id: FromPath[str]) -> Response:
    rule = bodies.decode(await request.body(), bodies.ExposeBody, '{"pattern": ..., "read": ..., "write": ...}')
    params = {"pattern": rule.pattern, "read": rule.read, "write": rule.write}
    await run(request, app_id, statements.EXPOSE, params, service_only=True, rate_limited=False)
    return json_response({"pattern": rule.pattern, "read": rule.read, "write": rule.write})


@delete(
    "/v1/{app_id:str}/kv-rules",
    summary="Remove the rule of a pattern (service key only)",
    description="200 `{removed}`.",
    status_code=200,
)
async def unexpose(request: Request, app_id: FromPath[str], pattern: FromQuery[str | None] = None) -> Response:
    if not pattern:
        raise KvError("KV_INVALID_REQUEST", "missing pattern: send DELETE /v1/{app_id}/kv-rules?pattern=...")
    (removed,) = await run(request, app_id, statements.UNEXPOSE, {"pattern": pattern}, service_only=True, rate_limited=False)
    return json_response({"removed": removed})


@post(
    "/v1/{app_id:str}/kv-rules/explain",
    summary="Explain which rule decides for a key and a user (service key only)",
    description="Body `{key, user: {id, role?} | null}`; 200 `{key, rule, read, write}`.",
    status_code=200,
)
async def explain(request: Request, app_id: FromPath[str]) -> Response:
    body = bodies.decode(await request.body(), bodies.ExplainBody, '{"key": ..., "user": {"id": ..., "role"?: ...} or null}')
    user = {} if body.user is None else {"id": body.user.id, "role": body.user.role}
    (result,) = await run(request, app_id, statements.EXPLAIN, {"key": body.key, "user": json.dumps(user)}, service_only=True, rate_limited=False)
    return Response(content=result, media_type=JSON)


@get(
    "/v1/{app_id:str}/kv-usage",
    summary="Live keys and bytes of the app, and its plan's limits (service key only)",
    description="200 `{keys, bytes, plan}`.",
)
async def usage(request: Request, app_id: FromPath[str]) -> Response:
    (result,) = await run(request, app_id, statements.USAGE, {}, service_only=True, rate_limited=False)
    return Response(content=result, media_type=JSON)


@get("/health", summary="Check that the server can reach its database", description="200 `{status: \"ok\"}`, else 503.")
async def health(request: Request) -> Response:
    async with request.app.state.pool.connection() as connection:
        await connection.execute(statements.HEALTH)
    return json_response({"status": "ok"})


ROUTES = [get_key, head_key, put_key, delete_key, post_key, post_batch, list_keys, list_rules, expose, unexpose, explain, usage, health]
