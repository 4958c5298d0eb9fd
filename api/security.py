"""Who may call the API: OAuth2 bearer JWTs, verified with PyJWT, and scopes per operation.

Tokens are verified against an identity provider's JWKS (`UPSERTFLOW_AUTH__JWKS_URL`,
asymmetric algorithms only) or a local HMAC key (`UPSERTFLOW_AUTH__SIGNING_KEY`, HS256
only: `make dev` and the tests); never both, and never `alg: none`. A token must carry
`exp` and `sub`, the configured `aud` and `iss`, and be valid now (`nbf`, `iat`), with
`leeway_seconds` of clock skew. Its scopes are the space-separated `scope` claim (or an
`scp` list).

Every route declares the scopes it needs with `require_scopes(...)` (writes, rate limited
too, with `api.ratelimit.require_write`). The checks run before the route reads its body
or touches the database. A refused request is a problem document: `401` (no token, or
one that does not verify) or `403` (a valid token without the scope), with a
`WWW-Authenticate: Bearer` challenge (RFC 6750); neither ever echoes the token.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import jwt
import structlog
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from api.problems import Problem
from upsertflow.settings import Auth, Settings

log = logging.getLogger("upsertflow.api.auth")


class Scope(StrEnum):
    """What a token may do."""

    READ = "resources:read"
    WRITE = "resources:write"
    OPERATE = "etl:operate"
    CODEC = "codec"


SCOPE_DESCRIPTIONS = {
    Scope.READ: "read resources, their context and their ETL",
    Scope.WRITE: "create and update resources (PUT)",
    Scope.OPERATE: "retry ETLs and delete resources",
    Scope.CODEC: "decode and encode Temporal payloads (the Web UI's codec server)",
}

#: What a JWKS may sign with: asymmetric algorithms only, so that a public key can never
#: be used as an HMAC secret (algorithm confusion).
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
HMAC_ALGORITHMS = ("HS256",)
#: The shortest local signing key accepted (RFC 7518 §3.2: at least the hash's size).
MIN_SIGNING_KEY_BYTES = 32
REALM = "upsertflow"
#: How long a fetched JWKS is used before it is fetched again; a token with an unknown
#: `kid` fetches it at most once per `JWKS_REFRESH_COOLDOWN_SECONDS`.
JWKS_CACHE_SECONDS = 300
JWKS_REFRESH_COOLDOWN_SECONDS = 30
JWKS_TIMEOUT_SECONDS = 5
_MAX_LOGGED_SUBJECT = 200


class AuthNotConfigured(RuntimeError):
    """The API cannot verify tokens and was not told, explicitly, to let anyone in."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's subject and the scopes it grants."""

    subject: str
    scopes: frozenset[str]
    #: False when auth is disabled: anyone, with every scope.
    authenticated: bool = True


ANONYMOUS = Caller("anonymous", frozenset(Scope), authenticated=False)


