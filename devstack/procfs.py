"""Processes as Linux's /proc shows them: which run, their parents, their command lines."""

from __future__ import annotations

from pathlib import Path


def pids() -> list[int]:
    """Every process id running now."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def stat_fields(pid: int) -> list[str] | None:
    """`/proc/<pid>/stat` from its third field (`state`) on; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def parent(pid: int) -> int | None:
    """The parent's pid; None if the process is gone."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def command_line(pid: int) -> bytes:
    """The command line, arguments separated by NUL; empty if gone (or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
