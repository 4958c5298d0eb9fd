"""Connecting to Temporal: the SDK's environment configuration, one data converter."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.envconfig import ClientConfig, ClientConnectConfig
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from upsertflow import tracing
from upsertflow.codec import EncryptionCodec, load_keys
from upsertflow.settings import Codec, get_settings

DEFAULT_ADDRESS = "localhost:7233"

#: What a call raises when Temporal cannot be reached: an RPC error, or — for a lazy
#: client that has not connected yet — the SDK's RuntimeError("Failed client connect").
UNREACHABLE: tuple[type[Exception], ...] = (RPCError, RuntimeError)


def connect_config(env: Mapping[str, str] | None = None) -> ClientConnectConfig:
    """Read `Client.connect` arguments from `TEMPORAL_*` variables and the TOML profile.

    `TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY` (which turns TLS
    on), `TEMPORAL_TLS_*`, `TEMPORAL_PROFILE` and `TEMPORAL_CONFIG_FILE` are the
    SDK's standard names; with none set, the local dev server is used.
    """
    config = ClientConfig.load_client_connect_config(override_env_vars=env)
    config.setdefault("target_host", DEFAULT_ADDRESS)
    return config


def data_converter(codec: Codec) -> DataConverter:
    """The one data converter of every client, worker, replayer and test environment.

    Pydantic models as JSON; with codec keys, every payload encrypted (`upsertflow.codec`)
    and failure messages and stack traces moved into an encrypted payload too.
    """
    keys = load_keys(codec)
    if not keys:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(
    env: Mapping[str, str] | None = None,
    runtime: Runtime | None = None,
    *,
    codec: Codec | None = None,
    **overrides: Any,
) -> Client:
    """Connect a client with upsertflow's data converter (`data_converter`).

    `codec`: the payload encryption settings; by default the process's (`get_settings()`).
    With tracing on (`upsertflow.tracing`), the client, and a worker built on it, trace.
    """
    config: dict[str, Any] = dict(connect_config(env))
    config.update(overrides)
    config["interceptors"] = [*tracing.temporal_interceptors(), *config.get("interceptors", ())]
    converter = data_converter(codec if codec is not None else get_settings().codec)
    return await Client.connect(**config, data_converter=converter, runtime=runtime)
