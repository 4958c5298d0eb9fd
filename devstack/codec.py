"""Payload encryption in the dev stack: a local key, made once, and the Web UI's codec server.

Unless keys are configured (`UPSERTFLOW_CODEC__KEYS` or `UPSERTFLOW_CODEC__KEYS_FILE`), the
stack writes one fresh key to `<data dir>/codec-keys` (mode 0600) the first time and hands
that file to its workers and APIs: what `make dev` stores in Temporal is encrypted, and stays
readable across runs. The dev server's Web UI decodes through the first API's `/codec`, whose
CORS origins include the UI's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from upsertflow.codec import CodecKey
from upsertflow.settings import Codec

KEYS = "UPSERTFLOW_CODEC__KEYS"
KEYS_FILE = "UPSERTFLOW_CODEC__KEYS_FILE"
CORS_ORIGINS = "UPSERTFLOW_CODEC__CORS_ORIGINS"
#: The id of the key the stack makes.
LOCAL_KEY_ID = "local"


def codec_from_env(env: Mapping[str, str]) -> Codec:
    """The codec settings that a child with exactly `env` reads."""
    return Codec(
        keys=SecretStr(env.get(KEYS, "")),
        keys_file=Path(env[KEYS_FILE]) if env.get(KEYS_FILE) else None,
        **({"cors_origins": json.loads(env[CORS_ORIGINS])} if env.get(CORS_ORIGINS) else {}),
    )


def has_keys(codec: Codec) -> bool:
    return bool(codec.keys.get_secret_value().strip()) or codec.keys_file is not None


def make_key_file(path: Path) -> None:
    """Write one new key to `path`, readable by its owner only, unless the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as file:
        file.write(CodecKey.generate(LOCAL_KEY_ID).spec() + "\n")


def ui_origins(ui_url: str) -> list[str]:
    """The origins a browser may show the Web UI at: `localhost` and `127.0.0.1`."""
    port = urlsplit(ui_url).port
    return [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]


def with_origins(origins: Sequence[str], extra: Sequence[str]) -> list[str]:
    return [*origins, *(origin for origin in extra if origin not in origins)]


def codec_endpoint(api_url: str) -> str:
    """The codec server a browser reaches: the API's `/codec`, on a host it can call."""
    parts = urlsplit(api_url)
    if parts.hostname in ("0.0.0.0", "::"):
        return f"{parts.scheme}://localhost:{parts.port}/codec"
    return f"{api_url}/codec"
