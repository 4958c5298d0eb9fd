"""The Temporal worker: runs `UpsertWorkflow` and its activities, and reprocessing jobs
(`ReprocessWorkflow`, with their re-runs) on a task queue of their own.

Run any number of these, on any number of machines: `upsertflow-worker`.
SIGTERM or SIGINT stops polling and lets running activities finish within
`UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.common import WorkerDeploymentVersion
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.enrich import EnrichActivities
from activities.interceptor import AttemptInterceptor
from activities.reprocess import ReprocessActivities
from activities.resources import ResourceActivities
from activities.webhooks import WebhookActivities
from upsertflow import temporal, tracing, versioning
from upsertflow.db import create_engine, create_sessionmaker
from upsertflow.event_loops import loop_factory, running_loop_name
from upsertflow.http import CancelSafeTransport
from upsertflow.janitor import run_periodically
from upsertflow.logs import configure_logging
from upsertflow.naming import reprocess_task_queue
from upsertflow.settings import Settings, get_settings
from upsertflow.store.steps import StepStore
from workflows.notify import NotifyWorkflow
from workflows.pipeline import ACTIVITIES
from workflows.reprocess import ReprocessWorkflow
from workflows.upsert import UpsertWorkflow

log = logging.getLogger("upsertflow.worker")

#: How long a new worker waits for the server to register its version before giving up on
#: making a fresh deployment's first version current.
FIRST_VERSION_TIMEOUT_SECONDS = 60.0


def build_worker(
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    interceptors: Sequence[Interceptor] = (),
    version: WorkerDeploymentVersion | None = None,
) -> Worker:
    """Return a worker for upsertflow's workflows and activities on the configured task queue.

    With a `version`, the worker is that version of its Worker Deployment (Worker
    Versioning); without, an unversioned worker (the tests' in-process workers).
    """
    # One store: a step's output passes to the next step in this worker without a read.
    store = StepStore(sessions)
    implementations = [
        ResourceActivities(sessions, store),
        EnrichActivities(store, http, settings.enrichment),
        WebhookActivities(http, settings.webhooks),
    ]
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[UpsertWorkflow, NotifyWorkflow],
        activities=bind_activities(implementations, ACTIVITIES),
        interceptors=[AttemptInterceptor(), *interceptors],
        graceful_shutdown_timeout=timedelta(seconds=settings.worker.graceful_shutdown_seconds),
        max_concurrent_activities=settings.worker.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.worker.max_concurrent_workflow_tasks,
        max_concurrent_local_activities=settings.worker.max_concurrent_local_activities,
        deployment_config=versioning.deployment_config(version) if version else None,
        # See `Worker.sandboxed` (settings): the guard runs in the tests, not per workflow.
        workflow_runner=(
            SandboxedWorkflowRunner() if settings.worker.sandboxed else UnsandboxedWorkflowRunner()
        ),
    )


def build_reprocess_worker(
    live: Worker, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> Worker:
    """Return a worker for reprocessing jobs, on their own task queue, beside `live`.

    It runs what `live` runs (the re-runs are `UpsertWorkflow`s; same interceptors,
    deployment version, shutdown) plus the jobs and their activities, with slots of its
    own (`settings.reprocess`): however large a job, live upserts, on `live`'s task queue,
    never wait for one.
    """
    reprocess = ReprocessActivities(sessions)
    config = live.config()
    slots = settings.reprocess
    config["task_queue"] = reprocess_task_queue(settings.task_queue)
    config["workflows"] = [ReprocessWorkflow, *config["workflows"]]
    config["activities"] = [*config["activities"], reprocess.count, reprocess.page]
    config["max_concurrent_activities"] = slots.max_concurrent_activities
    config["max_concurrent_workflow_tasks"] = slots.max_concurrent_workflow_tasks
    config["max_concurrent_local_activities"] = slots.max_concurrent_local_activities
    return Worker(**config)


def bind_activities(
    implementations: Sequence[object], methods: Iterable[Callable[..., Any]]
) -> list[Callable[..., Any]]:
    """Bind each activity method the workflows call to the instance that implements it."""
    bound: dict[str, Callable[..., Any]] = {}
    for method in methods:
        owner = next(
            (i for i in implementations if getattr(type(i), method.__name__, None) is method),
            None,
        )
        if owner is None:
            raise TypeError(f"no activity implementation has {method.__qualname__}")
        bound[method.__qualname__] = getattr(owner, method.__name__)
    return list(bound.values())


def enrichment_client(settings: Settings) -> httpx.AsyncClient:
    """The worker's one HTTP client (the enrichment service, webhooks): pooled, with
    timeouts, safe to cancel (`upsertflow.http`)."""
    client = httpx.AsyncClient(
        timeout=settings.enrichment.request_timeout_seconds,
        transport=CancelSafeTransport(settings.enrichment.max_connections),
    )
    tracing.instrument_http_client(client)
    return client


async def run(settings: Settings) -> None:
    """Run the worker until SIGTERM or SIGINT."""
    runtime = None
    if settings.worker.metrics_port:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(bind_address=f"0.0.0.0:{settings.worker.metrics_port}")
            )
        )
    client = await temporal.connect(runtime=runtime, codec=settings.codec)
    engine = create_engine(settings, pre_ping=False)
    tracing.instrument_engine(engine)
    http = enrichment_client(settings)
    sessions = create_sessionmaker(engine)
    version = versioning.deployment_version(settings.worker)
    worker = build_worker(client, settings, sessions, http, version=version)
    reprocess_worker = build_reprocess_worker(worker, settings, sessions)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    janitor = asyncio.create_task(run_periodically(sessions, client, settings.janitor))
    first_version: asyncio.Task[bool] | None = None
    try:
        async with worker, reprocess_worker:
            log.info(
                "worker started",
                extra={
                    "task_queue": settings.task_queue,
                    "event_loop": running_loop_name(),
                    **_described(version),
                },
            )
            if version is not None:
                first_version = asyncio.create_task(_make_current_if_unset(client, version))
                first_version.add_done_callback(_log_failure)
            await stop.wait()
            log.info("worker stopping: finishing running activities")
    finally:
        janitor.cancel()
        if first_version is not None:
            first_version.cancel()
        await http.aclose()
        await engine.dispose()
    log.info("worker stopped")


def _described(version: WorkerDeploymentVersion | None) -> dict[str, str]:
    if version is None:
        return {"deployment": "unversioned"}
    return {"deployment": version.deployment_name, "build_id": version.build_id}


async def _make_current_if_unset(client: Client, version: WorkerDeploymentVersion) -> bool:
    """A fresh deployment's first version becomes current by itself (`upsertflow.versioning`)."""
    async with asyncio.timeout(FIRST_VERSION_TIMEOUT_SECONDS):
        return await versioning.make_current_if_unset(client, version)


def _log_failure(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("could not check the deployment's current version: %s", error)


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    try:
        traced = tracing.configure_tracing("upsertflow-worker")
    except tracing.TracingConfigError as error:
        raise SystemExit(f"upsertflow-worker: not starting: {error}") from None
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.worker.event_loop)) as runner:
            runner.run(run(settings))
    finally:
        if traced:
            traced.shutdown()


if __name__ == "__main__":
    main()
