"""The migrations build exactly the tables the models declare."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_migrated_database_matches_the_models(database_url: str) -> None:
    # `alembic check` autogenerates against the migrated database: any difference is a
    # migration someone forgot (or a model out of step with one).
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "check"],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "No new upgrade operations detected" in done.stdout
