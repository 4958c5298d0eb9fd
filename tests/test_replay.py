"""Histories of real runs replay against today's workflow code.

A change to `UpsertWorkflow` that running workflows would not survive fails
here. Guard such a change with `workflow.patched()`; record afresh
(`make record-histories`) only for changes meant to break old histories.

They replay with the workers' data converter (`upsertflow.temporal.data_converter`):
histories recorded before payloads were encrypted, and encrypted ones (with the
test-only key in `tests/histories/codec-keys`), which do not replay without their key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer, Worker

from tests.helpers import wait_for_etl
from upsertflow import temporal
from upsertflow.codec import CodecKey
from upsertflow.settings import Codec
from workflows import pipeline
from workflows.upsert import UpsertWorkflow

HISTORIES = Path(__file__).parent / "histories"
#: Recorded before payloads were encrypted, and after (`encrypted_*`, `v2_*`): all replay.
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
