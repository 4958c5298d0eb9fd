"""Histories of real runs replay against today's workflow code.

A change to `UpsertWorkflow` that running workflows would not survive fails
here. Guard such a change with `workflow.patched()`; record afresh
(`make record-histories`) only for changes meant to break old histories.

They replay with the workers' data converter (`upsertflow.temporal.data_converter`):
histories recorded before payloads were encrypted, and encrypted ones (with the
test-only key in `tests/histories/codec-keys`), which do not replay without their key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.worker import Replayer, Worker

from tests.helpers import wait_for_etl
from upsertflow import temporal
from upsertflow.codec import CodecKey
from upsertflow.contracts import UpsertRequest
from upsertflow.settings import Codec, Settings
from workflows import pipeline
from workflows.upsert import UpsertWorkflow

HISTORIES = Path(__file__).parent / "histories"
#: Recorded before payloads were encrypted, and after (`encrypted_*`, `v2_*` …): all replay.
SCENARIOS = [
    "succeeded",
    "succeeded_after_retries",
    "failed",
    "retried",
    "superseded",
    "cancelled",
    "encrypted_succeeded",
    "encrypted_failed",
    # Pipeline v2 (`persist`, `claim_etl`, `record_outcome` as local activities).
    "v2_succeeded",
    "v2_succeeded_after_retries",
    "v2_failed",
    "v2_retried",
    "v2_superseded",
    "v2_cancelled",
    # Pipeline v3 (`load` local too; the pipeline version in the workflow's input, no
    # patch marker; one search attribute upsert, at the end).
    "v3_succeeded",
    "v3_succeeded_after_retries",
    "v3_failed",
    "v3_retried",
    "v3_superseded",
    "v3_cancelled",
    # Pipeline v4 (`normalize` local too: `enrich` is the only regular activity).
    "v4_succeeded",
    "v4_succeeded_after_retries",
    "v4_failed",
    "v4_retried",
    "v4_superseded",
    "v4_cancelled",
    # Pipeline v5 (a load that succeeds records the outcome: no `record_outcome` after it).
    "v5_succeeded",
    "v5_succeeded_after_retries",
    "v5_failed",
    "v5_retried",
    "v5_superseded",
    "v5_cancelled",
    # Pipeline v6 (`enrich` stores only its additions: the load merges them).
    "v6_succeeded",
    "v6_succeeded_after_retries",
    "v6_failed",
    "v6_retried",
    "v6_superseded",
    "v6_cancelled",
]
#: The test-only key the histories are recorded with (`tests/histories/record.py`).
HISTORY_CODEC = Codec(keys_file=HISTORIES / "codec-keys")


def replayer() -> Replayer:
    """A replayer with the workers' data converter (`upsertflow.temporal.data_converter`)."""
    return Replayer(
        workflows=[UpsertWorkflow], data_converter=temporal.data_converter(HISTORY_CODEC)
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_recorded_history_replays(scenario: str) -> None:
    path = HISTORIES / f"{scenario}.json"
    history = WorkflowHistory.from_json(f"upsert-{scenario}", path.read_text())

    result = await replayer().replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, f"{scenario}: {result.replay_failure}"


def _named_version(scenario: str) -> int | None:
    """N of a `vN_*` history (None for the first version's)."""
    named = re.match(r"v(\d+)_", scenario)
    return None if named is None else int(named.group(1))


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if (_named_version(s) or 0) >= 3])
async def test_a_recorded_history_is_of_the_pipeline_version_it_is_named_after(
    scenario: str,
) -> None:
    """From v3 on the version is in the workflow's input: `vN_*` histories ran pipeline N."""
    path = HISTORIES / f"{scenario}.json"
    history = WorkflowHistory.from_json(f"upsert-{scenario}", path.read_text())
    started = history.events[0].workflow_execution_started_event_attributes
    converter = temporal.data_converter(HISTORY_CODEC)

    [request] = await converter.decode(started.input.payloads, [UpsertRequest])

    assert request.pipeline_version == _named_version(scenario)


