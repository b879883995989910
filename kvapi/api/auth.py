"""Authentication of service keys and end-user tokens.

A bearer token that starts with "kvs_" is a service key, checked by its
SHA-256 digest against kvapi.app_authenticate. Anything else is an end-user
JWT, verified here with PyJWT against the app's keys from kvapi.app_jwt_keys.
A request without a token is anonymous. A token that fails any check is a
401, never a downgrade to anonymous.

Successful service-key checks and each app's token keys are cached per
process for CACHE_SECONDS, so that a request normally costs one database
call: the operation itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
import psycopg
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kvapi import statements
from kvapi.errors import KvError

logger = logging.getLogger(__name__)

SERVICE_KEY_PREFIX = "kvs_"
# NOTE: a deleted service key or token key keeps working on a server that
# has cached it for up to this many seconds.
CACHE_SECONDS = 30.0
CACHE_MAX_ENTRIES = 10_000
CLOCK_LEEWAY_SECONDS = 60
DEFAULT_ROLE = "authenticated"
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256")


@dataclass(frozen=True)
class Credentials:
    """Credentials of one request: a service key digest, an end-user token,
    or neither (anonymous)."""

    key_hash: bytes | None = None
    token: str | None = None

    @property
    def is_service(self) -> bool:
        return self.key_hash is not None



def new_service_key() -> str:
    return SERVICE_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_service_key(service_key: str) -> bytes:
    return hashlib.sha256(service_key.encode("utf-8")).digest()


def parse_authorization(header: str | None) -> Credentials:
    """Parse an Authorization header; raise KV_UNAUTHORIZED when it is
    present but not a bearer token."""
    if header is None:
        return Credentials()
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise KvError("KV_UNAUTHORIZED", "invalid Authorization header: expected 'Bearer <service key or token>'")
    if token.startswith(SERVICE_KEY_PREFIX):
        return Credentials(key_hash=hash_service_key(token))
    return Credentials(token=token)


def _unauthorized(reason: str) -> KvError:
    return KvError("KV_UNAUTHORIZED", f"invalid token: {reason}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_claims(claims: dict[str, Any], app_id: str) -> dict[str, str]:
    """Check the claims PyJWT does not check strictly enough and return the
    requester ({"id", "role"}) for the SQL functions."""
    if not _is_number(claims.get("exp")):
        raise _unauthorized("exp must be a number")
    for name in ("nbf", "iat"):
        if name in claims and not _is_number(claims[name]):
            raise _unauthorized(f"{name} must be a number")
    subject = claims.get("sub")
    if not isinstance(subject, str) or subject == "":
        raise _unauthorized("sub must be a non-empty string")
    role = claims.get("role", DEFAULT_ROLE)
    if not isinstance(role, str):
        raise _unauthorized("role must be a string")
    if "aud" in claims:
        audience = claims["aud"]
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or app_id not in audiences:
            raise _unauthorized(f"aud does not name app {app_id!r}")
    return {"id": subject, "role": role}


@dataclass(frozen=True)
class VerificationKey:
    algorithm: str
    key: Any


def load_public_key(algorithm: str, pem: str) -> Any:
    """Load a PEM public key for algorithm; raise ValueError naming the
    problem when it is not a key of the type that algorithm needs."""
    try:
        key = load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError) as error:
        raise ValueError(f"invalid public key: not a PEM public key ({error})") from None
    if algorithm == "RS256" and not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("invalid public key: RS256 needs an RSA public key")
    if algorithm == "ES256" and not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise ValueError("invalid public key: ES256 needs an EC public key on curve P-256")
    return key


def _load_keys(app_id: str, raw: bytes) -> list[VerificationKey]:
    keys = []
    for entry in json.loads(raw):
        if entry["algorithm"] not in ASYMMETRIC_ALGORITHMS:
            keys.append(VerificationKey(entry["algorithm"], entry["key"]))
            continue
        try:
            keys.append(VerificationKey(entry["algorithm"], load_public_key(entry["algorithm"], entry["key"])))
        except ValueError as error:
            # One unusable key must not stop the app's other keys.
            logger.warning(
                "skipping unusable token key",
                extra={"event": "auth.bad_token_key", "app_id": app_id, "algorithm": entry["algorithm"], "error": str(error)},
            )
    return keys


def verify_token(token: str, app_id: str, keys: list[VerificationKey]) -> tuple[dict[str, str], float]:
    """Verify an end-user JWT for app_id and return the requester and the
    token's exp. Each key accepts only its own algorithm, so an HS256 token
    signed with a public key, or an alg "none" token, never verifies."""
    try:
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError as error:
        raise _unauthorized(f"malformed token ({error})") from None
    candidates = [key for key in keys if key.algorithm == algorithm]
    if not candidates:
        raise _unauthorized(f"algorithm {algorithm!r} is not accepted for app {app_id!r}")

    for candidate in candidates:
        try:
            claims = jwt.decode(
                token,
                candidate.key,
                algorithms=[candidate.algorithm],
                leeway=CLOCK_LEEWAY_SECONDS,
                options={"require": ["exp"], "verify_aud": False},
            )
        except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
            # Another key of the same algorithm may have signed it.
            continue
        except jwt.PyJWTError as error:
            raise _unauthorized(str(error)) from None
        return check_claims(claims, app_id), float(claims["exp"])
    raise _unauthorized("signature verification failed")


class CredentialCache:
    """Per-process cache of authenticated service keys and of each app's
    token verification keys."""

    def __init__(self) -> None:
        self._service_keys: dict[tuple[str, bytes], float] = {}
        self._token_keys: dict[str, tuple[float, list[VerificationKey]]] = {}
        # Verified tokens: an end user sends the same token with every
        # request, and verifying it costs more than the database call.
        self._tokens: dict[tuple[str, str], tuple[float, float, str]] = {}

    async def authenticate_service_key(self, connection: psycopg.AsyncConnection, app_id: str, key_hash: bytes) -> None:
        """Return when key_hash is a service key of app_id; raise
        KV_APP_NOT_FOUND or KV_UNAUTHORIZED (via the SQL function) otherwise."""
        cache_key = (app_id, key_hash)
        now = time.monotonic()
        valid_until = self._service_keys.get(cache_key)
        if valid_until is not None and valid_until > now:
            return
        await connection.execute(statements.AUTHENTICATE, {"app_id": app_id, "key_hash": key_hash})
        if len(self._service_keys) >= CACHE_MAX_ENTRIES:
            self._service_keys.clear()
        self._service_keys[cache_key] = now + CACHE_SECONDS

    async def requester_for_token(self, connection: psycopg.AsyncConnection, app_id: str, token: str) -> str:
        """Verify an end-user token of app_id and return its requester as the
        JSON text of the SQL functions' p_requester argument. A
        verified token is reused until the app's keys are due for a reload
        or the token expires (with the usual leeway), whichever comes first."""
        now = time.monotonic()
        verified = self._tokens.get((app_id, token))
        if verified is not None and verified[0] > now and verified[1] > time.time() - CLOCK_LEEWAY_SECONDS:
            return verified[2]

        cached = self._token_keys.get(app_id)
        if cached is None or cached[0] <= now:
            cursor = await connection.execute(statements.JWT_KEYS, {"app_id": app_id})
            (raw,) = await cursor.fetchone()
            if len(self._token_keys) >= CACHE_MAX_ENTRIES:
                self._token_keys.clear()
            cached = (now + CACHE_SECONDS, _load_keys(app_id, raw))
            self._token_keys[app_id] = cached
        requester, expires = verify_token(token, app_id, cached[1])
        requester_json = json.dumps(requester)
        if len(self._tokens) >= CACHE_MAX_ENTRIES:
            self._tokens.clear()
        self._tokens[(app_id, token)] = (cached[0], expires, requester_json)
        return requester_json
