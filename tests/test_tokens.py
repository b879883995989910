"""End-user tokens against a real `kvapi serve`: what verifies, and attacks
that must be rejected with 401.

Every request reads a key that a rule opens to anonymous requests, so a
token that the server wrongly downgraded to anonymous would get a 200
instead of the 401. The server caches each app's token keys for 30 seconds
from its first request for that app, so every app here gets its public keys
registered before any request names it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import create_app

PUBLIC_KEY = "public:x"
PUBLIC_VALUE = "visible"
LEEWAY = 60


def public_pem(private_key: Any) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def hs256_by_hand(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """Sign a token with HMAC-SHA256 without PyJWT, which refuses to use a
    PEM public key as an HMAC secret."""
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims_for(user_id: str = "alice", **overrides: Any) -> dict[str, Any]:
    """Return valid claims that expire in ten minutes, with overrides. An
    override of None removes the claim."""
    claims: dict[str, Any] = {"sub": user_id, "exp": int(time.time()) + 600}
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


@dataclass
class TokenApp:
    app_id: str
    secret: str


@dataclass
class Setup:
    """The apps and keys of this module, all registered before any request."""

    base_url: str
    app: TokenApp
    other: TokenApp
    # RSA key registered as ES256 only.
    mislabelled: TokenApp
    # A P-384 EC key, unusable for ES256, registered before a valid P-256 key.
    wrong_curve_first: TokenApp
    # Text that is not a PEM key, registered as RS256.
    not_pem: TokenApp
    rsa_key: Any
    rsa_rotated_key: Any
    ec_key: Any
    unregistered_rsa_key: Any
    unregistered_ec_key: Any
    not_pem_registration: str | None


def register_key(connection: psycopg.Connection, app_id: str, algorithm: str, pem: str) -> str | None:
    """Register a token key and return the SQLSTATE raised, or None."""
    try:
        connection.execute("SELECT kvapi.app_add_jwt_key(%s, %s, %s)", [app_id, algorithm, pem])
    except psycopg.Error as error:
        return error.sqlstate
    return None


def token_app(connection: psycopg.Connection, database_url: str) -> TokenApp:
    """Create an app whose key PUBLIC_KEY anonymous requests may read."""
    created = create_app(database_url)
    connection.execute("SELECT kvapi.kv_expose(%s, 'public:**', 'public', 'deny')", [created.app_id])
    connection.execute("SELECT kvapi.kv_set(%s, %s, %s)", [created.app_id, PUBLIC_KEY, json.dumps(PUBLIC_VALUE)])
    (secret,) = connection.execute("SELECT jwt_secret FROM kvapi_data.apps WHERE app_id = %s", [created.app_id]).fetchone()
    return TokenApp(created.app_id, secret)


@pytest.fixture(scope="module")
def setup(http_server) -> Setup:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_rotated_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with psycopg.connect(http_server.database_url, autocommit=True) as connection:
        app = token_app(connection, http_server.database_url)
        assert register_key(connection, app.app_id, "RS256", public_pem(rsa_key)) is None
        assert register_key(connection, app.app_id, "RS256", public_pem(rsa_rotated_key)) is None
        assert register_key(connection, app.app_id, "ES256", public_pem(ec_key)) is None

        other = token_app(connection, http_server.database_url)

        mislabelled = token_app(connection, http_server.database_url)
        assert register_key(connection, mislabelled.app_id, "ES256", public_pem(rsa_key)) is None

        wrong_curve_first = token_app(connection, http_server.database_url)
        p384_key = ec.generate_private_key(ec.SECP384R1())
        assert register_key(connection, wrong_curve_first.app_id, "ES256", public_pem(p384_key)) is None
        assert register_key(connection, wrong_curve_first.app_id, "ES256", public_pem(ec_key)) is None

        not_pem = token_app(connection, http_server.database_url)
        not_pem_registration = register_key(connection, not_pem.app_id, "RS256", "not a PEM key")

    return Setup(
        base_url=http_server.base_url,
        app=app,
        other=other,
        mislabelled=mislabelled,
        wrong_curve_first=wrong_curve_first,
        not_pem=not_pem,
        rsa_key=rsa_key,
        rsa_rotated_key=rsa_rotated_key,
        ec_key=ec_key,
        unregistered_rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        unregistered_ec_key=ec.generate_private_key(ec.SECP256R1()),
        not_pem_registration=not_pem_registration,
    )


@pytest.fixture(scope="module")
def http(setup: Setup) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=setup.base_url, timeout=30) as client:
        yield client


def read_public(http: httpx.Client, app: TokenApp, authorization: str | bytes | None) -> httpx.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    return http.get(f"/v1/{app.app_id}/kv/{PUBLIC_KEY}", headers=headers)


def hs256(app: TokenApp, **overrides: Any) -> str:
    return jwt.encode(claims_for(**overrides), app.secret, algorithm="HS256")


def assert_accepted(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["value"] == PUBLIC_VALUE


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "KV_UNAUTHORIZED"


def test_anonymous_baseline_is_200(http, setup):
    assert_accepted(read_public(http, setup.app, None))


# Tokens that verify: (name, token builder).
ACCEPTED: list[tuple[str, Callable[[Setup], str]]] = [
    ("hs256", lambda s: hs256(s.app)),
    ("hs256 with role", lambda s: hs256(s.app, role="admin")),
    ("hs256 extra claims", lambda s: hs256(s.app, iss="issuer", jti="1", scope=["a"])),
    ("exp within leeway", lambda s: hs256(s.app, exp=int(time.time()) - LEEWAY // 2)),
    ("fractional exp", lambda s: hs256(s.app, exp=time.time() + 600.5)),
    ("nbf within leeway", lambda s: hs256(s.app, nbf=int(time.time()) + LEEWAY // 2)),
    ("iat within leeway", lambda s: hs256(s.app, iat=int(time.time()) + LEEWAY // 2)),
    ("past nbf and iat", lambda s: hs256(s.app, nbf=int(time.time()) - 10, iat=int(time.time()) - 10)),
    ("aud string of app", lambda s: hs256(s.app, aud=s.app.app_id)),
    ("aud list with app", lambda s: hs256(s.app, aud=["elsewhere", s.app.app_id])),
    ("rs256 registered key", lambda s: jwt.encode(claims_for(), s.rsa_key, algorithm="RS256")),
    ("rs256 second registered key", lambda s: jwt.encode(claims_for(), s.rsa_rotated_key, algorithm="RS256")),
    ("es256 registered key", lambda s: jwt.encode(claims_for(), s.ec_key, algorithm="ES256")),
]


@pytest.mark.parametrize("builder", [case[1] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
def test_token_accepted(http, setup, builder):
    assert_accepted(read_public(http, setup.app, f"Bearer {builder(setup)}"))


def now() -> int:
    return int(time.time())


def tamper_payload(token: str) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64url_json(claims_for('bob'))}.{signature}"


def tamper_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    flipped = "A" if signature[0] != "A" else "B"
    return f"{header}.{payload}.{flipped}{signature[1:]}"


# Tokens that must be rejected with 401: (name, token builder).
REJECTED: list[tuple[str, Callable[[Setup], str]]] = [
    ("alg none", lambda s: f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims_for())}."),
    ("alg None", lambda s: f"{b64url_json({'alg': 'None', 'typ': 'JWT'})}.{b64url_json(claims_for())}."),
    ("alg none with signature", lambda s: f"{b64url_json({'alg': 'none'})}.{b64url_json(claims_for())}.c2ln"),
    ("hs256 with rsa public pem", lambda s: hs256_by_hand(
        {"alg": "HS256", "typ": "JWT"}, claims_for(), public_pem(s.rsa_key).encode())),
    ("hs256 with rsa pem no newline", lambda s: hs256_by_hand(
        {"alg": "HS256", "typ": "JWT"}, claims_for(), public_pem(s.rsa_key).strip().encode())),
    ("hs256 with ec public pem", lambda s: hs256_by_hand(
        {"alg": "HS256", "typ": "JWT"}, claims_for(), public_pem(s.ec_key).encode())),
    ("hs384 with app secret", lambda s: jwt.encode(claims_for(), s.app.secret, algorithm="HS384")),
    ("hs512 with app secret", lambda s: jwt.encode(claims_for(), s.app.secret, algorithm="HS512")),
    ("expired beyond leeway", lambda s: hs256(s.app, exp=now() - LEEWAY - 60)),
    ("missing exp", lambda s: hs256(s.app, exp=None)),
    ("exp string", lambda s: hs256(s.app, exp=str(now() + 600))),
    ("exp null", lambda s: hs256_by_hand({"alg": "HS256"}, {"sub": "alice", "exp": None}, s.app.secret.encode())),
    ("exp true", lambda s: hs256(s.app, exp=True)),
    ("exp list", lambda s: hs256(s.app, exp=[now() + 600])),
    ("nbf beyond leeway", lambda s: hs256(s.app, nbf=now() + LEEWAY + 60)),
    ("nbf string", lambda s: hs256(s.app, nbf=str(now() - 10))),
    ("iat beyond leeway", lambda s: hs256(s.app, iat=now() + LEEWAY + 60)),
    ("iat string", lambda s: hs256(s.app, iat=str(now() - 10))),
    ("aud other string", lambda s: hs256(s.app, aud="elsewhere")),
    ("aud other list", lambda s: hs256(s.app, aud=["elsewhere", "again"])),
    ("aud empty list", lambda s: hs256(s.app, aud=[])),
    ("aud app prefix", lambda s: hs256(s.app, aud=s.app.app_id + "x")),
    ("aud number", lambda s: hs256(s.app, aud=7)),
    ("aud object", lambda s: hs256(s.app, aud={s.app.app_id: True})),
    ("tampered payload", lambda s: tamper_payload(hs256(s.app))),
    ("tampered signature", lambda s: tamper_signature(hs256(s.app))),
    ("stripped signature", lambda s: hs256(s.app).rsplit(".", 1)[0] + "."),
    ("other app secret", lambda s: hs256(s.other)),
    ("other app secret with aud", lambda s: hs256(s.other, aud=s.app.app_id)),
    ("empty secret", lambda s: hs256_by_hand({"alg": "HS256"}, claims_for(), b"")),
    ("empty sub", lambda s: hs256(s.app, sub="")),
    ("missing sub", lambda s: hs256(s.app, sub=None)),
    ("sub number", lambda s: hs256(s.app, sub=7)),
    ("role number", lambda s: hs256(s.app, role=7)),
    ("role list", lambda s: hs256(s.app, role=["admin"])),
    ("role null", lambda s: hs256_by_hand({"alg": "HS256"}, {**claims_for(), "role": None}, s.app.secret.encode())),
    ("payload not object", lambda s: hs256_by_hand({"alg": "HS256"}, ["sub", "alice"], s.app.secret.encode())),
    ("rs256 unregistered key", lambda s: jwt.encode(claims_for(), s.unregistered_rsa_key, algorithm="RS256")),
    ("es256 unregistered key", lambda s: jwt.encode(claims_for(), s.unregistered_ec_key, algorithm="ES256")),
    ("rs256 key as ps256", lambda s: jwt.encode(claims_for(), s.rsa_key, algorithm="PS256")),
    ("garbage word", lambda s: "garbage"),
    ("garbage three parts", lambda s: "a.b.c"),
    ("garbage dots", lambda s: "..."),
    ("two parts", lambda s: ".".join(hs256(s.app).split(".")[:2])),
    ("four parts", lambda s: hs256(s.app) + ".x"),
    ("header not json", lambda s: f"{b64url(b'not json')}.{b64url_json(claims_for())}.c2ln"),
    ("header not base64", lambda s: "!!!." + hs256(s.app).split(".", 1)[1]),
]


# PyJWT warns when it signs HS384 and HS512 with the app's 43-byte secret.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("builder", [case[1] for case in REJECTED], ids=[case[0] for case in REJECTED])
def test_token_rejected(http, setup, builder):
    assert_unauthorized(read_public(http, setup.app, f"Bearer {builder(setup)}"))


@pytest.mark.parametrize("authorization", [
    "Bearer", "Basic YWxpY2U6c2VjcmV0", "Token abc", "bearer-abc", "kvs_not_a_key",
])
def test_malformed_authorization_header(http, setup, authorization):
    assert_unauthorized(read_public(http, setup.app, authorization))


def test_non_ascii_token_is_401(http, setup):
    assert_unauthorized(read_public(http, setup.app, "Bearer \u00e9t\u00e9.\u00e9t\u00e9.\u00e9t\u00e9".encode()))


def test_unknown_service_key_is_401(http, setup):
    assert_unauthorized(read_public(http, setup.app, f"Bearer kvs_{secrets.token_urlsafe(32)}"))


def test_rejected_token_cannot_write(http, setup):
    url = f"/v1/{setup.app.app_id}/kv/public:y"
    token = hs256(setup.app, exp=now() - LEEWAY - 60)
    response = http.put(url, json={"value": 1}, headers={"Authorization": f"Bearer {token}"})
    assert_unauthorized(response)


def test_rs256_key_registered_as_es256(http, setup):
    rs256 = jwt.encode(claims_for(), setup.rsa_key, algorithm="RS256")
    assert_unauthorized(read_public(http, setup.mislabelled, f"Bearer {rs256}"))


def test_es256_token_for_rsa_key_labelled_es256(http, setup):
    """A key whose type does not fit its algorithm verifies nothing: 401, not 500."""
    es256 = jwt.encode(claims_for(), setup.ec_key, algorithm="ES256")
    assert_unauthorized(read_public(http, setup.mislabelled, f"Bearer {es256}"))


def test_hs256_beside_mislabelled_key(http, setup):
    assert_accepted(read_public(http, setup.mislabelled, f"Bearer {hs256(setup.mislabelled)}"))


def test_valid_es256_key_after_wrong_curve(http, setup):
    """An unusable key registered first does not stop a later valid key."""
    es256 = jwt.encode(claims_for(), setup.ec_key, algorithm="ES256")
    assert_accepted(read_public(http, setup.wrong_curve_first, f"Bearer {es256}"))


def test_key_text_not_pem(http, setup):
    """A key text that is not PEM is either rejected when registered or
    ignored when verifying: it never breaks the app's other tokens."""
    assert setup.not_pem_registration in (None, "KVINV")
    assert_accepted(read_public(http, setup.not_pem, f"Bearer {hs256(setup.not_pem)}"))
    rs256 = jwt.encode(claims_for(), setup.rsa_key, algorithm="RS256")
    assert_unauthorized(read_public(http, setup.not_pem, f"Bearer {rs256}"))

