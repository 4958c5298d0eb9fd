"""The baseline: a bare workflow of the same shape as `UpsertWorkflow`, with no-op activities.

Its `first_done` update answers after the first activity, as `persisted` answers
after `persist`; the rest of the activities run after the answer, one at a time.
Kept in a module of its own: the workflow sandbox re-imports it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn
async def noop() -> None:
    """An activity that does nothing: only the server round trip is left."""


@workflow.defn
class BareUpsert:
    """Run `activities` no-op activities in sequence."""

    def __init__(self) -> None:
        self._first_done = False

    @workflow.run
    async def run(self, activities: int) -> int:
        for _ in range(activities):
            await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=30))
            self._first_done = True
        return activities

    @workflow.update
    async def first_done(self) -> None:
        """Wait until the first activity has completed."""
        await workflow.wait_condition(lambda: self._first_done)
