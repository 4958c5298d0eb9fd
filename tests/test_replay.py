"""Histories of real runs replay against today's workflow code.

A change to `UpsertWorkflow` that running workflows would not survive fails
here. Guard such a change with `workflow.patched()`; record afresh
(`make record-histories`) only for changes meant to break old histories.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

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
