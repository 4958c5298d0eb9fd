"""A headless Chromium for the browser tests: Debian's `chromium`, installed with apt on demand.

No browser is ever downloaded from anywhere but Debian's package archive: Playwright
only drives the system's `/usr/bin/chromium` (never `playwright install`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Screenshots and page dumps of the browser tests (gitignored).
ARTIFACTS = REPO_ROOT / "test-artifacts"

CHROMIUM = Path("/usr/bin/chromium")
#: Offline, quiet, and fit for containers running as root.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # Small /dev/shm in containers crashes renderers; Debian's wrapper adds this only
    # when its own check of /dev/shm works.
    "--disable-dev-shm-usage",
]

_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
#: Wait for a dpkg lock held by another apt instead of failing at once.
_APT_LOCK_TIMEOUT = ["-o", "DPkg::Lock::Timeout=120"]
_INSTALL = [
    "apt-get",
    *_APT_LOCK_TIMEOUT,
    "install",
    "-y",
    "-q",
    "--no-install-recommends",
    "chromium",
]
_UPDATE = ["apt-get", *_APT_LOCK_TIMEOUT, "update", "-q"]
#: Serialises installs of parallel test sessions on this machine (apt's own lock makes
#: a second apt-get fail or wait; this one makes it find Chromium installed instead).
_LOCK_FILE = Path(tempfile.gettempdir()) / "upsertflow-chromium-install.lock"


class ChromiumUnavailable(Exception):
    """Chromium is missing and cannot be installed here; the message says why."""


def _apt(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={**os.environ, **_APT_ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(result: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((result.stdout + result.stderr).strip().splitlines()[-lines:])


def ensure_chromium(timeout: float = 180.0) -> tuple[Path, float]:
    """Return Debian's Chromium, installing it with apt when missing, and the seconds spent.

    `timeout` bounds each apt command (at most three: install, update, install).

    Raises `ChromiumUnavailable` where it cannot be installed: not Linux with apt,
    not root, or apt failing (e.g. no registry reachable).
    """
    if CHROMIUM.exists():
        return CHROMIUM, 0.0
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable(f"{CHROMIUM} is missing and there is no apt-get to install it")
    if os.geteuid() != 0:
        raise ChromiumUnavailable(
            f"{CHROMIUM} is missing and only root can install it: "
            "`apt-get install -y --no-install-recommends chromium`"
        )
    started = time.monotonic()
    with _LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing it right now
        try:
            if CHROMIUM.exists():
                return CHROMIUM, time.monotonic() - started
            try:
                # The package lists may be fresh enough already: skip `apt-get update` then.
                installed = _apt(_INSTALL, timeout)
                if installed.returncode != 0:
                    updated = _apt(_UPDATE, timeout)
                    if updated.returncode != 0:
                        raise ChromiumUnavailable(
                            f"`apt-get update` failed ({updated.returncode}):\n{_tail(updated)}"
                        )
                    installed = _apt(_INSTALL, timeout)
            except subprocess.TimeoutExpired as error:
                raise ChromiumUnavailable(f"{error.cmd} took over {timeout} s") from None
            if installed.returncode != 0 or not CHROMIUM.exists():
                raise ChromiumUnavailable(
                    f"`apt-get install chromium` failed ({installed.returncode}):\n"
                    f"{_tail(installed)}"
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return CHROMIUM, time.monotonic() - started
