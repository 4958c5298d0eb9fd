"""`python -m api.tokens`: mint an access token from the local signing key (`make dev`).

    $ TOKEN=$(.venv/bin/python -m api.tokens)
    $ curl -H "Authorization: Bearer $TOKEN" localhost:8000/resources

The key is `UPSERTFLOW_AUTH__SIGNING_KEY` if set, else the one `make dev` keeps in
`<UPSERTFLOW_DEV__DATA_DIR>/auth-signing-key`. Only for an API that verifies with that
key: in production, tokens come from your identity provider.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import jwt
from pydantic import SecretStr

from api.security import Scope
from upsertflow.settings import Auth, Settings

#: Under the dev data dir: the key `make dev` generates once and its API verifies with.
SIGNING_KEY_FILE = "auth-signing-key"
DEFAULT_TTL_SECONDS = 3600


def mint(
    auth: Auth,
    *,
    subject: str = "dev",
    scopes: Iterable[str] = tuple(Scope),
    ttl: float = DEFAULT_TTL_SECONDS,
    **claims: object,
) -> str:
    """A token the API verifying with `auth.signing_key` accepts, valid for `ttl` seconds."""
    key = auth.signing_key.get_secret_value()
    if not key:
        raise LookupError("no signing key: set UPSERTFLOW_AUTH__SIGNING_KEY")
    now = int(time.time())
    payload = {
        "sub": subject,
        "aud": auth.audience,
        "iss": auth.issuer,
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl),
        "scope": " ".join(scopes),
        **claims,
    }
    return jwt.encode(payload, key, algorithm="HS256")


def ensure_signing_key(path: Path) -> str:
    """The local signing key kept in `path`, made (random, mode 0600) if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_signing_key(path)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_urlsafe(48) + "\n")
    return read_signing_key(path)


def read_signing_key(path: Path) -> str:
    return path.read_text().strip()


def dev_auth(settings: Settings) -> Auth:
    """The settings' auth, with the dev key file's key if no key is set."""
    auth = settings.auth
    if auth.signing_key.get_secret_value():
        return auth
    path = settings.dev.data_dir / SIGNING_KEY_FILE
    if not path.is_file():
        raise LookupError(
            f"no signing key: UPSERTFLOW_AUTH__SIGNING_KEY is not set and {path} does not "
            "exist (`make dev` creates it)"
        )
    return auth.model_copy(update={"signing_key": SecretStr(read_signing_key(path))})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m api.tokens", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--scope",
        action="append",
        choices=[str(scope) for scope in Scope],
        help="a scope to grant (repeat it for several); default: every scope",
    )
    parser.add_argument("--subject", default="dev", help="the caller's identity (`sub`)")
    parser.add_argument(
        "--ttl", type=int, default=DEFAULT_TTL_SECONDS, help="seconds the token is valid"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Print a token on stdout."""
    args = parse_args(argv)
    try:
        auth = dev_auth(Settings())
    except LookupError as error:
        sys.exit(f"python -m api.tokens: {error}")
    if auth.jwks_url:
        print(
            "python -m api.tokens: warning: UPSERTFLOW_AUTH__JWKS_URL is set, so the API "
            "verifies tokens from your identity provider, not this one",
            file=sys.stderr,
        )
    print(mint(auth, subject=args.subject, scopes=args.scope or tuple(Scope), ttl=args.ttl))


if __name__ == "__main__":
    main()
