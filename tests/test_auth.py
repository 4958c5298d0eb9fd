"""Who may call the API: every route but the probes and the docs needs a token with its scope.

The 401/403 matrix runs over every operation the app has (enumerated, so a new route cannot
escape) and every token defect, with a local HS256 key and with a JWKS (RSA and EC keys)
served by a real HTTP server. Each refusal is a problem document with a `WWW-Authenticate`
challenge that never echoes the token, and writes nothing: no resource, version, blob,
claim, idempotency key or tombstone, and no workflow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.routing import BaseRoute, Mount
from temporalio.client import Client
from temporalio.worker import Worker

from api.main import create_app
from api.security import AuthNotConfigured, Scope
from api.tokens import SIGNING_KEY_FILE, mint
from devstack import REPO_ROOT, free_port
from tests.helpers import auth_headers
from upsertflow.models import (
    Blob,
    BlobClaim,
    IdempotencyKey,
    Resource,
    ResourceTombstone,
    ResourceVersion,
)
from upsertflow.settings import Auth, Settings

PROBLEM = "application/problem+json"
#: What anyone may call: the probes, and the docs with what they load.
PUBLIC_OPERATIONS = {("GET", "/healthz"), ("GET", "/readyz")}
DOCS_ROUTES = {"/docs", "/redoc", "/openapi.json"}
DOCS_MOUNTS = {"/docs/static"}


# --- every operation of the app -------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    scopes: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def operations(app: FastAPI) -> list[Operation]:
    """Every operation of the app but the public ones, with the scopes OpenAPI says it needs.

    Fails for a route that is neither documented nor one of the docs' own.
    """
    spec = app.openapi()
    found: list[Operation] = []
    for route, full_path in _routes(app):
        if isinstance(route, Mount):
            assert full_path in DOCS_MOUNTS, f"an unexpected mount: {full_path}"
            continue
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            assert full_path in DOCS_ROUTES, f"a route outside the OpenAPI document: {full_path}"
            continue
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", full_path)
        for method in sorted((route.methods or set()) - {"HEAD", "OPTIONS"}):
            if (method, path) in PUBLIC_OPERATIONS:
                continue
            security = spec["paths"][path][method.lower()].get("security")
            assert security, f"{method} {path} documents no security"
            (requirement,) = security
            found.append(Operation(method, path, tuple(requirement["bearer"])))
    return found


def _routes(app: FastAPI) -> list[tuple[BaseRoute, str]]:
    """Every route of the app with its full path, those of included routers too."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # before FastAPI 0.16x, `include_router` copied the routes
        return [(route, str(getattr(route, "path", ""))) for route in app.routes]
    return [(ctx.original_route, str(ctx.path)) for ctx in iter_route_contexts(app.routes)]


def request_args(operation: Operation, resource_id: str) -> dict[str, Any]:
    path = operation.path.replace("{resource_id}", resource_id)
    args: dict[str, Any] = {"method": operation.method, "url": path}
    if operation.method in ("PUT", "POST"):
        args["json"] = (
            {"payloads": []}
            if path.startswith("/codec")
            else {"attributes": {"by": "intruder"}, "info": {"country": "FR"}}
        )
    return args


# --- tokens and their defects ---------------------------------------------------------------


def claims(auth: Auth, scopes: tuple[str, ...] = tuple(Scope), **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": "mallory",
        "aud": auth.audience,
        "iss": auth.issuer,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "scope": " ".join(scopes),
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not None}


@dataclass(frozen=True)
class Defect:
    name: str
    #: The token's header value (None: no header), for a route needing `scopes`.
    header: Callable[[Operation], str | None]
    status: int = 401
    #: The `error` of the challenge (None: none, as for a missing token).
    error: str | None = "invalid_token"


