"""The Litestar application: configuration, error responses and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import psycopg
import psycopg_pool
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from kvapi import __version__
from kvapi.api.auth import CredentialCache
from kvapi.api.keypath import KeyPathRouter
from kvapi.api.routes import ROUTES, ResponseParts, encode_json, parts_response, read_key, write_key
from kvapi.database import create_pool, translate_error
from kvapi.errors import KvError
from kvapi.purge import purge_loop

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
# Litestar's own HTTP errors (unknown route, wrong method, oversized body)
# get the same error body as kvapi's.
_HTTP_STATUS_CODES = {404: "KV_NOT_FOUND", 413: "KV_VALUE_TOO_LARGE", 401: "KV_UNAUTHORIZED", 403: "KV_FORBIDDEN"}


def error_parts(status_code: int, code: str, message: str, **extra: object) -> ResponseParts:
    """Return (status, extra headers, JSON body) of an error response."""
    headers = None
    if "retry_after" in extra:
        headers = {"Retry-After": str(extra["retry_after"])}
    return status_code, headers, encode_json({"error": {"code": code, "message": message, **extra}})


def error_response(status_code: int, code: str, message: str, **extra: object) -> Response:
    return parts_response(error_parts(status_code, code, message, **extra))


def exception_parts(error: Exception, ids: dict[str, object]) -> ResponseParts:
    """Return the error response for an exception raised while serving a
    request, and log it with the request's ids unless the client caused it."""
    if isinstance(error, KvError):
        return error_parts(error.http_status, error.code, error.message, **error.extra)
    if isinstance(error, psycopg.Error):
        translated = translate_error(error)
        if translated is not None:
            return error_parts(translated.http_status, translated.code, translated.message, **translated.extra)
        if isinstance(error, psycopg.OperationalError):
            logger.warning("database unavailable", extra={"event": "request.db_unavailable", **ids, "error": str(error)})
            return error_parts(503, "KV_UNAVAILABLE", "the database is unavailable; retry later")
        logger.error("database error", extra={"event": "request.db_error", **ids, "sqlstate": error.sqlstate, "error": str(error)})
        return error_parts(500, "KV_INTERNAL_ERROR", "internal error; the server log has the details")
    if isinstance(error, psycopg_pool.PoolTimeout):
        logger.warning("database pool timed out", extra={"event": "request.pool_timeout", **ids, "error": str(error)})
        return error_parts(503, "KV_UNAVAILABLE", "the database is unavailable or overloaded; retry later")
    logger.error("unhandled error", exc_info=error, extra={"event": "request.unhandled", **ids})
    return error_parts(500, "KV_INTERNAL_ERROR", "internal error; the server log has the details")


def _request_ids(request: Request) -> dict[str, object]:
    return {"method": request.method, "path": request.scope.get("path"), "app_id": request.scope.get("kvapi.app_id") or request.path_params.get("app_id")}


def handle_exception(request: Request, error: Exception) -> Response:
    return parts_response(exception_parts(error, _request_ids(request)))


def handle_http_exception(request: Request, error: HTTPException) -> Response:
    code = _HTTP_STATUS_CODES.get(error.status_code, "KV_INVALID_REQUEST")
    if error.status_code >= 500:
        logger.error("HTTP error", extra={"event": "request.error", **_request_ids(request), "error": error.detail})
    if error.status_code == 413:
        return parts_response(body_too_large_parts(request.headers.get("content-length", "")))
    return error_response(error.status_code, code, str(error.detail))


def request_headers(scope: dict[str, Any]) -> dict[str, str]:
    """Map lower-case header names to values; the first of repeated headers wins."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def read_body(receive: Any) -> bytes | None:
    """Read the request body; return None when it exceeds MAX_BODY_BYTES."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def body_too_large_parts(content_length: str) -> ResponseParts:
    # A chunked body has no Content-Length, so its size is unknown.
    extra: dict[str, object] = {"limit": MAX_BODY_BYTES}
    if content_length.isdigit():
        extra["actual"] = int(content_length)
    message = f"request body over the limit of {MAX_BODY_BYTES} bytes; send a smaller body or split an mset"
    return error_parts(413, "KV_VALUE_TOO_LARGE", message, **extra)


