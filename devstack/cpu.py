"""CPU seconds used by process trees, from /proc (Linux)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from devstack.procfs import pids, stat_fields


def cpu_seconds(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process with all its descendants."""
    stats = {pid: stat for pid in pids() if (stat := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)

    def tree(pid: int) -> float:
        return stats.get(pid, (0, 0.0))[1] + sum(tree(child) for child in children.get(pid, []))

    return {name: tree(pid) for name, pid in roots.items()}


def _stat(pid: int) -> tuple[int, float] | None:
    """A process's parent and CPU seconds, its own and its waited-for children's."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")
