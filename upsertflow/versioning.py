"""Worker Versioning: which version of the Worker Deployment a worker is, and making it current.

A worker polls as `WorkerDeploymentVersion(deployment_name, build_id)`. New workflows go to
the deployment's current (or ramping) version; a pinned workflow (`UpsertWorkflow`) runs to
its end on the version it started on, activities included. Operators move the current
version with `temporal worker deployment set-current-version` (README, "Changing the
pipeline"); a deployment's very first version becomes current by itself
(`make_current_if_unset`), so that a fresh deployment serves without a manual step.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import logging
from datetime import timedelta
from functools import cache
from pathlib import Path

from temporalio.api.workflowservice.v1 import (
    DescribeWorkerDeploymentRequest,
    DescribeWorkerDeploymentResponse,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import WorkerDeploymentConfig

from upsertflow.settings import Worker

log = logging.getLogger("upsertflow.versioning")

#: The code a worker runs, hashed into its default build id: the workflows, the
#: activities, the library they use and the worker itself (not the API, not the tools).
CODE = ("workflows", "activities", "upsertflow", "worker")

#: The versioning behavior of every workflow of a versioned worker: PINNED, a run stays on
#: the version it started on, activities included, to its end (a continue-as-new may move
#: on with `initial_versioning_behavior=AUTO_UPGRADE`). It is the worker's default rather
#: than `@workflow.defn(versioning_behavior=...)` because Temporal rejects a workflow task
#: that names a behavior from an unversioned worker ("versioning behavior cannot be
#: specified without deployment options being set with versioned mode"): the same workflow
#: code must also run on unversioned workers (`UPSERTFLOW_WORKER__VERSIONING=false`, the
#: tests' in-process workers).
DEFAULT_BEHAVIOR = VersioningBehavior.PINNED


@cache
def code_digest() -> str:
    """SHA-256 over the source of `CODE`: the same in a checkout and in the image's wheel."""
    digest = hashlib.sha256()
    for name in CODE:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise LookupError(f"cannot find the source of {name!r}")
        origin = Path(spec.origin)
        if spec.submodule_search_locations is not None:
            files = sorted(origin.parent.rglob("*.py"))
            names = [f"{name}/{path.relative_to(origin.parent).as_posix()}" for path in files]
        else:
            files, names = [origin], [origin.name]
        for path, relative in zip(files, names, strict=True):
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def default_build_id() -> str:
    """`<package version>-<first 12 hex digits of the code digest>`, e.g. `0.1.0-3f2a9c1b7d4e`.

    Workers running the same code get the same build id wherever they run; any change to
    that code is a new version.
    """
    try:
        version = importlib.metadata.version("upsertflow")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"{version}-{code_digest()[:12]}"


def deployment_version(settings: Worker) -> WorkerDeploymentVersion | None:
    """The version a worker of `settings` polls as; None: an unversioned worker."""
    if not settings.versioning:
        return None
    return WorkerDeploymentVersion(
        deployment_name=settings.deployment_name,
        build_id=settings.build_id or default_build_id(),
    )


def deployment_config(version: WorkerDeploymentVersion) -> WorkerDeploymentConfig:
    """The worker's `deployment_config` for `version`."""
    return WorkerDeploymentConfig(
        version=version, use_worker_versioning=True, default_versioning_behavior=DEFAULT_BEHAVIOR
    )


