"""The dev stack: upsertflow on one machine, for `make dev`, the benchmark and the tests.

Development only: it is not part of the `upsertflow` distribution or the image.

- `processes`: a `Child` process (started, waited for, watched, killed, stopped), the
  ordered `Processes` of a stack, `free_port`, `REPO_ROOT`;
- `servers`: the embedded PostgreSQL and Temporal dev server, `migrate`;
- `stack`: `Stack(StackConfig(...))`, everything `make dev` runs;
- `supervisor`: restart with backoff, for `make dev`;
- `cpu`: CPU seconds by process tree, for the benchmark;
- `__main__`: `python -m devstack`, which `make dev` runs.
"""

from devstack.processes import REPO_ROOT, Child, free_port, stop_process, venv_binary, wait_for_port
from devstack.servers import EmbeddedPostgres, TemporalDevServer, migrate, postmaster_pid
from devstack.stack import Stack, StackConfig

__all__ = [
    "REPO_ROOT",
    "Child",
    "EmbeddedPostgres",
    "Stack",
    "StackConfig",
    "TemporalDevServer",
    "free_port",
    "migrate",
    "postmaster_pid",
    "stop_process",
    "venv_binary",
    "wait_for_port",
]
