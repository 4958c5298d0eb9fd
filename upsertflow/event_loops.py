"""The event loop a process runs on: uvloop's or the standard library's (`asyncio`).

The worker's is `Settings.worker.event_loop`; the benchmark's `--loop`. uvicorn picks
uvloop for the API by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import uvloop


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What `asyncio.Runner(loop_factory=...)` takes for the loop `name`; None: asyncio's."""
    return uvloop.new_event_loop if name == "uvloop" else None


def running_loop_name() -> str:
    """The running loop's library: "uvloop" or "asyncio"."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