async def respond(send: Any, parts: ResponseParts) -> None:
    status, headers, body = parts
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))]
    if headers:
        raw_headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


# GET and PUT of a key, the hottest routes, are served as raw ASGI without
# Litestar's request and response objects. They share their checks, SQL
# call and responses with the Litestar routes (read_key, write_key), which
# still serve the OpenAPI schema and every other method.

async def serve_get(litestar: Litestar, scope: dict[str, Any], receive: Any, send: Any, app_id: str, key: str) -> None:
    headers = request_headers(scope)
    # The last touch counts when it is repeated, as in the Litestar route.
    touch = None
    for name, value in parse_qsl(scope.get("query_string", b"").decode("utf-8", errors="replace"), keep_blank_values=True):
        if name == "touch":
            touch = value
    try:
        parts = await read_key(litestar.state, headers.get("authorization"), app_id, key, touch)
    except Exception as error:  # every error becomes a response, as in the Litestar handlers
        parts = exception_parts(error, {"method": "GET", "path": scope.get("path"), "app_id": app_id})
    await respond(send, parts)


async def serve_put(litestar: Litestar, scope: dict[str, Any], receive: Any, send: Any, app_id: str, key: str) -> None:
    headers = request_headers(scope)
    try:
        length = headers.get("content-length", "")
        body = None if length.isdigit() and int(length) > MAX_BODY_BYTES else await read_body(receive)
        if body is None:
            parts = body_too_large_parts(headers.get("content-length", ""))
        else:
            parts = await write_key(litestar.state, headers, app_id, key, body)
    except Exception as error:  # every error becomes a response, as in the Litestar handlers
        parts = exception_parts(error, {"method": "PUT", "path": scope.get("path"), "app_id": app_id})
    await respond(send, parts)


def create_litestar(database_url: str, *, pool_size: int = 10, purge_interval: float = 60.0) -> Litestar:
    """Build the Litestar app for one server process."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = create_pool(database_url, max_size=pool_size)
        await pool.open(wait=False)
        app.state.pool = pool
        app.state.credentials = CredentialCache()
        purge_task = asyncio.create_task(purge_loop(pool, purge_interval)) if purge_interval > 0 else None
        logger.info("API worker started", extra={"event": "api.start", "pid": os.getpid(), "pool_size": pool_size})
        try:
            yield
        finally:
            if purge_task is not None:
                purge_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purge_task
            await pool.close()
            logger.info("API worker stopped", extra={"event": "api.stop", "pid": os.getpid()})

    return Litestar(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        exception_handlers={
            HTTPException: handle_http_exception,
            Exception: handle_exception,
        },
        openapi_config=OpenAPIConfig(title="kvapi", version=__version__, path="/schema"),
        request_max_body_size=MAX_BODY_BYTES,
        # The server process configures logging (JSON lines); Litestar's own
        # default configuration would replace it.
        logging_config=None,
    )


def create_app() -> KeyPathRouter:
    """ASGI application factory for the server workers. Reads DATABASE_URL,
    KVAPI_POOL_SIZE and KVAPI_PURGE_INTERVAL (seconds; 0 disables the loop)."""
    litestar = create_litestar(
        os.environ["DATABASE_URL"],
        pool_size=int(os.environ.get("KVAPI_POOL_SIZE", "10")),
        purge_interval=float(os.environ.get("KVAPI_PURGE_INTERVAL", "60")),
    )
    handlers = {"GET": functools.partial(serve_get, litestar), "PUT": functools.partial(serve_put, litestar)}
    return KeyPathRouter(litestar, handlers)
