"""The stack of `make dev` for one benchmark run: the dev stack on free ports in `root`.

Its children see only what this run sets (no `DATABASE_URL`, `TEMPORAL_*` or
`UPSERTFLOW_*` from the shell, no `.env`), write to `root/logs/`, and run on a task
queue of their own; `stop()` ends them all, the API first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import devstack
from devstack import REPO_ROOT

__all__ = ["REPO_ROOT", "Stack"]


class Stack(devstack.Stack):
    """The dev stack as the benchmark runs it; its CPU accounting includes the benchmark's own."""

    task_queue = "bench-upsertflow"

    def __init__(
        self,
        root: Path,
        dynamic_config: Sequence[str] = (),
        *,
        workers: int = 1,
        apis: int = 1,
    ) -> None:
        super().__init__(
            devstack.StackConfig(
                root=root,
                workers=workers,
                api_ports=(0,) * apis,
                temporal_dynamic_config=tuple(dynamic_config),
                env={
                    "UPSERTFLOW_TASK_QUEUE": self.task_queue,
                    # One caller sends every write here, up to 100 at once and about
                    # 13,000 in a default run (10,000 of them the backlog, as fast as the
                    # API takes them): the limiter runs but never refuses (the default
                    # allows 100 at once, 50/s). A refusal would be a 429: an error.
                    "UPSERTFLOW_RATE_LIMIT__WRITES_PER_SECOND": "100000",
                    "UPSERTFLOW_RATE_LIMIT__BURST": "100000",
                },
            )
        )

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each child (with its subprocesses) and by the benchmark."""
        result = super().cpu_seconds()
        own = os.times()
        result["benchmark (client, baseline worker)"] = own.user + own.system
        return result
