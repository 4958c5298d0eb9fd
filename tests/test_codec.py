"""Payload encryption: the codec, its keys and their rotation, the codec server, and what
a real Temporal server stores of an upsert (`temporal workflow show -o json`)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from google.protobuf import json_format
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DefaultFailureConverterWithEncodedAttributes
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from api.main import create_app
from api.routes.codec import MAX_PAYLOADS
from api.security import AuthNotConfigured, Scope
from devstack import Stack, StackConfig, venv_binary
from devstack.codec import make_key_file
from tests.helpers import auth_headers, wait_for_etl
from upsertflow import codec as codec_module
from upsertflow import temporal
from upsertflow.codec import (
    ENCODING,
    KEY_ID,
    CodecKey,
    CodecKeyError,
    EncryptionCodec,
    UndecryptablePayload,
    load_keys,
    parse_keys,
)
from upsertflow.contracts import EtlProgress
from upsertflow.settings import Auth, Codec, Limits, Settings

OLD = CodecKey.generate("old")
NEW = CodecKey.generate("new")
SECRET_TEXT = "the secret info of a resource"


def payload(value: object) -> Payload:
    [converted] = pydantic_data_converter.payload_converter.to_payloads([value])
    return converted


def key_material(*keys: CodecKey) -> list[str]:
    """Every way a key's bytes could be spelled in a message."""
    return [
        spelling
        for key in keys
        for spelling in (
            base64.b64encode(key.secret).decode(),
            base64.urlsafe_b64encode(key.secret).decode(),
            key.secret.hex(),
            repr(key.secret),
        )
    ]


# --- the codec -----------------------------------------------------------------------------


async def test_round_trip_encrypts_every_payload_with_a_fresh_nonce() -> None:
    codec = EncryptionCodec([OLD])
    original = [payload({"info": SECRET_TEXT}), payload(SECRET_TEXT)]

    encoded = await codec.encode(original)
    again = await codec.encode(original)

    for item in encoded:
        assert item.metadata["encoding"] == ENCODING == b"binary/encrypted"
        assert item.metadata[KEY_ID] == b"old"
        assert SECRET_TEXT.encode() not in item.data
    assert [item.data for item in encoded] != [item.data for item in again]  # random nonces
    assert await codec.decode(encoded) == original


async def test_payloads_that_are_not_encrypted_pass_through_decode() -> None:
    plain = [payload({"written": "before encryption was turned on"})]
    assert await EncryptionCodec([OLD]).decode(plain) == plain


async def test_rotation_new_key_first_old_kept_reads_both_and_writes_with_the_new() -> None:
    before = await EncryptionCodec([OLD]).encode([payload(SECRET_TEXT)])
    rotated = EncryptionCodec([NEW, OLD])

    assert await rotated.decode(before) == [payload(SECRET_TEXT)]
    [after] = await rotated.encode([payload(SECRET_TEXT)])
    assert after.metadata[KEY_ID] == b"new"
    assert rotated.key_ids == ["new", "old"]


async def test_a_removed_key_fails_clearly_without_key_material_or_payload() -> None:
    before = await EncryptionCodec([OLD]).encode([payload(SECRET_TEXT)])

    with pytest.raises(UndecryptablePayload) as raised:
        await EncryptionCodec([NEW]).decode(before)

    message = str(raised.value)
    assert "'old'" in message and "not configured" in message and "new" in message
    for leak in [SECRET_TEXT, *key_material(OLD, NEW)]:
        assert leak not in message


async def test_an_altered_payload_fails_authentication() -> None:
    [encrypted] = await EncryptionCodec([OLD]).encode([payload(SECRET_TEXT)])
    altered = Payload(metadata=dict(encrypted.metadata), data=encrypted.data[:-1] + b"\0")
    truncated = Payload(metadata=dict(encrypted.metadata), data=encrypted.data[:20])
    # The same id on another key: as good as altered.
    other = EncryptionCodec([CodecKey("old", NEW.secret)])

    for codec, item in ((EncryptionCodec([OLD]), altered), (other, encrypted)):
        with pytest.raises(UndecryptablePayload, match="fails authentication"):
            await codec.decode([item])
    with pytest.raises(UndecryptablePayload, match="truncated"):
        await EncryptionCodec([OLD]).decode([truncated])


