"""Histories of real runs replay against today's workflow code.

A change to `UpsertWorkflow` that running workflows would not survive fails
here. Guard such a change with `workflow.patched()`; record afresh
(`make record-histories`) only for changes meant to break old histories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker

from tests.helpers import wait_for_etl
from workflows import pipeline
from workflows.upsert import UpsertWorkflow

HISTORIES = Path(__file__).parent / "histories"
SCENARIOS = ["succeeded", "succeeded_after_retries", "failed", "retried", "superseded", "cancelled"]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_recorded_history_replays(scenario: str) -> None:
    path = HISTORIES / f"{scenario}.json"
    history = WorkflowHistory.from_json(f"upsert-{scenario}", path.read_text())
    replayer = Replayer(workflows=[UpsertWorkflow], data_converter=pydantic_data_converter)

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, f"{scenario}: {result.replay_failure}"


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
    replayer = Replayer(workflows=[UpsertWorkflow], data_converter=pydantic_data_converter)

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

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
