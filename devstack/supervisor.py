"""Restart with backoff: a child that dies is started again, the others run on.

The wait before a restart is 0.5 s, doubling on each quick crash up to 30 s, and back
to 0.5 s once the child has stayed up for 60 s. Each crash and each restart is one
log line naming the child, how it ended and when it comes back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from devstack.processes import Child, Processes, log

#: How often the supervisor looks at its children (and at most how long a stop waits).
TICK_SECONDS = 0.2


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts, forgotten once a child has stayed up a while."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    reset_after: float = 60.0

    def next_delay(self, previous: float | None, uptime: float) -> float:
        """The wait before restarting a child that died after `uptime` seconds.

        `previous` is the wait before its last restart, None if it never restarted.
        """
        if previous is None or uptime >= self.reset_after:
            return self.initial
        return min(previous * self.factor, self.maximum)


class Supervisor:
    """Watch the started children of `processes`; restart the ones that die, after a backoff."""

    def __init__(self, processes: Processes, policy: RestartPolicy | None = None) -> None:
        self.processes = processes
        self.policy = policy or RestartPolicy()
        self.stopping = threading.Event()
        self.status_requested = threading.Event()

    def tick(self) -> None:
        """Notice dead children, restart those whose backoff is over, note who serves again."""
        for child in self.processes.children:
            if self.stopping.is_set():
                return
            now = time.monotonic()
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
            elif (status := child.exit_status()) is not None:
                self._died(child, status, now)
            elif not child.ready and child.probe():
                child.ready = True
                if child.ports:
                    log.info("%s is serving again (pid %s)", child.name, child.pid)

    def _died(self, child: Child, status: str, now: float) -> None:
        uptime = now - child.started_at
        child.delay = (child.policy or self.policy).next_delay(child.delay, uptime)
        child.restart_at = now + child.delay
        child.ready = False
        log.error(
            "%s (pid %s) %s after %.1f s up; restart #%d in %g s",
            child.name,
            child.last_pid,
            status,
            uptime,
            child.restarts + 1,
            child.delay,
        )

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.restarts += 1
        child.started_at = time.monotonic()
        try:
            child.launch()
        except Exception as error:
            self._died(child, f"failed to restart ({error})", time.monotonic())
            return
        child.last_pid = child.pid
        log.warning(
            "%s restarted (pid %s, restart #%d); %s",
            child.name,
            child.pid,
            child.restarts,
            self.status_line(),
        )

    def next_wait(self) -> float:
        """How long the main loop may sleep before the next tick is due."""
        now = time.monotonic()
        due = [c.restart_at - now for c in self.processes.children if c.restart_at is not None]
        return max(0.0, min([TICK_SECONDS, *due]))

    def status_line(self) -> str:
        """One line: each child up, starting or waiting to restart; its pid and restarts."""
        now = time.monotonic()
        parts = []
        for child in self.processes.children:
            restarts = f"{child.restarts} restart{'' if child.restarts == 1 else 's'}"
            if child.restart_at is not None:
                wait = max(0.0, child.restart_at - now)
                parts.append(f"{child.name} down, restart in {wait:.1f} s ({restarts})")
            else:
                state = "up" if child.ready else "starting"
                details = f"pid {child.pid}" + (f", {restarts}" if child.restarts else "")
                parts.append(f"{child.name} {state} ({details})")
        return "status: " + "; ".join(parts)

    def run(self) -> None:
        """Supervise until `stopping` is set (Ctrl-C or SIGTERM)."""
        while not self.stopping.wait(self.next_wait()):
            self.tick()
            if self.status_requested.is_set():
                self.status_requested.clear()
                log.info("%s", self.status_line())
