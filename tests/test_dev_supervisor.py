"""`make dev` supervises its processes: a dead one is restarted with backoff, the rest runs on.

The end-to-end tests start the real `make dev` process on free ports and a
data directory of their own, SIGKILL its children one at a time (the worker in
the middle of ETLs, the API, the enrichment service in the middle of ETLs, the
Temporal dev server, PostgreSQL) and check that each comes back, that the API
kept answering and that every ETL ends `succeeded`; then SIGTERM stops the whole
stack, exit code 0, nothing left running. The other tests drive the
`Supervisor` itself with short backoffs: crash loops, status, a prompt stop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import postmaster_pid
from devstack.processes import Child, Processes, describe_exit
from devstack.supervisor import RestartPolicy, Supervisor
from tests.helpers import eventually_sync, wait_for_etl_sync
from tests.makedev import CHILDREN, MakeDev

#: How long the slowed-down enrichment service takes to answer one batch.
LATENCY_MS = 3000
#: Values per request to the enrichment service: every resource below needs two batches.
BATCH_SIZE = 2
EMAILS = 4


@pytest.fixture
def dev() -> Iterator[MakeDev]:
    stack = MakeDev(
        UPSERTFLOW_ENRICHMENT__BATCH_SIZE=str(BATCH_SIZE),
        UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS="1",
    )
    try:
        yield stack
    finally:
        stack.close()


def _resource_body(resource_id: str) -> dict[str, Any]:
    contacts = {f"C{n}": {"Email": f"c{n}.{resource_id}@example.org"} for n in range(EMAILS)}
    return {"attributes": {"name": resource_id}, "info": {"Contacts": contacts}}


def _put_async(dev: MakeDev, resource_id: str) -> None:
    response = dev.api.put(
        f"/resources/{resource_id}",
        json=_resource_body(resource_id),
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text


def _new_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:8]}" for _ in range(count)]


def _slow_enrichment(dev: MakeDev, latency_ms: int = LATENCY_MS) -> None:
    dev.enrichment.put("/_faults", json={"latency_ms": latency_ms}).raise_for_status()


def _all_in_enrich(dev: MakeDev, count: int) -> None:
    """Wait until `count` enrich requests are in flight: every ETL is inside its `enrich`."""

    def probe() -> bool | None:
        return True if dev.enrichment.get("/_stats").json()["in_flight"] >= count else None

    eventually_sync(probe, f"{count} enrich requests in flight", 30)


def _all_succeeded(dev: MakeDev, resource_ids: list[str], within: float = 45.0) -> None:
    """Wait until the ETL of every resource has ended; all must have succeeded, enriched."""
    deadline = time.monotonic() + within
    for resource_id in resource_ids:
        try:
            body = wait_for_etl_sync(
                dev.api, resource_id, within=max(1.0, deadline - time.monotonic())
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{dev.log()[-6000:]}") from None
        assert body["etl"]["status"] == "succeeded", body
        context = body["context"]
        for n in range(EMAILS):
            assert context[f"contacts.c{n}.email.domain"] == "example.org", context


@pytest.mark.e2e
def test_make_dev_restarts_killed_children_and_etls_finish(dev: MakeDev) -> None:
    started = time.monotonic()
    phases: dict[str, float] = {}
    dev.start()
    phases["start"] = time.monotonic() - started

    # The worker, killed in the middle of three ETLs: the API answers on, the worker comes
    # back, the ETLs resume on it.
    first = _new_ids("w", 3)
    _slow_enrichment(dev)
    for resource_id in first:
        _put_async(dev, resource_id)
    _all_in_enrich(dev, len(first))
    worker = dev.kill("worker")
    dev.enrichment.delete("/_faults").raise_for_status()
    assert dev.api.get("/healthz").status_code == 200
    assert dev.api.get(f"/resources/{first[0]}").status_code == 200
    during = _new_ids("during", 1)
    _put_async(dev, during[0])  # accepted while no worker runs
    dev.restarted("worker", worker)
    log = dev.log()
    assert f"worker (pid {worker}) was killed by SIGKILL (exit code -9)" in log
    assert "restart #1 in 0.5 s" in log
    assert "stopping everything" not in log
    _all_succeeded(dev, first + during)
    phases["worker"] = time.monotonic() - started - sum(phases.values())

    # The API, killed with upserts in flight in the worker: it answers again, they finish.
    second = _new_ids("a", 2)
    _slow_enrichment(dev, 1000)
    for resource_id in second:
        _put_async(dev, resource_id)
    api = dev.kill("api")
    dev.restarted("api", api)
    eventually_sync(lambda: True if dev.api_ready() else None, "the API to answer again", 20)
    eventually_sync(
        lambda: True if "api is serving again" in dev.log() else None, "its log line", 5
    )
    dev.enrichment.delete("/_faults").raise_for_status()
    _all_succeeded(dev, second)
    phases["api"] = time.monotonic() - started - sum(phases.values())

    # The enrichment service, killed while it holds three ETLs' requests: it answers
    # again and the ETLs retry until they get their answers.
    third = _new_ids("e", 3)
    _slow_enrichment(dev)
    for resource_id in third:
        _put_async(dev, resource_id)
    _all_in_enrich(dev, len(third))
    enrichment = dev.kill("enrichment service")
    dev.restarted("enrichment service", enrichment)
    eventually_sync(dev.enrichment_ready, "the enrichment service to answer again", 20)
    _all_succeeded(dev, third)
    phases["enrichment"] = time.monotonic() - started - sum(phases.values())

    # Every child still runs, once each; SIGTERM stops them all, in order, exit code 0.
    running = dev.children()
    assert set(running) == {*CHILDREN, "PostgreSQL"}, running
    assert dev.process is not None
    os.kill(dev.process.pid, signal.SIGUSR1)  # the status, on demand
    status = f"worker up (pid {running['worker']}, 1 restart); api up (pid {running['api']}, 1"
    eventually_sync(lambda: True if status in dev.log() else None, "the status line", 5)
    assert dev.stop() == 0
    log = dev.log()
    stops = [log.index(f"stopped {name}") for name in ("api", "worker", "enrichment service")]
    stops += [log.index("stopped Temporal dev server"), log.index("stopped PostgreSQL")]
    assert stops == sorted(stops), log[-3000:]
    assert dev.leftovers() == []
    assert postmaster_pid(dev.data_dir / "postgres") is None
    phases["stop"] = time.monotonic() - started - sum(phases.values())
    print("\n" + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in phases.items()))


@pytest.mark.e2e
def test_make_dev_restarts_its_temporal_and_postgres(dev: MakeDev) -> None:
    dev.start()

    temporal = dev.kill("Temporal dev server")
    dev.restarted("Temporal dev server", temporal)
    postgres = dev.kill("PostgreSQL")
    dev.restarted("PostgreSQL", postgres, within=30)
    assert f"PostgreSQL (pid {postgres}) is no longer running" in dev.log()
    eventually_sync(lambda: True if dev.api_ready() else None, "the API to be ready again", 30)

    # The data outlived both: an upsert after the restarts is processed end to end.
    resource_ids = _new_ids("s", 1)
    for resource_id in resource_ids:
        _put_async(dev, resource_id)
    _all_succeeded(dev, resource_ids)
    assert dev.stop() == 0
    assert dev.leftovers() == []


# --- the supervisor on its own, with short backoffs ---------------------------------------

FAST = RestartPolicy(initial=0.05, maximum=0.2, reset_after=1.0)


def test_restart_policy_doubles_up_to_a_cap_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy()
    delays = []
    delay = None
    for _ in range(10):
        delay = policy.next_delay(delay, uptime=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert policy.next_delay(30.0, uptime=59.0) == 30.0
    assert policy.next_delay(30.0, uptime=60.0) == 0.5


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by SIGKILL (exit code -9)"
    assert describe_exit(-15) == "was killed by SIGTERM (exit code -15)"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_crash_looping_child_is_retried_with_growing_waits_and_the_rest_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processes = Processes()
    supervisor = Supervisor(processes)
    steady = Child("steady", _python("import time; time.sleep(60)"), dict(os.environ))
    crashing = Child("crashing", _python("raise SystemExit(3)"), dict(os.environ), policy=FAST)
    caplog.set_level(logging.INFO, logger="devstack")
    try:
        processes.start_child(steady)
        processes.start_child(crashing)
        steady_pid = steady.pid
        runner = threading.Thread(target=supervisor.run)
        runner.start()
        try:
            eventually_sync(
                lambda: True if crashing.restarts >= 5 else None, "5 restarts", 10, 0.02
            )
        finally:
            supervisor.stopping.set()
            runner.join(5)
        assert not runner.is_alive()
        assert steady.pid == steady_pid and steady.restarts == 0
        crashes = [m for r in caplog.records if (m := r.getMessage()).startswith("crashing (pid")]
        assert all("exited with code 3" in message for message in crashes), crashes
        waits = [message.rpartition(" in ")[2] for message in crashes]
        assert waits[:4] == ["0.05 s", "0.1 s", "0.2 s", "0.2 s"], waits
        assert crashing.delay == FAST.maximum
        assert "crashing restarted (pid" in caplog.text
        assert "status: steady up (pid" in caplog.text
    finally:
        processes.stop()
    assert steady.process is None and crashing.process is None


def test_stop_during_a_backoff_is_prompt_and_stops_the_others_in_reverse_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processes = Processes()
    supervisor = Supervisor(processes)
    slow = RestartPolicy(initial=30.0)
    first = Child("first", _python("import time; time.sleep(60)"), dict(os.environ), grace=5)
    dying = Child("dying", _python("raise SystemExit(1)"), dict(os.environ), policy=slow)
    last = Child("last", _python("import time; time.sleep(60)"), dict(os.environ), grace=5)
    caplog.set_level(logging.INFO, logger="devstack")
    try:
        for child in (first, dying, last):
            processes.start_child(child)
        runner = threading.Thread(target=supervisor.run)
        runner.start()
        eventually_sync(lambda: dying.restart_at, "the crash to be noticed", 5, 0.02)
        assert "dying down, restart in" in supervisor.status_line()
        asked = time.monotonic()
        supervisor.stopping.set()
        runner.join(5)
        assert time.monotonic() - asked < 1.0
        assert not runner.is_alive()
    finally:
        processes.stop()
    assert dying.restarts == 0
    stops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped ")]
    assert stops == ["stopped last", "stopped dying (it was waiting to restart)", "stopped first"]