async def test_an_encrypted_history_does_not_replay_without_its_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = HISTORIES / "encrypted_failed.json"
    history = WorkflowHistory.from_json("upsert-encrypted", path.read_text())
    other_key = Codec(keys=SecretStr(CodecKey.generate("other").spec()))
    without_key = Replayer(
        workflows=[UpsertWorkflow], data_converter=temporal.data_converter(other_key)
    )

    result = await without_key.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is not None
    # The failure itself is encoded (with the other key); the worker's log says why.
    logged = "\n".join(
        str(record.exc_info[1]) for record in caplog.records if record.exc_info is not None
    )
    assert "a payload is encrypted with the key 'histories', which is not configured" in logged


def _add_a_step(monkeypatch: pytest.MonkeyPatch) -> int:
    """Declare a new pipeline version with one more step, as a change to pipeline.py would."""
    current = pipeline.PIPELINES[max(pipeline.PIPELINES)]
    first, *rest = current.steps
    renormalize = dataclasses.replace(first, name="renormalize")
    version = max(pipeline.PIPELINES) + 1
    changed = dataclasses.replace(current, steps=(first, renormalize, *rest))
    monkeypatch.setitem(pipeline.PIPELINES, version, changed)
    return version


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_recorded_history_replays_after_a_step_is_added(
    scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _add_a_step(monkeypatch)
    path = HISTORIES / f"{scenario}.json"
    history = WorkflowHistory.from_json(f"upsert-{scenario}", path.read_text())

    result = await replayer().replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, f"{scenario}: {result.replay_failure}"


async def test_a_new_workflow_runs_the_newest_pipeline(
    monkeypatch: pytest.MonkeyPatch,
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    resource_id: str,
) -> None:
    version = _add_a_step(monkeypatch)

    created = await api.put(f"/resources/{resource_id}", json={"info": {"Country": "FR"}})
    final = await wait_for_etl(api, resource_id, 1)
    handle = client.get_workflow_handle_for(
        UpsertWorkflow.run, created.json()["etl"]["workflow_id"]
    )
    progress = await handle.result()

    assert progress.pipeline_version == version, progress
    assert [step.name for step in progress.steps] == ["normalize", "renormalize", "enrich", "load"]
    assert final["context"]["country.country_name"] == "France"
    # Its history, encrypted with the suite's key, replays with the workers' data converter.
    history = await handle.fetch_history()
    live = Replayer(workflows=[UpsertWorkflow], data_converter=client.data_converter)
    assert (
        await live.replay_workflow(history, raise_on_replay_failure=False)
    ).replay_failure is None


async def test_a_pipeline_version_the_worker_does_not_know_waits_for_a_worker_that_does(
    worker: Worker, client: Client, settings: Settings, resource_id: str
) -> None:
    """An API newer than the workers asks for a version they lack: the workflow task fails
    (and is retried, for a worker that knows it), the workflow does not, nothing runs."""
    unknown = pipeline.newest() + 1
    handle = await client.start_workflow(
        UpsertWorkflow.run,
        UpsertRequest(
            resource_id=resource_id,
            request_id=uuid.uuid4().hex,
            attributes_digest="0" * 64,
            info_digest="0" * 64,
            pipeline_version=unknown,
        ),
        id=f"upsert:{resource_id}:{uuid.uuid4().hex}",
        task_queue=settings.task_queue,
    )
    try:
        failure = None
        for _ in range(200):
            async for event in handle.fetch_history_events():
                if event.HasField("workflow_task_failed_event_attributes"):
                    encoded = event.workflow_task_failed_event_attributes.failure
                    failure = str(await client.data_converter.decode_failure(encoded))
            if failure:
                break
            await asyncio.sleep(0.05)
        description = await handle.describe()
    finally:
        await handle.terminate("test over")

    assert failure is not None and f"pipeline version {unknown} is unknown" in failure, failure
    assert description.status == WorkflowExecutionStatus.RUNNING
    events = [event async for event in handle.fetch_history_events()]
    assert not any(e.HasField("marker_recorded_event_attributes") for e in events)
    assert not any(e.HasField("activity_task_scheduled_event_attributes") for e in events)
