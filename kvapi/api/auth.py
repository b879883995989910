"""Service-key authentication.

A service key is checked by its SHA-256 digest against kvapi.app_authenticate.
Successful checks are cached per process for CACHE_SECONDS, so that a
request normally costs a single database call (the operation itself).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import psycopg

from kvapi import statements
from kvapi.errors import KvError

SERVICE_KEY_PREFIX = "kvs_"
# NOTE: a deleted service key keeps working on a server that has cached it
# for up to this many seconds.
CACHE_SECONDS = 30.0
CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Credentials:
    """What the request presented: a service key digest, or nothing (anonymous)."""

    key_hash: bytes | None

    @property
    def anonymous(self) -> bool:
        return self.key_hash is None


def new_service_key() -> str:
    return SERVICE_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_service_key(service_key: str) -> bytes:
    return hashlib.sha256(service_key.encode("utf-8")).digest()


def parse_authorization(header: str | None) -> Credentials:
    """Parse an Authorization header; raise KV_UNAUTHORIZED when it is
    present but not a bearer token."""
    if header is None:
        return Credentials(None)
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise KvError(
            "KV_UNAUTHORIZED",
            "invalid Authorization header: expected 'Bearer <service key>'",
        )
    return Credentials(hash_service_key(token))


class ServiceKeyCache:
    """Per-process cache of (app id, key digest) pairs that authenticated."""

    def __init__(self) -> None:
        self._valid_until: dict[tuple[str, bytes], float] = {}

    async def authenticate(self, connection: psycopg.AsyncConnection, app_id: str, key_hash: bytes) -> None:
        """Return when key_hash is a service key of app_id; raise
        KV_APP_NOT_FOUND or KV_UNAUTHORIZED (via the SQL function) otherwise."""
        cache_key = (app_id, key_hash)
        now = time.monotonic()
        valid_until = self._valid_until.get(cache_key)
        if valid_until is not None and valid_until > now:
            return
        await connection.execute(statements.AUTHENTICATE, {"app_id": app_id, "key_hash": key_hash})
        if len(self._valid_until) >= CACHE_MAX_ENTRIES:
            self._valid_until.clear()
        self._valid_until[cache_key] = now + CACHE_SECONDS