def check_config(auth: Auth) -> None:
    """Refuse a configuration that would let callers in by accident, or is ambiguous."""
    if auth.disabled:
        return
    key = auth.signing_key.get_secret_value()
    if auth.jwks_url and key:
        raise AuthNotConfigured(
            "both UPSERTFLOW_AUTH__JWKS_URL and UPSERTFLOW_AUTH__SIGNING_KEY are set: set one "
            "(a JWKS in production, a local signing key for development)"
        )
    if not auth.jwks_url and not key:
        raise AuthNotConfigured(
            "the API cannot verify tokens: set UPSERTFLOW_AUTH__JWKS_URL (your identity "
            "provider's JSON Web Key Set) or UPSERTFLOW_AUTH__SIGNING_KEY (a local key, "
            "as `make dev` does); or, to let anyone call every route, set "
            "UPSERTFLOW_AUTH__DISABLED=true"
        )
    if key and len(key.encode()) < MIN_SIGNING_KEY_BYTES:
        raise AuthNotConfigured(
            f"UPSERTFLOW_AUTH__SIGNING_KEY is too short: at least {MIN_SIGNING_KEY_BYTES} "
            "bytes (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    if auth.jwks_url:
        try:
            jwt.PyJWKClient(auth.jwks_url)
        except jwt.PyJWKClientError as error:
            raise AuthNotConfigured(f"UPSERTFLOW_AUTH__JWKS_URL: {error}") from None


#: Hosts only this machine can reach.
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def anonymous_scopes(settings: Settings) -> frozenset[str]:
    """The scopes a call without a token holds: none, but `codec` under `make dev` for the
    dev server's Web UI (`UPSERTFLOW_CODEC__DEV_UI_WITHOUT_TOKEN`), which has no login. Refused
    on a non-loopback address; a warning on loopback."""
    if not settings.codec.dev_ui_without_token:
        return frozenset()
    if settings.api.host not in LOOPBACK:
        raise AuthNotConfigured(
            "UPSERTFLOW_CODEC__DEV_UI_WITHOUT_TOKEN is for `make dev` on loopback only: "
            f"the API listens on {settings.api.host}, where others could decrypt payloads"
        )
    log.warning(
        "the codec endpoints answer WITHOUT a token (UPSERTFLOW_CODEC__DEV_UI_WITHOUT_TOKEN, "
        "for the dev server's Web UI): anyone on this machine may decrypt payloads"
    )
    return frozenset({Scope.CODEC})


def warn_if_disabled(auth: Auth) -> None:
    """Log, at every start, that auth is off, if it is."""
    if auth.disabled:
        log.warning(
            "authentication is DISABLED (UPSERTFLOW_AUTH__DISABLED=true): anyone who can reach "
            "the API may call every route; never run it so where others can reach it"
        )


class TokenVerifier:
    """Verify bearer tokens as the settings say; one per app."""

    def __init__(self, auth: Auth, anonymous: frozenset[str] = frozenset()) -> None:
        check_config(auth)
        self.auth = auth
        #: What a call without a token may do (`anonymous_scopes`).
        self.anonymous = anonymous
        self._key = auth.signing_key.get_secret_value().encode()
        self._jwks = (
            jwt.PyJWKClient(
                auth.jwks_url,
                cache_jwk_set=True,
                lifespan=JWKS_CACHE_SECONDS,
                cooldown_duration=JWKS_REFRESH_COOLDOWN_SECONDS,
                timeout=JWKS_TIMEOUT_SECONDS,
            )
            if auth.jwks_url
            else None
        )

    async def verify(self, token: str) -> dict[str, Any]:
        """Return the token's claims, or raise a `401` (or a `503` if the JWKS is unreachable)."""
        key: jwt.PyJWK | bytes
        if self._jwks is not None:
            algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
            header = _header(token)
            if header.get("alg") not in algorithms:
                raise _invalid("the token's algorithm is not accepted")
            key = await asyncio.to_thread(self._signing_key, header.get("kid"))
        else:
            algorithms, key = HMAC_ALGORITHMS, self._key
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=self.auth.audience,
                issuer=self.auth.issuer,
                leeway=self.auth.leeway_seconds,
                options={"require": ["exp", "sub"], "enforce_minimum_key_length": True},
            )
        except jwt.InvalidTokenError as error:
            raise _invalid(_reason(error)) from None
        except jwt.InvalidKeyError:  # a key shorter than its algorithm needs
            raise _invalid("the token's key is too weak") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise _invalid("the token's `sub` is not a string")
        return claims

    def _signing_key(self, kid: object) -> jwt.PyJWK:
        """The JWKS key named by the token's `kid` (blocking: run in a thread)."""
        assert self._jwks is not None
        try:
            self._jwks.get_signing_keys()  # the cached set, or a fetch
        except jwt.PyJWKClientConnectionError as error:
            raise _unavailable("the identity provider's keys", error) from None
        except (jwt.PyJWKClientError, jwt.PyJWKSetError) as error:
            raise _unavailable("the identity provider's keys (no usable key)", error) from None
        if not isinstance(kid, str):
            raise _invalid("the token names no key (`kid`)")
        try:
            return self._jwks.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as error:
            raise _unavailable("the identity provider's keys", error) from None
        except jwt.PyJWKClientError:
            raise _invalid("the token's key (`kid`) is not the identity provider's") from None


