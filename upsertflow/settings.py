"""Settings for every process, from the environment (and a `.env` file if present).

The Temporal connection is not here: it comes from the SDK's own environment
configuration (`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`,
`TEMPORAL_TLS_*`, or a TOML profile), see `upsertflow.temporal`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseModel):
    """What the API accepts, and so what one request can cost: the cost model, in one place.

    Each is checked by the API (`api.body`) before anything is written, and answered with
    a clear 4xx naming it (`UPSERTFLOW_LIMITS__<NAME>`). The defaults bound what the largest
    accepted request costs: its ETL keeps a worker near 200 MB (under ~300 MB), its context
    is read by a `GET` in well under a second. Raising one raises those costs with it.
    """

    max_body_bytes: int = Field(
        default=10 * 1024 * 1024, ge=2, description="Request body, in bytes (413)."
    )
    max_depth: int = Field(
        default=32, ge=2, description="Nesting of the body, which is level 1 (422)."
    )
    max_info_keys: int = Field(
        default=100_000, ge=0, description="Object keys in `info`, counted at every level (422)."
    )
    max_records: int = Field(
        default=100_000,
        ge=0,
        description="Values in `info` at every level, list items included: each scalar is a "
        "record after flattening, each object and list is walked (422).",
    )
    max_key_chars: int = Field(
        default=256, ge=1, description="Characters of one key in `info` (422)."
    )
    max_path_chars: int = Field(
        default=1024,
        ge=1,
        description="Characters of a dotted path in `info` (its keys and list indexes joined "
        "by dots), the path a record gets after flattening (422).",
    )
    max_flattened_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=0,
        description="UTF-8 bytes of `info` flattened: the sum over its scalars of the dotted "
        "path and the value (a string's own bytes, any other value's JSON text), what the "
        "context stores and a `GET` returns (422).",
    )
    max_attributes_bytes: int = Field(
        default=256 * 1024,
        ge=2,
        description="`attributes` as stored (compact JSON, UTF-8 bytes); every `GET` returns "
        "them (422).",
    )
    max_inline_context_records: int = Field(
        default=1_000,
        ge=0,
        description="The most records of a context that `GET /resources/{id}` returns inline; "
        "a larger context is read page by page at `GET /resources/{id}/context`.",
    )


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
    batch_size: int = 500
    #: Batches of one `enrich` in flight at once (each stored as it is answered).
    concurrency: int = Field(default=4, ge=1, le=64)
    request_timeout_seconds: float = 5.0
    max_connections: int = Field(default=20, ge=1)


class Janitor(BaseModel):
    """What every worker collects and repairs now and then (`upsertflow.janitor`)."""

    interval_seconds: int = 600
    #: A request's stored documents whose workflow never started (or has ended) are
    #: released after this; never while the workflow is open.
    claim_ttl_seconds: int = 48 * 3600
    #: Unreferenced documents untouched for this long are deleted.
    blob_grace_seconds: int = 3600
    #: Step outputs of versions whose ETL ended (failed, superseded, …) are kept this long.
    step_output_grace_seconds: int = 3600
    #: ETL statuses in flight for this long are checked against Temporal.
    reconcile_after_seconds: int = 60


class Api(BaseModel):
    """The API process (`python -m api`): where it listens, how long a request waits."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: How long a synchronous `PUT` waits for the resource to be persisted before it
    #: answers 202 instead of 200/201.
    sync_timeout_seconds: float = 10.0
    #: How long an `Idempotency-Key` is remembered.
    idempotency_ttl_seconds: int = 24 * 3600
    #: Prometheus metrics of this process on their own port (on `host`), never on `port`;
    #: 0: off. Off by default, like the worker's: a listener opens only where it is asked for
    #: (and several API processes on one host each need their own).
    metrics_port: int = Field(default=0, ge=0, le=65535)


