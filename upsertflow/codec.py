"""Payload encryption: what upsertflow hands Temporal is AES-256-GCM ciphertext.

`EncryptionCodec` encrypts every payload (inputs, results, heartbeat details, memos,
summaries, failure messages and stack traces with the failure converter of
`upsertflow.temporal`) with the first of its keys, and names that key in the payload's
metadata (`encoding: binary/encrypted`, `encryption-key-id`). It decrypts with whichever
listed key a payload names, so keys rotate without a stop: put the new key first, keep the
old ones until no history that needs them is kept. Payloads that are not encrypted (written
before encryption was turned on) pass through unchanged.

The wire format is the one of Temporal's encryption samples (samples-python `encryption/`):
the data is the 12-byte random nonce followed by the ciphertext and its tag, of the
serialized original payload.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from upsertflow.settings import Codec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12
#: What a key id may be: it is stored in clear in every payload's metadata.
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class CodecKeyError(ValueError):
    """The configured keys are not valid. The message never holds key material."""


class UndecryptablePayload(ValueError):
    """A payload cannot be decrypted. The message never holds the payload or a key."""


@dataclass(frozen=True)
class CodecKey:
    """One AES-256 key and the id that names it in the payloads it encrypts."""

    id: str
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls, key_id: str) -> CodecKey:
        """Return a new random key named `key_id`."""
        return cls(key_id, AESGCM.generate_key(bit_length=KEY_BYTES * 8))

    def spec(self) -> str:
        """This key as one entry of `UPSERTFLOW_CODEC__KEYS`: `id:base64`."""
        return f"{self.id}:{base64.b64encode(self.secret).decode()}"


def parse_keys(spec: str) -> list[CodecKey]:
    """Parse `id:base64-key` entries separated by commas or line breaks, first one first.

    Each key must be 32 bytes of standard or URL-safe base64, each id unique and made of
    `[A-Za-z0-9._-]`. Blank entries are skipped; an empty spec is no keys.
    """
    keys: list[CodecKey] = []
    for number, entry in enumerate(filter(None, (e.strip() for e in re.split(r"[,\n]", spec)))):
        key_id, colon, encoded = entry.partition(":")
        key_id = key_id.strip()
        where = f"key {number + 1}" + (f" ({key_id!r})" if KEY_ID_PATTERN.fullmatch(key_id) else "")
        if not colon:
            raise CodecKeyError(f"{where}: expected `key-id:base64-key`")
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise CodecKeyError(f"{where}: the key id must be 1 to 64 of [A-Za-z0-9._-]")
        secret = _decode_key(encoded.strip(), where)
        if any(key.id == key_id for key in keys):
            raise CodecKeyError(f"{where}: the key id {key_id!r} is listed twice")
        keys.append(CodecKey(key_id, secret))
    return keys


def _decode_key(encoded: str, where: str) -> bytes:
    try:
        secret = base64.b64decode(encoded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise CodecKeyError(f"{where}: the key is not valid base64") from None
    if len(secret) != KEY_BYTES:
        raise CodecKeyError(
            f"{where}: the key is {len(secret)} bytes; AES-256 needs {KEY_BYTES} "
            f"(generate one with: python -m upsertflow.codec)"
        )
    return secret


def load_keys(settings: Codec) -> list[CodecKey]:
    """The keys of the settings: `keys`, or the contents of `keys_file` (not both)."""
    spec = settings.keys.get_secret_value()
    if settings.keys_file is not None:
        if spec.strip():
            raise CodecKeyError(
                "set UPSERTFLOW_CODEC__KEYS or UPSERTFLOW_CODEC__KEYS_FILE, not both"
            )
        try:
            spec = settings.keys_file.read_text()
        except OSError as error:
            raise CodecKeyError(
                f"cannot read the codec keys file {settings.keys_file}: {error.strerror}"
            ) from None
        if not spec.strip():
            raise CodecKeyError(f"the codec keys file {settings.keys_file} holds no key")
    return parse_keys(spec)


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM: encrypt with the first key, decrypt with the key each payload names."""

    def __init__(self, keys: Sequence[CodecKey]) -> None:
        if not keys:
            raise CodecKeyError("an encryption codec needs at least one key")
        self._current = keys[0]
        self._ciphers = {key.id: AESGCM(key.secret) for key in keys}

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys, the one that encrypts first."""
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        """Return `payload` encrypted with the current key."""
        nonce = os.urandom(NONCE_BYTES)
        cipher = self._ciphers[self._current.id]
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: self._current.id.encode()},
            data=nonce + cipher.encrypt(nonce, payload.SerializeToString(), None),
        )

    def decrypt(self, payload: Payload) -> Payload:
        """Return the original of an encrypted payload; any other payload as it is."""
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        raw_id = payload.metadata.get(KEY_ID, b"")
        key_id = raw_id.decode("utf-8", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            shown = repr(key_id) if KEY_ID_PATTERN.fullmatch(key_id) else "with an invalid id"
            raise UndecryptablePayload(
                f"a payload is encrypted with the key {shown}, which is not configured "
                f"(configured: {', '.join(self._ciphers)}); add that key to "
                "UPSERTFLOW_CODEC__KEYS after the current one to read it"
            )
        if len(payload.data) < NONCE_BYTES + 16:
            raise UndecryptablePayload(f"a payload encrypted with the key {key_id!r} is truncated")
        try:
            plain = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], None)
        except InvalidTag:
            raise UndecryptablePayload(
                f"a payload encrypted with the key {key_id!r} fails authentication: it was "
                "altered, or encrypted with another key of the same id"
            ) from None
        try:
            return Payload.FromString(plain)
        except DecodeError:
            raise UndecryptablePayload(
                f"a payload encrypted with the key {key_id!r} does not hold a payload"
            ) from None


def main() -> None:
    """`python -m upsertflow.codec [KEY_ID]`: print a new key, an entry of the codec keys."""
    key_id = sys.argv[1] if len(sys.argv) > 1 else datetime.now(UTC).strftime("k%Y%m%d")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise SystemExit("the key id must be 1 to 64 of [A-Za-z0-9._-]")
    print(CodecKey.generate(key_id).spec())


if __name__ == "__main__":
    main()
