"""Connecting to Temporal: the SDK's environment configuration, one data converter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig, ClientConnectConfig
from temporalio.runtime import Runtime
from temporalio.service import RPCError

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


async def connect(
    env: Mapping[str, str] | None = None, runtime: Runtime | None = None, **overrides: Any
) -> Client:
    """Connect a client with upsertflow's data converter (pydantic models on the wire)."""
    config: dict[str, Any] = dict(connect_config(env))
    config.update(overrides)
    return await Client.connect(**config, data_converter=pydantic_data_converter, runtime=runtime)