class Keys:
    """The JWKS's keys: RSA (kid `rsa-1`) and EC P-256 (kid `ec-1`); another RSA key too."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        return {
            "keys": [
                rsa_jwk | {"kid": "rsa-1", "use": "sig", "alg": "RS256"},
                ec_jwk | {"kid": "ec-1", "use": "sig", "alg": "ES256"},
            ]
        }

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _forged_hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HS256 token signed with `secret`, made by hand: PyJWT refuses a PEM as HMAC key."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def _unsigned(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, "", algorithm="none")


def common_defects(auth: Auth, sign: Callable[[dict[str, Any]], str]) -> list[Defect]:
    """The defects of any token, signed with `sign` (the key the API trusts)."""

    def signed(**changes: Any) -> Callable[[Operation], str]:
        return lambda op: _bearer(sign(claims(auth, **changes)))

    def lacking_scope(op: Operation) -> str:
        others = tuple(scope for scope in Scope if scope not in op.scopes)
        return _bearer(sign(claims(auth, scopes=others)))

    return [
        Defect("missing", lambda op: None, error=None),
        Defect("not bearer", lambda op: "Basic dXNlcjpwYXNz", error=None),
        Defect("empty bearer", lambda op: "Bearer ", error=None),
        Defect("malformed", lambda op: "Bearer not.a.jwt"),
        Defect("garbage", lambda op: "Bearer " + "A" * 300),
        Defect("expired", signed(exp=int(time.time()) - 3600)),
        Defect("not valid yet", signed(nbf=int(time.time()) + 3600)),
        Defect("no exp", signed(exp=None)),
        Defect("no sub", signed(sub=None)),
        Defect("wrong audience", signed(aud="another-api")),
        Defect("wrong issuer", signed(iss="https://evil.example")),
        Defect("alg none", lambda op: _bearer(_unsigned(claims(auth)))),
        Defect("lacks the scope", lacking_scope, status=403, error="insufficient_scope"),
        Defect("no scope at all", signed(scope=None), status=403, error="insufficient_scope"),
    ]


def hmac_defects(auth: Auth) -> list[Defect]:
    key = auth.signing_key.get_secret_value()
    other_key = "x" * 48

    def sign(payload: dict[str, Any]) -> str:
        return jwt.encode(payload, key, algorithm="HS256")

    return [
        *common_defects(auth, sign),
        Defect(
            "wrong signature",
            lambda op: _bearer(jwt.encode(claims(auth), other_key, algorithm="HS256")),
        ),
        Defect(
            "tampered payload",
            lambda op: _bearer(_tampered(sign(claims(auth, scopes=())), claims(auth))),
        ),
        Defect(
            "HS512 with the key",
            lambda op: _bearer(jwt.encode(claims(auth), key + key, algorithm="HS512")),
        ),
    ]


def jwks_defects(auth: Auth, keys: Keys) -> list[Defect]:
    def sign(payload: dict[str, Any]) -> str:
        return jwt.encode(payload, keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})

    return [
        *common_defects(auth, sign),
        Defect(
            "HS256 signed with the RSA public key (algorithm confusion)",
            lambda op: _bearer(_forged_hs256(claims(auth), keys.rsa_public_pem(), "rsa-1")),
        ),
        Defect(
            "HS256 with a shared secret",
            lambda op: _bearer(
                jwt.encode(claims(auth), "s" * 48, algorithm="HS256", headers={"kid": "rsa-1"})
            ),
        ),
        Defect(
            "another RSA key, same kid",
            lambda op: _bearer(
                jwt.encode(
                    claims(auth), keys.other_rsa, algorithm="RS256", headers={"kid": "rsa-1"}
                )
            ),
        ),
        Defect(
            "unknown kid",
            lambda op: _bearer(
                jwt.encode(claims(auth), keys.rsa, algorithm="RS256", headers={"kid": "rsa-9"})
            ),
        ),
        Defect(
            "no kid",
            lambda op: _bearer(jwt.encode(claims(auth), keys.rsa, algorithm="RS256")),
        ),
        Defect(
            "RS256 header on the EC key",
            lambda op: _bearer(
                jwt.encode(claims(auth), keys.rsa, algorithm="RS256", headers={"kid": "ec-1"})
            ),
        ),
    ]


def _tampered(token: str, payload: dict[str, Any]) -> str:
    """`token` with its payload replaced (and its signature kept)."""
    header, _, signature = token.split(".")
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


# --- a JWKS on a real HTTP server -----------------------------------------------------------


class JwksServer:
    """A JWKS at `url`, on a local HTTP server; counts its requests; can go down."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.requests = 0
        self.down = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if outer.down or self.path != "/.well-known/jwks.json":
                    self.send_error(503 if outer.down else 404)
                    return
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    with JwksServer(keys.jwks()) as server:
        yield server


# --- apps -----------------------------------------------------------------------------------


@dataclass
class Api:
    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings


@asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield Api(app, http, settings)