# --- the keys ------------------------------------------------------------------------------


def test_keys_parse_from_commas_or_lines_first_one_first() -> None:
    url_safe = f"{NEW.id}:{base64.urlsafe_b64encode(NEW.secret).decode()}"
    for spec in (f"{OLD.spec()},{NEW.spec()}", f"\n {OLD.spec()}\n\n{url_safe}\n"):
        assert parse_keys(spec) == [OLD, NEW]
    assert parse_keys("") == [] and parse_keys(" , \n") == []


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        (base64.b64encode(OLD.secret).decode(), "expected `key-id:base64-key`"),
        (f"bad id:{base64.b64encode(OLD.secret).decode()}", "key id must be"),
        (f":{base64.b64encode(OLD.secret).decode()}", "key id must be"),
        (f"k1:{base64.b64encode(OLD.secret[:16]).decode()}", "16 bytes; AES-256 needs 32"),
        (f"k1:{base64.b64encode(OLD.secret).decode()}!", "not valid base64"),
        (f"{OLD.spec()},{CodecKey('old', NEW.secret).spec()}", "'old' is listed twice"),
    ],
)
def test_invalid_keys_are_refused_without_showing_them(spec: str, complaint: str) -> None:
    with pytest.raises(CodecKeyError, match=complaint) as raised:
        parse_keys(spec)
    for leak in key_material(OLD, NEW):
        assert leak not in str(raised.value)


def test_keys_come_from_the_setting_or_a_secret_file_not_both(tmp_path: Path) -> None:
    path = tmp_path / "codec-keys"
    path.write_text(f"{NEW.spec()}\n{OLD.spec()}\n")
    assert load_keys(Codec(keys_file=path)) == [NEW, OLD]
    assert load_keys(Codec(keys=SecretStr(OLD.spec()))) == [OLD]
    assert load_keys(Codec()) == []
    with pytest.raises(CodecKeyError, match="not both"):
        load_keys(Codec(keys=SecretStr(OLD.spec()), keys_file=path))
    path.write_text("\n")
    with pytest.raises(CodecKeyError, match="holds no key"):
        load_keys(Codec(keys_file=path))
    with pytest.raises(CodecKeyError, match="cannot read"):
        load_keys(Codec(keys_file=tmp_path / "missing"))


def test_the_key_generator_prints_a_key_the_settings_take(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["python -m upsertflow.codec", "k2"])
    codec_module.main()
    [key] = parse_keys(capsys.readouterr().out)
    assert key.id == "k2" and len(key.secret) == 32


# --- the data converter --------------------------------------------------------------------


async def test_the_data_converter_encrypts_payloads_and_failure_messages() -> None:
    assert temporal.data_converter(Codec()) is pydantic_data_converter
    converter = temporal.data_converter(Codec(keys=SecretStr(OLD.spec())))
    assert isinstance(converter.failure_converter, DefaultFailureConverterWithEncodedAttributes)
    assert converter.payload_converter_class is pydantic_data_converter.payload_converter_class

    [encoded] = await converter.encode([{"info": SECRET_TEXT}])
    assert encoded.metadata["encoding"] == ENCODING
    assert await converter.decode([encoded]) == [{"info": SECRET_TEXT}]

    failure = Failure()
    await converter.encode_failure(ApplicationError(f"failed on {SECRET_TEXT}"), failure)
    assert failure.message == "Encoded failure" and not failure.stack_trace
    assert SECRET_TEXT.encode() not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert str(decoded) == f"failed on {SECRET_TEXT}"


# --- the codec server ----------------------------------------------------------------------

UI_ORIGIN = "http://localhost:8233"
ELSEWHERE = "https://evil.example"
#: What the Temporal UI sends to `<endpoint>/decode` (its query included).
UI_HEADERS = {"Origin": UI_ORIGIN, "X-Namespace": "default"}
DECODE = "/codec/decode?preserveStorageRefs=true"


@pytest.fixture
def codec_settings() -> Settings:
    """An API on no database or Temporal server (both are lazy): the codec needs neither."""
    return Settings(
        database_url=SecretStr("postgresql+asyncpg://nobody@/nowhere?host=/nonexistent"),
        codec=Codec(keys=SecretStr(f"{NEW.spec()},{OLD.spec()}"), cors_origins=[UI_ORIGIN]),
        auth=Auth(signing_key=SecretStr(CodecKey.generate("auth").spec())),
        limits=Limits(max_body_bytes=64 * 1024),
    )