def granted_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """The scopes of a token: its `scope` claim (space-separated), or an `scp` list."""
    scopes: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str))
    return frozenset(scopes)


bearer = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An OAuth2 access token (JWT) from your identity provider; under `make dev`, "
    "`python -m api.tokens`. Scopes: "
    + "; ".join(f"`{scope}`: {what}" for scope, what in SCOPE_DESCRIPTIONS.items())
    + ".",
    auto_error=False,
)


async def authorize(
    security_scopes: SecurityScopes,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller, once its token is verified and holds every scope the route requires."""
    verifier: TokenVerifier = request.app.state.token_verifier
    if verifier.auth.disabled:
        return ANONYMOUS
    needed = security_scopes.scopes
    if credentials is None:
        if needed and verifier.anonymous.issuperset(needed):
            return Caller("anonymous", verifier.anonymous, authenticated=False)
        raise _missing(needed)
    claims = await verifier.verify(credentials.credentials)
    caller = Caller(str(claims["sub"]), granted_scopes(claims))
    structlog.contextvars.bind_contextvars(subject=caller.subject[:_MAX_LOGGED_SUBJECT])
    missing = [scope for scope in needed if scope not in caller.scopes]
    if missing:
        log.info("refused: the token lacks the scope %s", " ".join(missing))
        raise _insufficient_scope(needed, missing)
    return caller


def require_scopes(*scopes: str) -> Any:
    """A route dependency: a valid token that holds every one of `scopes`.

    `@router.get(..., dependencies=[require_scopes(Scope.READ)])`; or, for the caller
    itself, a parameter `caller: Annotated[Caller, require_scopes(Scope.READ)]`.
    """
    return Security(authorize, scopes=list(scopes))


# --- the answers ----------------------------------------------------------------------------


def _challenge(**params: str) -> dict[str, str]:
    values = ", ".join(f'{name}="{value}"' for name, value in {"realm": REALM, **params}.items())
    return {"WWW-Authenticate": f"Bearer {values}"}


def _missing(needed: list[str]) -> Problem:
    scope = {"scope": " ".join(needed)} if needed else {}
    return Problem(
        401,
        "unauthenticated",
        "Unauthorized",
        "this operation needs a bearer token: send `Authorization: Bearer <token>`",
        headers=_challenge(**scope),
    )


def _invalid(reason: str) -> Problem:
    log.info("refused: %s", reason)
    return Problem(
        401,
        "invalid-token",
        "Unauthorized",
        f"{reason}; get a new token",
        headers=_challenge(error="invalid_token", error_description=reason),
    )


def _insufficient_scope(needed: list[str], missing: list[str]) -> Problem:
    return Problem(
        403,
        "insufficient-scope",
        "Forbidden",
        f"this operation needs the scope {' '.join(missing)}, which the token does not grant",
        headers=_challenge(
            error="insufficient_scope",
            error_description="the token lacks a scope this operation needs",
            scope=" ".join(needed),
        ),
    )


def _unavailable(what: str, error: Exception) -> Problem:
    log.warning("cannot verify tokens: %s unreachable (%s)", what, type(error).__name__)
    return Problem(
        503,
        "auth-unavailable",
        "Service unavailable",
        f"the API cannot verify tokens right now: {what} cannot be fetched; try again later",
        headers={"Retry-After": "5"},
    )


def _header(token: str) -> dict[str, Any]:
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise _invalid("the token is malformed") from None
    return header


_REASONS: list[tuple[type[jwt.InvalidTokenError], str]] = [
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.InvalidIssuerError, "the token is from another issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.DecodeError, "the token is malformed"),
]


def _reason(error: jwt.InvalidTokenError) -> str:
    """Why a token was refused, in words that never quote it."""
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the token has no `{error.claim}` claim"
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "the token is invalid"