@pytest.fixture
async def hmac_api(settings: Settings) -> AsyncIterator[Api]:
    """The API verifying with the suite's local key; its client sends no token of its own."""
    async with _running(settings) as api:
        yield api


@pytest.fixture
async def jwks_api(settings: Settings, jwks_server: JwksServer) -> AsyncIterator[Api]:
    """The API verifying against the JWKS server."""
    auth = Auth(jwks_url=jwks_server.url, audience="upsertflow-api", issuer="https://idp.test")
    async with _running(settings.model_copy(update={"auth": auth})) as api:
        yield api


async def _written(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """How many rows every table that a request can write holds."""
    tables = [Blob, BlobClaim, Resource, ResourceVersion, IdempotencyKey, ResourceTombstone]
    async with sessions() as session:
        return {
            table.__tablename__: await session.scalar(select(func.count()).select_from(table)) or 0
            for table in tables
        }


async def _workflows(client: Client, resource_id: str) -> int:
    count = await client.count_workflows(f'ResourceId="{resource_id}"')
    return count.count


# --- the matrix -----------------------------------------------------------------------------


async def _check_matrix(
    api: Api,
    defects: list[Defect],
    resource_id: str,
    sessions: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ops = operations(api.app)
    assert {op.method for op in ops} >= {"GET", "PUT", "POST", "DELETE"}
    before = await _written(sessions)
    failures: list[str] = []
    tokens: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for op in ops:
            for defect in defects:
                header = defect.header(op)
                headers = {} if header is None else {"Authorization": header}
                if header is not None:
                    tokens.append(header.removeprefix("Bearer ").removeprefix("Basic "))
                response = await api.http.request(**request_args(op, resource_id), headers=headers)
                problem = _refusal_problem(response, defect, op, header)
                if problem:
                    failures.append(f"{op} / {defect.name}: {problem}")
    assert not failures, "\n".join(failures)
    assert await _written(sessions) == before, "a refused request wrote something"
    logged = caplog.text
    leaked = [token for token in tokens if len(token) > 10 and token in logged]
    assert not leaked, "a token reached the logs"


def _refusal_problem(
    response: httpx.Response, defect: Defect, op: Operation, header: str | None
) -> str | None:
    """What is wrong with the answer to a request with a defective token; None if nothing."""
    if response.status_code != defect.status:
        return f"answered {response.status_code}, not {defect.status}: {response.text[:300]}"
    if response.headers.get("content-type") != PROBLEM:
        return f"content type {response.headers.get('content-type')}"
    body = response.json()
    if body.get("status") != defect.status or not body.get("type", "").startswith("urn:"):
        return f"not a problem document: {body}"
    challenge = response.headers.get("www-authenticate", "")
    if not challenge.startswith("Bearer "):
        return f"WWW-Authenticate is {challenge!r}"
    if defect.error is None and "error=" in challenge:
        return f"a challenge with an error for a request without a token: {challenge}"
    if defect.error is not None and f'error="{defect.error}"' not in challenge:
        return f"WWW-Authenticate {challenge!r} lacks error={defect.error}"
    if defect.status == 403 and f'scope="{" ".join(op.scopes)}"' not in challenge:
        return f"WWW-Authenticate {challenge!r} does not name the scope {op.scopes}"
    if header is not None:
        token = header.split(" ", 1)[-1]
        if token and len(token) > 3 and (token in response.text or token in challenge):
            return "the answer echoes the token"
    return None


async def test_every_route_refuses_every_defective_hs256_token_and_writes_nothing(
    hmac_api: Api,
    worker: Worker,
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A resource that exists, so that DELETE and retry would have something to act on.
    good = auth_headers(hmac_api.settings)
    created = await hmac_api.http.put(
        f"/resources/{resource_id}", json={"info": {"a": "1"}}, headers=good
    )
    assert created.status_code == 201, created.text
    workflows = await _workflows(client, resource_id)

    await _check_matrix(
        hmac_api, hmac_defects(hmac_api.settings.auth), resource_id, sessions, caplog
    )

    kept = await hmac_api.http.get(f"/resources/{resource_id}", headers=good)
    assert kept.status_code == 200 and kept.json()["version"] == 1
    assert kept.json()["attributes"] == {}
    assert await _workflows(client, resource_id) == workflows


async def test_every_route_refuses_every_defective_jwks_token_and_writes_nothing(
    jwks_api: Api,
    keys: Keys,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _check_matrix(
        jwks_api, jwks_defects(jwks_api.settings.auth, keys), resource_id, sessions, caplog
    )


async def test_a_token_with_the_scope_gets_in_on_every_route(hmac_api: Api) -> None:
    """The other side of the matrix: each operation's own scope (and nothing else) suffices."""
    for op in operations(hmac_api.app):
        if op.method != "GET":
            continue  # the writes are exercised by every other API test
        headers = auth_headers(hmac_api.settings, *op.scopes)
        response = await hmac_api.http.request(
            **request_args(op, "no-such-resource"), headers=headers
        )
        assert response.status_code in (200, 404), (str(op), response.text)


# --- JWKS -----------------------------------------------------------------------------------


async def test_jwks_tokens_signed_with_rsa_and_ec_keys_are_accepted(
    jwks_api: Api, keys: Keys
) -> None:
    auth = jwks_api.settings.auth
    for key, alg, kid in ((keys.rsa, "RS256", "rsa-1"), (keys.ec, "ES256", "ec-1")):
        token = jwt.encode(
            claims(auth, scopes=(Scope.READ,)), key, algorithm=alg, headers={"kid": kid}
        )
        response = await jwks_api.http.get(
            "/resources", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, (alg, response.text)


async def test_the_jwks_is_fetched_once_and_unknown_kids_do_not_refetch_it_each_time(
    jwks_api: Api, jwks_server: JwksServer, keys: Keys
) -> None:
    auth = jwks_api.settings.auth
    good = jwt.encode(
        claims(auth, scopes=(Scope.READ,)), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    before = jwks_server.requests
    for _ in range(5):
        response = await jwks_api.http.get(
            "/resources", headers={"Authorization": f"Bearer {good}"}
        )
        assert response.status_code == 200
    for n in range(20):
        unknown = jwt.encode(claims(auth), keys.rsa, algorithm="RS256", headers={"kid": f"k{n}"})
        response = await jwks_api.http.get(
            "/resources", headers={"Authorization": f"Bearer {unknown}"}
        )
        assert response.status_code == 401
    # One fetch for this app's first token, at most one refresh for the unknown kids.
    assert jwks_server.requests - before <= 2


async def test_an_unreachable_jwks_is_a_503_not_a_401(settings: Settings, keys: Keys) -> None:
    auth = Auth(jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json")
    async with _running(settings.model_copy(update={"auth": auth})) as api:
        token = jwt.encode(claims(auth), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
        response = await api.http.get("/resources", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["retry-after"]


# --- configuration: never off by accident ---------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "words"),
    [
        (Auth(), "UPSERTFLOW_AUTH__DISABLED=true"),
        (
            Auth(jwks_url="https://idp.example/jwks", signing_key=SecretStr("k" * 40)),
            "both",
        ),
        (Auth(signing_key=SecretStr("short")), "too short"),
        (Auth(jwks_url="file:///etc/passwd"), "JWKS_URL"),
    ],
    ids=["nothing", "both", "short key", "not http"],
)
def test_the_app_refuses_to_start_without_a_safe_auth_configuration(
    settings: Settings, auth: Auth, words: str
) -> None:
    with pytest.raises(AuthNotConfigured, match=re.escape(words)):
        create_app(settings.model_copy(update={"auth": auth}))


def test_the_api_process_exits_with_the_reason(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("UPSERTFLOW_")}
    env |= {"UPSERTFLOW_API__PORT": str(free_port()), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "api"],
        cwd=tmp_path,  # no `.env`
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "not starting" in done.stderr and "UPSERTFLOW_AUTH__SIGNING_KEY" in done.stderr


async def test_auth_disabled_explicitly_lets_anyone_in_and_says_so_at_start(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    disabled = settings.model_copy(update={"auth": Auth(disabled=True)})
    with caplog.at_level(logging.WARNING, logger="upsertflow.api.auth"):
        async with _running(disabled) as api:
            warnings = [r for r in caplog.records if r.name == "upsertflow.api.auth"]
            assert len(warnings) == 1 and "DISABLED" in warnings[0].getMessage()
            assert (await api.http.get("/resources")).status_code == 200


# --- tokens for `make dev` ------------------------------------------------------------------


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("UPSERTFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "api.tokens", *args],
        cwd=cwd,
        env=base | {"PYTHONPATH": str(REPO_ROOT)} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_token_command_mints_from_the_dev_key_file_or_the_setting(tmp_path: Path) -> None:
    data = tmp_path / "data"
    missing = _cli({"UPSERTFLOW_DEV__DATA_DIR": str(data)}, tmp_path)
    assert missing.returncode != 0 and "make dev" in missing.stderr

    data.mkdir()
    (data / SIGNING_KEY_FILE).write_text("f" * 64 + "\n")
    done = _cli(
        {"UPSERTFLOW_DEV__DATA_DIR": str(data)},
        tmp_path,
        "--scope",
        "resources:read",
        "--subject",
        "alice",
        "--ttl",
        "60",
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    decoded = jwt.decode(
        token, "f" * 64, algorithms=["HS256"], audience="upsertflow", issuer="upsertflow"
    )
    assert decoded["sub"] == "alice" and decoded["scope"] == "resources:read"
    assert 50 <= decoded["exp"] - time.time() <= 60

    key = "g" * 48
    every = _cli({"UPSERTFLOW_AUTH__SIGNING_KEY": key}, tmp_path)
    assert every.returncode == 0, every.stderr
    decoded = jwt.decode(
        every.stdout.strip(), key, algorithms=["HS256"], audience="upsertflow", issuer="upsertflow"
    )
    assert set(decoded["scope"].split()) == set(Scope)


def test_mint_refuses_without_a_key() -> None:
    with pytest.raises(LookupError):
        mint(Auth())


# --- the docs, offline and with the Authorize button ----------------------------------------


_ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_load_only_files_the_app_serves(hmac_api: Api, page: str) -> None:
    response = await hmac_api.http.get(page)
    assert response.status_code == 200
    urls = {a or b for a, b in _ASSET.findall(response.text)}
    urls |= set(re.findall(r'spec-url="([^"]+)"', response.text))
    assert urls, response.text
    remote = [url for url in urls if not url.startswith("/") or url.startswith("//")]
    assert not remote, f"{page} loads from elsewhere: {remote}"
    assert "http://" not in response.text and "https://" not in response.text
    kinds = {}
    for url in urls:
        asset = await hmac_api.http.get(url)
        assert asset.status_code == 200, url
        kinds[url.rsplit(".", 1)[-1]] = asset.headers["content-type"]
        assert len(asset.content) > 1000 or url.endswith(".json"), url
    if page == "/docs":
        assert "javascript" in kinds["js"] and "text/css" in kinds["css"]
        assert (
            "SwaggerUIBundle" in (await hmac_api.http.get("/docs/static/swagger-ui-bundle.js")).text
        )


async def test_openapi_documents_the_bearer_scheme_and_every_operations_scopes(
    hmac_api: Api,
) -> None:
    spec = (await hmac_api.http.get("/openapi.json")).json()
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    expected = {
        ("GET", "/resources"): (Scope.READ,),
        ("GET", "/resources/{resource_id}"): (Scope.READ,),
        ("GET", "/resources/{resource_id}/context"): (Scope.READ,),
        ("GET", "/resources/{resource_id}/etl"): (Scope.READ,),
        ("PUT", "/resources/{resource_id}"): (Scope.WRITE,),
        ("DELETE", "/resources/{resource_id}"): (Scope.OPERATE,),
        ("POST", "/resources/{resource_id}/etl/retry"): (Scope.OPERATE,),
        ("POST", "/etl/reprocess"): (Scope.OPERATE,),
        ("GET", "/etl/reprocess/{job_id}"): (Scope.READ,),
        ("POST", "/etl/reprocess/{job_id}/pause"): (Scope.OPERATE,),
        ("POST", "/etl/reprocess/{job_id}/resume"): (Scope.OPERATE,),
        ("DELETE", "/etl/reprocess/{job_id}"): (Scope.OPERATE,),
    }
    found = {(op.method, op.path): op.scopes for op in operations(hmac_api.app)}
    assert {key: found.get(key) for key in expected} == expected
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"]
    for op in operations(hmac_api.app):
        responses = spec["paths"][op.path][op.method.lower()]["responses"]
        assert {"401", "403"} <= set(responses), str(op)


async def test_probes_and_docs_need_no_token(hmac_api: Api) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"):
        assert (await hmac_api.http.get(path)).status_code == 200, path