@pytest.fixture
async def codec_api(codec_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(codec_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            http.headers.update(auth_headers(codec_settings, Scope.CODEC))
            yield http


def as_json(*payloads: Payload) -> dict[str, Any]:
    body: dict[str, Any] = json_format.MessageToDict(Payloads(payloads=payloads))
    return body


def from_json(body: dict[str, Any]) -> list[Payload]:
    return list(json_format.ParseDict(body, Payloads()).payloads)


async def test_codec_server_round_trip_and_rotation(codec_api: httpx.AsyncClient) -> None:
    original = payload({"info": SECRET_TEXT})

    encoded = await codec_api.post("/codec/encode", json=as_json(original), headers=UI_HEADERS)
    assert encoded.status_code == 200, encoded.text
    [encrypted] = from_json(encoded.json())
    assert encrypted.metadata[KEY_ID] == b"new" and SECRET_TEXT not in encoded.text
    from_old_key = await EncryptionCodec([OLD]).encode([original])
    plain = payload("not encrypted")
    decoded = await codec_api.post(
        DECODE, json=as_json(encrypted, *from_old_key, plain), headers=UI_HEADERS
    )

    assert decoded.status_code == 200, decoded.text
    assert decoded.headers["access-control-allow-origin"] == UI_ORIGIN
    assert from_json(decoded.json()) == [original, original, plain]
    empty = await codec_api.post(DECODE, json={"payloads": []})
    assert empty.json() == {"payloads": []}


async def test_codec_server_refuses_clearly(codec_api: httpx.AsyncClient) -> None:
    [unknown] = await EncryptionCodec([CodecKey.generate("gone")]).encode([payload(SECRET_TEXT)])
    for body, status, kind in (
        (as_json(unknown), 422, "undecryptable-payload"),
        ({"payloads": [{"data": "not base64!"}]}, 400, "invalid-payloads"),
        ({"payloads": "many"}, 400, "invalid-payloads"),
        ([], 400, "invalid-payloads"),
    ):
        response = await codec_api.post(DECODE, json=body)
        assert response.status_code == status, response.text
        assert response.json()["type"].endswith(kind)
        assert SECRET_TEXT not in response.text
        assert not any(leak in response.text for leak in key_material(OLD, NEW))
    huge = as_json(payload("x" * 100_000))
    assert (await codec_api.post(DECODE, json=huge)).status_code == 413
    many = await codec_api.post(DECODE, json={"payloads": [{}] * (MAX_PAYLOADS + 1)})
    assert many.status_code == 422 and many.json()["type"].endswith("too-many-payloads")
    form = await codec_api.post(DECODE, content=b"payloads", headers={"Content-Type": "text/plain"})
    assert form.status_code == 415


async def test_codec_server_needs_a_token_with_the_codec_scope(
    codec_api: httpx.AsyncClient, codec_settings: Settings
) -> None:
    body = as_json(payload("x"))
    reader = auth_headers(codec_settings, Scope.READ, Scope.WRITE, Scope.OPERATE)
    anonymous = {"Authorization": ""}

    for headers, status in ((anonymous, 401), (reader, 403)):
        response = await codec_api.post(DECODE, json=body, headers={**UI_HEADERS, **headers})
        assert response.status_code == status, response.text
        assert "www-authenticate" in response.headers
        # The UI can read why (CORS headers on errors too).
        assert response.headers["access-control-allow-origin"] == UI_ORIGIN


async def test_under_make_dev_the_ui_decodes_without_a_token_on_loopback_only(
    codec_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The dev server's Web UI has no login, so cannot send a token: `make dev` lets the
    codec answer without one, on a loopback API only, with a warning at start."""
    tokenless = codec_settings.model_copy(
        update={"codec": codec_settings.codec.model_copy(update={"dev_ui_without_token": True})}
    )
    caplog.set_level(logging.WARNING, logger="upsertflow.api.auth")
    app = create_app(tokenless)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            original = payload({"info": SECRET_TEXT})
            [encrypted] = await EncryptionCodec([NEW]).encode([original])
            decoded = await http.post(DECODE, json=as_json(encrypted), headers=UI_HEADERS)
            # Only the codec: every other route still needs a token.
            listed = await http.get("/resources")
    assert decoded.status_code == 200, decoded.text
    assert from_json(decoded.json()) == [original]
    assert listed.status_code == 401
    assert "WITHOUT a token" in caplog.text

    public = tokenless.model_copy(
        update={"api": tokenless.api.model_copy(update={"host": "0.0.0.0"})}
    )
    with pytest.raises(AuthNotConfigured, match="loopback"):
        create_app(public)


async def test_codec_cors_preflight_allows_the_ui_origin_only(codec_api: httpx.AsyncClient) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
    }
    allowed = await codec_api.options(DECODE, headers={"Origin": UI_ORIGIN, **preflight})
    refused = await codec_api.options(DECODE, headers={"Origin": ELSEWHERE, **preflight})
    elsewhere = await codec_api.post(DECODE, json=as_json(), headers={"Origin": ELSEWHERE})
    other_route = await codec_api.options(
        "/resources/r1", headers={"Origin": UI_ORIGIN, **preflight}
    )

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "x-namespace"} <= set(allowed_headers.split(", "))
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in elsewhere.headers
    assert "access-control-allow-origin" not in other_route.headers


# --- on the dev server ---------------------------------------------------------------------


def raw_history(address: str, workflow_id: str) -> dict[str, Any]:
    """The history as Temporal stores it, from the CLI, without any codec."""
    command = ["workflow", "show", "-w", workflow_id, "-o", "json", "--address", address]
    done = subprocess.run(
        [venv_binary("temporal"), *command],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    history: dict[str, Any] = json.loads(done.stdout)
    return history


#: Payloads the SDK itself writes in clear: a patch marker's id (`pipeline-v2`) and a local
#: activity marker's bookkeeping (its id, type, attempt and times; its result is encrypted).
SDK_BOOKKEEPING = re.compile(r"\.markerRecordedEventAttributes\.details\.(patch-data|data)\.")


def leaves(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def in_clear(history: dict[str, Any], needles: list[str]) -> list[str]:
    """Where `needles` appear, as text or base64-decoded, outside workflow ids and search
    attributes (which Temporal stores as they are)."""
    found = []
    for path, value in leaves(history):
        if not isinstance(value, str) or ".searchAttributes." in path:
            continue
        if path.endswith(".workflowId"):
            continue
        texts = [value]
        try:
            texts.append(base64.b64decode(value, validate=True).decode("utf-8", "replace"))
        except ValueError:
            pass
        found += [f"{path}: {needle}" for needle in needles for text in texts if needle in text]
    return found


def payloads_in(value: object, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(value, dict):
        if isinstance(value.get("metadata"), dict) and "encoding" in value["metadata"]:
            yield path, value
            return
        for key, item in value.items():
            yield from payloads_in(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from payloads_in(item, f"{path}[{index}]")


def failures_in(value: object) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("failure", "cause") and isinstance(item, dict):
                yield item
            yield from failures_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from failures_in(item)


async def test_the_raw_history_holds_no_resource_data_stats_or_errors_in_clear(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    temporal_address: str,
    resource_id: str,
) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"
    info = {"Contact": {"Email": f"{marker}@example.org", "Country": "FR"}, "Note": marker}
    # The first enrichment call is refused (a 400): the ETL fails, a failure in the history.
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    created = await api.put(f"/resources/{resource_id}", json={"info": info})
    assert created.status_code == 201, created.text
    done = await wait_for_etl(api, resource_id, version=1)
    assert done["etl"]["status"] == "failed", done
    workflow_id = done["etl"]["workflow_id"]
    with pytest.raises(WorkflowFailureError) as failed:
        await client.get_workflow_handle(workflow_id).result()
    error_text = "the enrichment service rejected the request"
    assert error_text in str(failed.value.cause)  # readable with the key

    history = await asyncio.to_thread(raw_history, temporal_address, workflow_id)

    # Resource ids, the data, step stats and error text: nowhere but the workflow id and the
    # search attributes.
    needles = [resource_id, marker, '"records"', '"collisions"', error_text, "Injected fault"]
    assert not in_clear(history, needles)
    assert resource_id in workflow_id
    payloads = list(payloads_in(history))
    assert len(payloads) > 10, "the history holds the workflow's inputs, results and summaries"
    clear = [
        path
        for path, item in payloads
        if ".searchAttributes." not in path
        and not SDK_BOOKKEEPING.search(path)
        and base64.b64decode(item["metadata"]["encoding"]) != ENCODING
    ]
    assert not clear, f"payloads not encrypted: {clear}"
    failures = list(failures_in(history))
    assert failures, "the failed step and workflow are in the history"
    for failure in failures:
        assert failure["message"] == "Encoded failure", failure
        assert not failure.get("stackTrace"), failure
        assert "encodedAttributes" in failure
    # The search attributes are the one place the resource id is stored in clear.
    started = history["events"][0]["workflowExecutionStartedEventAttributes"]
    stored = started["searchAttributes"]["indexedFields"]["ResourceId"]["data"]
    assert json.loads(base64.b64decode(stored)) == resource_id


async def test_rotated_keys_read_old_workflows_and_a_removed_key_fails_clearly(
    api: httpx.AsyncClient,
    worker: Worker,
    codec: Codec,
    temporal_address: str,
    resource_id: str,
) -> None:
    created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
    done = await wait_for_etl(api, resource_id, version=1)
    assert done["etl"]["status"] == "succeeded", done
    workflow_id = created.json()["etl"]["workflow_id"]
    current = codec.keys.get_secret_value()
    rotated = Codec(keys=SecretStr(f"{NEW.spec()},{current}"))
    removed = Codec(keys=SecretStr(NEW.spec()))

    after_rotation = await temporal.connect(codec=rotated)
    handle = after_rotation.get_workflow_handle(workflow_id, result_type=EtlProgress)
    result = await handle.result()
    assert isinstance(result, EtlProgress) and result.status == "succeeded"

    without_old_key = await temporal.connect(codec=removed)
    handle = without_old_key.get_workflow_handle(workflow_id, result_type=EtlProgress)
    with pytest.raises(UndecryptablePayload, match=r"key 'test', which is not configured") as e:
        await handle.result()
    assert not any(leak in str(e.value) for leak in [current.split(":")[1], resource_id])


# --- the dev stack -------------------------------------------------------------------------


def test_the_dev_stack_encrypts_with_a_local_key_and_points_the_ui_at_its_codec(
    tmp_path: Path,
) -> None:
    stack = Stack(StackConfig(root=tmp_path, database_url="postgresql+asyncpg://unused@/x"))

    key_file = tmp_path / "codec-keys"
    assert stack.env["UPSERTFLOW_CODEC__KEYS_FILE"] == str(key_file)
    assert stack.codec.keys_file == key_file
    args = stack.temporal.args
    endpoint = args[args.index("--ui-codec-endpoint") + 1]
    assert endpoint == f"{stack.api_url}/codec"
    assert stack.temporal.ui_url is not None
    ui_origin = f"http://localhost:{urlsplit(stack.temporal.ui_url).port}"
    assert ui_origin in json.loads(stack.env["UPSERTFLOW_CODEC__CORS_ORIGINS"])
    assert stack.codec.cors_origins == json.loads(stack.env["UPSERTFLOW_CODEC__CORS_ORIGINS"])

    make_key_file(key_file)  # what `start()` does, before the workers and APIs start
    [key] = load_keys(stack.codec)
    assert key.id == "local" and key_file.stat().st_mode & 0o777 == 0o600
    make_key_file(key_file)  # made once: the next `make dev` reads what this one wrote
    assert load_keys(stack.codec) == [key]


def test_the_dev_stack_keeps_configured_keys(tmp_path: Path) -> None:
    config = StackConfig(
        root=tmp_path,
        database_url="postgresql+asyncpg://unused@/x",
        temporal_ui_port=None,
        env={"UPSERTFLOW_CODEC__KEYS": OLD.spec()},
    )
    stack = Stack(config)

    assert "UPSERTFLOW_CODEC__KEYS_FILE" not in stack.env
    assert load_keys(stack.codec) == [OLD]
    assert "--ui-codec-endpoint" not in stack.temporal.args  # no UI: nothing to point
    assert "UPSERTFLOW_CODEC__CORS_ORIGINS" not in stack.env