async def describe(client: Client, deployment_name: str) -> DescribeWorkerDeploymentResponse | None:
    """The deployment as the server knows it; None before any of its workers has polled.

    The server keeps a deployment in a workflow of its own, and has been seen to cancel a
    describe (`operation was canceled`) just after a version was made current: a call it
    cancelled or did not answer is made again, for up to `_DESCRIBE_PATIENCE`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DESCRIBE_PATIENCE.total_seconds()
    request = DescribeWorkerDeploymentRequest(
        namespace=client.namespace, deployment_name=deployment_name
    )
    while True:
        try:
            return await client.workflow_service.describe_worker_deployment(request)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return None
            if error.status not in _DESCRIBE_AGAIN or loop.time() >= deadline:
                raise
            log.info("the server did not finish describing the deployment: %s", error.message)
            await asyncio.sleep(0.2)


#: A call the server did not answer in time, or cancelled (`operation was canceled`, seen
#: on the dev server): each call here is made again after one.
_UNANSWERED = (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)
#: How long `describe` asks again after the server cancelled or did not answer a call.
_DESCRIBE_PATIENCE = timedelta(seconds=30)
#: What `describe` asks again after: no answer, or no server for a moment.
_DESCRIBE_AGAIN = (*_UNANSWERED, RPCStatusCode.UNAVAILABLE)


async def wait_until_registered(
    client: Client, version: WorkerDeploymentVersion
) -> DescribeWorkerDeploymentResponse:
    """Wait until the server lists `version` (its workers have polled); return the deployment.

    Waits as long as it takes: bound it with `asyncio.timeout`.
    """
    while True:
        described = await describe(client, version.deployment_name)
        if described is not None and any(
            summary.deployment_version.build_id == version.build_id
            for summary in described.worker_deployment_info.version_summaries
        ):
            return described
        await asyncio.sleep(0.2)


def current_build_id(described: DescribeWorkerDeploymentResponse) -> str:
    """The build id of the deployment's current version; "" for none (unversioned workers)."""
    return described.worker_deployment_info.routing_config.current_deployment_version.build_id


async def set_current(client: Client, version: WorkerDeploymentVersion) -> None:
    """Make `version` current once its workers have polled (what `set-current-version` does).

    The server refuses (`FAILED_PRECONDITION`) while the version's workers have not yet
    polled every task queue the current version serves — a worker polls its workflow and
    activity queues one after the other: look again until they have. A call the server
    does not answer within `_SET_CURRENT_TIMEOUT` (it routes the change through a workflow
    of its own, slow on a busy server) is made again. Waits as long as it takes: bound it
    with `asyncio.timeout`.
    """
    while True:
        described = await wait_until_registered(client, version)
        if current_build_id(described) == version.build_id:
            return
        try:
            await _set_current(client, version, described.conflict_token)
            return
        except RPCError as error:
            if error.status not in _SET_CURRENT_AGAIN:
                raise
            if error.status == RPCStatusCode.FAILED_PRECONDITION:
                log.info("waiting for the version's workers to poll: %s", error.message)
            else:
                log.info("the server did not answer in time; looking again: %s", error.message)
            await asyncio.sleep(0.2)


async def make_current_if_unset(client: Client, version: WorkerDeploymentVersion) -> bool:
    """Make `version` current if the deployment has no current and no ramping version.

    That is a deployment's first version: until a version is current its workers get no new
    workflows. Any later version is made current by the operator. Return whether this call
    made it current (or a call of it the server did not answer in time). Waits for the
    version to be registered: bound it with `asyncio.timeout`.
    """
    unanswered = False
    while True:
        described = await wait_until_registered(client, version)
        routing = described.worker_deployment_info.routing_config
        if unanswered and current_build_id(described) == version.build_id:
            return True  # the call the server did not answer in time made it current
        if current_build_id(described) or routing.ramping_deployment_version.build_id:
            return False
        try:
            await _set_current(client, version, described.conflict_token)
        except RPCError as error:
            # Another worker changed the deployment since it was described, or the server
            # did not answer in time: look again.
            unanswered = error.status in _UNANSWERED
            log.info("retrying to make the first version current: %s", error.message)
            await asyncio.sleep(0.5)
            continue
        log.info(
            "made the deployment's first version current",
            extra={"deployment": version.deployment_name, "build_id": version.build_id},
        )
        return True


#: How long one call to make a version current may take before it is made again.
_SET_CURRENT_TIMEOUT = timedelta(seconds=10)
#: What `set_current` looks again after: the version's workers have not polled yet, or
#: the server did not answer in time.
_SET_CURRENT_AGAIN = (RPCStatusCode.FAILED_PRECONDITION, *_UNANSWERED)


async def _set_current(
    client: Client, version: WorkerDeploymentVersion, conflict_token: bytes
) -> None:
    await client.workflow_service.set_worker_deployment_current_version(
        SetWorkerDeploymentCurrentVersionRequest(
            namespace=client.namespace,
            deployment_name=version.deployment_name,
            build_id=version.build_id,
            conflict_token=conflict_token,
            identity=client.identity,
        ),
        timeout=_SET_CURRENT_TIMEOUT,
    )
