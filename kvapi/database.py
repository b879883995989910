"""Connections to the kvapi database and translation of its errors.

jsonb results are loaded as raw bytes, never parsed into Python objects:
the API copies them into its responses unchanged, so numbers keep their
exact digits and large values cost no decoding.
"""

from __future__ import annotations

import json
import logging

import psycopg
import psycopg_pool
from psycopg.adapt import Loader

from kvapi.errors import BY_SQLSTATE, KvError

logger = logging.getLogger(__name__)

# Class 22 (data exception) errors come from arguments that PostgreSQL cannot
# convert, such as "\u0000" in a JSON string or a number beyond numeric's
# range. They are the client's fault, so they map to 400.
DATA_EXCEPTION_CLASS = "22"
# Class 54 (program limit exceeded) comes from values PostgreSQL cannot
# hold, such as JSON nested deeper than its stack allows.
PROGRAM_LIMIT_CLASS = "54"


class RawJsonLoader(Loader):
    """Load jsonb as the bytes of its JSON text."""

    def load(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(data)


def configure_connection(connection: psycopg.Connection | psycopg.AsyncConnection) -> None:
    connection.adapters.register_loader("jsonb", RawJsonLoader)


async def _configure_async(connection: psycopg.AsyncConnection) -> None:
    configure_connection(connection)


def create_pool(url: str, *, min_size: int = 2, max_size: int = 10, timeout: float = 5.0) -> psycopg_pool.AsyncConnectionPool:
    """Create (but do not open) the API's pool of autocommit connections."""
    return psycopg_pool.AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs={"autocommit": True},
        configure=_configure_async,
        open=False,
        name="kvapi",
    )


def translate_error(error: psycopg.Error) -> KvError | None:
    """Return the KvError for a database error, or None when the error is not
    the caller's fault (a bug or an outage, which the caller handles)."""
    sqlstate = error.sqlstate or ""
    diag = error.diag
    message = diag.message_primary or str(error)
    if diag.message_hint:
        message = f"{message}. {diag.message_hint}"

    entry = BY_SQLSTATE.get(sqlstate)
    if entry is not None:
        extra: dict[str, object] = {}
        if diag.message_detail:
            try:
                detail = json.loads(diag.message_detail)
            except ValueError:
                detail = None
            if isinstance(detail, dict):
                extra = detail
        return KvError(entry.code, message, **extra)

    if isinstance(error, psycopg.DataError) and not sqlstate:
        # Raised by psycopg itself before sending, e.g. for U+0000 in text.
        return KvError("KV_INVALID_REQUEST", f"invalid argument: {error}")
    if sqlstate.startswith(PROGRAM_LIMIT_CLASS):
        return KvError("KV_INVALID_REQUEST", f"invalid argument: {message}; send a smaller or less deeply nested value")
    if sqlstate.startswith(DATA_EXCEPTION_CLASS):
        if diag.message_detail:
            message = f"{message}: {diag.message_detail}"
        return KvError("KV_INVALID_REQUEST", f"invalid argument: {message}")
    return None
