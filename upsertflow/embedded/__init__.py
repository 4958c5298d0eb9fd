"""Deprecated: the process helpers moved to the dev stack, `devstack`; import them from there.

Kept for the modules that still import from here (bench/upserts.py and some tests).
Development only, like `devstack` itself: a package rather than a module so that
pyproject.toml can leave it out of the wheel and the image. Delete it once nothing
imports `upsertflow.embedded`.
"""

from devstack.processes import stop_process, venv_binary, wait_for_port

__all__ = ["stop_process", "venv_binary", "wait_for_port"]
