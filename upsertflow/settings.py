"""Settings for every process, from the environment (and a `.env` file if present).

The Temporal connection is not here: it comes from the SDK's own environment
configuration (`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`,
`TEMPORAL_TLS_*`, or a TOML profile), see `upsertflow.temporal`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseModel):
    """What the API accepts; each exceeded limit is a clear 4xx."""

    max_body_bytes: int = 10 * 1024 * 1024
    max_depth: int = 32
    max_info_keys: int = 200_000


class EnrichmentRule(BaseModel):
    """Send the records whose dotted path matches `path` (a regex) to the service as `kind`."""

    path: str
    kind: str


class Enrichment(BaseModel):
    """The `enrich` step: which records go to the enrichment service, and how."""

    url: str = "http://127.0.0.1:8300"
    rules: list[EnrichmentRule] = [
        EnrichmentRule(path=r"(^|\.)(country|country_code)$", kind="country_code"),
        EnrichmentRule(path=r"(^|\.)e_?mail(_address)?$", kind="email"),
        EnrichmentRule(path=r"(^|\.)(currency|currency_code)$", kind="currency_code"),
    ]
    batch_size: int = 250
    request_timeout_seconds: float = 5.0
    max_connections: int = 20


class Settings(BaseSettings):
    """All of upsertflow's settings. Environment variables are `UPSERTFLOW_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix="UPSERTFLOW_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("DATABASE_URL", "UPSERTFLOW_DATABASE_URL"),
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://user:pass@host/db. "
        "Empty: `make dev` starts an embedded PostgreSQL.",
    )
    database_pool_size: int = 10
    database_max_overflow: int = 10

    task_queue: str = "upsertflow"
    temporal_ui_url: str = "http://localhost:8233"

    sync_timeout_seconds: float = 10.0
    idempotency_ttl_seconds: int = 24 * 3600
    limits: Limits = Limits()

    enrichment: Enrichment = Enrichment()

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    worker_metrics_port: int = 0
    worker_graceful_shutdown_seconds: float = 30.0
    #: Stored documents that no workflow picked up are collected after this.
    claim_ttl_seconds: int = 48 * 3600
    janitor_interval_seconds: int = 600
    log_format: str = Field(default="text", pattern="^(text|json)$")
    log_level: str = "INFO"

    # `make dev` only: where the embedded servers keep their data, and their ports.
    data_dir: Path = Path(".data")
    dev_temporal_port: int = 7233
    dev_temporal_ui_port: int = 8233
    dev_enrichment_port: int = 8300


@lru_cache
def get_settings() -> Settings:
    """Return the process-wide settings, read once."""
    return Settings()
