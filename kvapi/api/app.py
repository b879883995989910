"""The Litestar application: configuration, error responses and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import psycopg
import psycopg_pool
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from kvapi import __version__
from kvapi.api.auth import CredentialCache
from kvapi.api.keypath import KeyPathRouter
from kvapi.api.routes import ROUTES, json_response
from kvapi.database import create_pool, translate_error
from kvapi.errors import KvError
from kvapi.purge import purge_loop

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
# Litestar's own HTTP errors (unknown route, wrong method, oversized body)
# get the same error body as kvapi's.
_HTTP_STATUS_CODES = {404: "KV_NOT_FOUND", 413: "KV_VALUE_TOO_LARGE", 401: "KV_UNAUTHORIZED", 403: "KV_FORBIDDEN"}


def error_response(status_code: int, code: str, message: str, **extra: object) -> Response:
    headers = None
    if "retry_after" in extra:
        headers = {"Retry-After": str(extra["retry_after"])}
    return json_response({"error": {"code": code, "message": message, **extra}}, status_code=status_code, headers=headers)


def _request_ids(request: Request) -> dict[str, object]:
    return {"method": request.method, "path": request.scope.get("path"), "app_id": request.scope.get("kvapi.app_id") or request.path_params.get("app_id")}


def handle_kv_error(request: Request, error: KvError) -> Response:
    return error_response(error.http_status, error.code, error.message, **error.extra)


def handle_http_exception(request: Request, error: HTTPException) -> Response:
    code = _HTTP_STATUS_CODES.get(error.status_code, "KV_INVALID_REQUEST")
    if error.status_code >= 500:
        logger.error("HTTP error", extra={"event": "request.error", **_request_ids(request), "error": error.detail})
    if error.status_code == 413:
        # A chunked body has no Content-Length, so its size is unknown.
        extra: dict[str, object] = {"limit": MAX_BODY_BYTES}
        length = request.headers.get("content-length", "")
        if length.isdigit():
            extra["actual"] = int(length)
        message = f"request body over the limit of {MAX_BODY_BYTES} bytes; send a smaller body or split an mset"
        return error_response(413, code, message, **extra)
    return error_response(error.status_code, code, str(error.detail))


def handle_database_error(request: Request, error: psycopg.Error) -> Response:
    translated = translate_error(error)
    if translated is not None:
        return handle_kv_error(request, translated)
    if isinstance(error, psycopg.OperationalError):
        logger.warning("database unavailable", extra={"event": "request.db_unavailable", **_request_ids(request), "error": str(error)})
        return error_response(503, "KV_UNAVAILABLE", "the database is unavailable; retry later")
    logger.error("database error", extra={"event": "request.db_error", **_request_ids(request), "sqlstate": error.sqlstate, "error": str(error)})
    return error_response(500, "KV_INTERNAL_ERROR", "internal error; the server log has the details")


def handle_pool_timeout(request: Request, error: psycopg_pool.PoolTimeout) -> Response:
    logger.warning("database pool timed out", extra={"event": "request.pool_timeout", **_request_ids(request), "error": str(error)})
    return error_response(503, "KV_UNAVAILABLE", "the database is unavailable or overloaded; retry later")


def handle_unexpected(request: Request, error: Exception) -> Response:
    logger.exception("unhandled error", extra={"event": "request.unhandled", **_request_ids(request)})
    return error_response(500, "KV_INTERNAL_ERROR", "internal error; the server log has the details")


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
            KvError: handle_kv_error,
            HTTPException: handle_http_exception,
            psycopg.Error: handle_database_error,
            psycopg_pool.PoolTimeout: handle_pool_timeout,
            Exception: handle_unexpected,
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
    return KeyPathRouter(litestar)