class Worker(BaseModel):
    """The worker process (`python worker.py`)."""

    #: Prometheus metrics of the Temporal SDK on this port; 0: off.
    metrics_port: int = 0
    #: How long a stopping worker lets running activities finish.
    graceful_shutdown_seconds: float = 30.0
    #: Run workflow code in the SDK's sandbox, which fails a workflow task whose code calls
    #: something non-deterministic (the clock, random, I/O) and isolates module state per
    #: run. Off by default: it costs a third of the worker's CPU per upsert (it re-imports
    #: the workflow module for every run and wraps every activation; `bench/RESULTS.md`),
    #: and the guard runs where it catches mistakes, before deployment: the replay tests
    #: replay every recorded history in the sandbox, and the policy tests run the
    #: workflows in it (`tests/test_sandbox.py`). On: the guard in production too.
    sandboxed: bool = False
    #: The worker's event loop: `uvloop` (libuv, by asyncpg's authors; uvicorn runs the API
    #: on it too) or the standard library's `asyncio` one. uvloop costs the worker ~20 %
    #: less CPU per upsert (its socket writes, callbacks from the SDK's threads, timers;
    #: `bench/RESULTS.md`). Workflow code never sees it: the SDK runs workflows on its own
    #: deterministic loop either way.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    #: Run as a version of a Worker Deployment (Worker Versioning), its workflows pinned: a
    #: running upsert finishes on the code it started with. False: an unversioned worker,
    #: for a Temporal server without Worker Versioning (< 1.29).
    versioning: bool = True
    #: The Worker Deployment this worker is a version of.
    deployment_name: str = Field(default="upsertflow", min_length=1, pattern=r"^[^.:/\s]+$")
    #: This worker's version of the deployment; empty: derived from the code it runs
    #: (`upsertflow.versioning.default_build_id`: the package version and a code digest).
    build_id: str = Field(default="", max_length=255, pattern=r"^[^:/\s]*$")
    #: What one worker takes on at once for live upserts; the server keeps the rest of a
    #: backlog for whichever worker has a free slot. Sized to what one process serves: its
    #: database pool (`database_pool_size` + `database_max_overflow`, 20), its HTTP pool
    #: (`enrichment.max_connections`, 20) and one event loop. The SDK's default, 100 of
    #: each, let a backlog's first workflow tasks crowd out the enrich attempts already
    #: running (they missed heartbeats and were retried) and the workflows advance
    #: together; with these a backlog of 3,000 drains at a flat rate, each workflow from
    #: start to end in turn (`bench/RESULTS.md`). Regular activities (enrich, webhooks):
    max_concurrent_activities: int = Field(default=20, ge=1)
    #: Workflow tasks (an upsert's two: persist and normalize, then load and record):
    max_concurrent_workflow_tasks: int = Field(default=10, ge=2)
    #: Local activities (persist, normalize, load and the calls around them; each holds
    #: a database connection while it runs):
    max_concurrent_local_activities: int = Field(default=20, ge=1)


class Reprocess(BaseModel):
    """The worker's reprocessing side: its own task queue (`<task_queue>-reprocess`) and
    slots, so that reprocessing jobs never take a slot from a live upsert."""

    #: Activities (re-run steps, pages) one worker runs at once for reprocessing.
    max_concurrent_activities: int = Field(default=10, ge=1)
    #: Workflow tasks (jobs and their re-runs) one worker runs at once for reprocessing.
    max_concurrent_workflow_tasks: int = Field(default=5, ge=2)
    #: Local activities (a re-run's claim and outcome) one worker runs at once.
    max_concurrent_local_activities: int = Field(default=10, ge=1)


class Dev(BaseModel):
    """`make dev` only: where the embedded servers keep their data, and their ports."""

    data_dir: Path = Path(".data")
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    enrichment_port: int = 8300


class Auth(BaseModel):
    """Who may call the API: OAuth2 bearer JWTs (`api.security`).

    Production verifies tokens against an identity provider's JWKS (`jwks_url`); `make dev`
    signs its own with `signing_key`. With neither set the API refuses to start, unless
    `disabled` says, explicitly, that anyone may call it.
    """

    #: Anyone may call every route. Never the default; logged as a warning at start.
    disabled: bool = False
    #: The identity provider's JSON Web Key Set (asymmetric keys: RS256, ES256, …).
    jwks_url: str = ""
    #: A local HMAC key (HS256) for `make dev` and tests; tokens from `python -m api.tokens`.
    signing_key: SecretStr = SecretStr("")
    #: The `aud` and `iss` every token must carry.
    audience: str = Field(default="upsertflow", min_length=1)
    issuer: str = Field(default="upsertflow", min_length=1)
    #: Clock skew allowed on `exp` and `nbf`.
    leeway_seconds: int = Field(default=30, ge=0)


class Codec(BaseModel):
    """Payload encryption (`upsertflow.codec`): what Temporal stores is AES-GCM ciphertext.

    `keys` is a comma-separated list of `key-id:base64-key` (32-byte keys); the first
    encrypts, every listed one decrypts (rotation: put the new key first, keep the old
    ones until no history needs them). Empty: payloads are not encrypted.
    """

    keys: SecretStr = SecretStr("")
    #: A file holding the keys instead (a mounted secret): the same entries, separated by
    #: commas or lines. Read once at start.
    keys_file: Path | None = None
    #: Origins allowed to call the codec endpoints from a browser (the Temporal UI).
    cors_origins: list[str] = ["http://localhost:8233", "http://localhost:8080"]
    #: `make dev` only: the codec endpoints answer without a token, because the dev
    #: server's Web UI has no login and so cannot send one. Anyone who can reach the API
    #: can then decrypt payloads: an API listening beyond loopback refuses to start so.
    dev_ui_without_token: bool = False


class Webhooks(BaseModel):
    """Completion notifications (`activities.webhooks`): a POST to `url` whenever an ETL ends
    (succeeded, failed, superseded, cancelled), signed with `secret`.

    Delivered by a workflow of its own (`webhook:<upsert workflow id>`) with retries, after
    the ETL's outcome is recorded: a slow or failing receiver never holds up an ETL. One
    URL for every resource: per-request URLs would let any caller make the workers call
    any address (server-side request forgery).
    """

    #: Where to POST; empty: no notifications.
    url: str = Field(default="", pattern=r"^(https?://.+)?$")
    #: The HMAC-SHA256 key of the `Upsertflow-Signature` header (required with a `url`).
    secret: SecretStr = SecretStr("")
    #: Per delivery attempt.
    timeout_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _signed(self) -> Webhooks:
        if self.url and not self.secret.get_secret_value():
            raise ValueError("UPSERTFLOW_WEBHOOKS__URL needs UPSERTFLOW_WEBHOOKS__SECRET")
        return self


class RateLimit(BaseModel):
    """How many writes (`PUT`, `DELETE`, ETL retries) one caller may make (429 beyond)."""

    #: Sustained writes per second per caller (the token's subject), in each API process;
    #: 0: unlimited.
    writes_per_second: float = Field(default=50.0, ge=0)
    #: Writes a caller may make at once (the bucket's size), refilled at that rate.
    burst: int = Field(default=100, ge=1)


class Settings(BaseSettings):
    """All of upsertflow's settings, grouped by the process that reads them.

    Environment variables are `UPSERTFLOW_<NAME>`, and `UPSERTFLOW_<GROUP>__<NAME>` for a
    group's (`UPSERTFLOW_API__PORT`, `UPSERTFLOW_WORKER__METRICS_PORT`, …). Secrets are
    `SecretStr`: they print as `**********` and are read with `.get_secret_value()`.
    """

    model_config = SettingsConfigDict(
        env_prefix="UPSERTFLOW_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    # Every process.
    database_url: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices("DATABASE_URL", "UPSERTFLOW_DATABASE_URL"),
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://user:pass@host/db. "
        "Empty: `make dev` starts an embedded PostgreSQL.",
    )
    database_pool_size: int = 10
    database_max_overflow: int = 10
    task_queue: str = "upsertflow"
    temporal_ui_url: str = "http://localhost:8233"
    log_format: str = Field(default="text", pattern="^(text|json)$")
    log_level: str = "INFO"

    # The API.
    api: Api = Api()
    limits: Limits = Limits()
    auth: Auth = Auth()
    rate_limit: RateLimit = RateLimit()

    # The API, the worker and every other Temporal client (payloads are encrypted).
    codec: Codec = Codec()

    # The API (whether to notify) and the worker (where and how).
    webhooks: Webhooks = Webhooks()

    # The worker.
    worker: Worker = Worker()
    enrichment: Enrichment = Enrichment()
    janitor: Janitor = Janitor()
    reprocess: Reprocess = Reprocess()

    # `make dev`.
    dev: Dev = Dev()


@lru_cache
def get_settings() -> Settings:
    """Return the process-wide settings, read once."""
    return Settings()
