"""The settings: one model, grouped by process, and every variable anyone names is real.

A renamed setting that the README, the compose file, the Dockerfile, the dev stack or a
test still spells the old way would be silently ignored (`extra="ignore"`): these tests
make that a failure.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from upsertflow.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VARIABLE = re.compile(r"\bUPSERTFLOW_[A-Z0-9_]*[A-Z0-9]\b")
#: Variables of the compose file's own interpolation (`${...}`), not settings.
COMPOSE_ONLY = {"UPSERTFLOW_DB_PASSWORD", "UPSERTFLOW_IMAGE", "UPSERTFLOW_API_PUBLISH"}
#: Files that name settings: what the user reads and what starts the processes.
NAMING = [
    README,
    REPO / "docker-compose.yml",
    REPO / "Dockerfile",
    *sorted((REPO / "deploy").rglob("*.y*ml")),
    *sorted((REPO / "deploy").rglob("*.example")),
    *sorted((REPO / "devstack").glob("*.py")),
    *sorted((REPO / "bench").glob("*.py")),
    *sorted((REPO / "tests").glob("*.py")),
    *sorted((REPO / "api").rglob("*.py")),
    REPO / "worker.py",
]


def leaves(model: type[BaseModel], prefix: str = "UPSERTFLOW_") -> dict[str, object]:
    """Every setting's environment variable, with its default."""
    found: dict[str, object] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= leaves(annotation, f"{prefix}{name.upper()}__")
        else:
            found[f"{prefix}{name.upper()}"] = field.default
    return found


SETTINGS = leaves(Settings)


def is_setting(variable: str) -> bool:
    # `UPSERTFLOW_LIMITS__` and `UPSERTFLOW_DEV__*_PORT`-style mentions name a group.
    return variable in SETTINGS or any(name.startswith(variable) for name in SETTINGS)


def test_every_variable_named_anywhere_is_a_setting() -> None:
    unknown = {
        f"{path.relative_to(REPO)}: {variable}"
        for path in NAMING
        if path.is_file() and path.name != "test_settings.py"
        for variable in VARIABLE.findall(path.read_text())
        if variable not in COMPOSE_ONLY and not is_setting(variable)
    }
    assert not unknown, sorted(unknown)


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    undocumented = [
        name
        for name in SETTINGS
        if f"`{name}`" not in section
        and not name.startswith(("UPSERTFLOW_LIMITS__", "UPSERTFLOW_DATABASE_URL"))
    ]
    assert not undocumented
    # The limits have their own table.
    limits = [name for name in SETTINGS if name.startswith("UPSERTFLOW_LIMITS__")]
    assert limits and all(f"`{name}`" in text for name in limits)


def test_groups_are_read_from_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSERTFLOW_API__PORT", "9001")
    monkeypatch.setenv("UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS", "7")
    monkeypatch.setenv("UPSERTFLOW_DEV__DATA_DIR", "/tmp/elsewhere")
    monkeypatch.setenv("UPSERTFLOW_LIMITS__MAX_DEPTH", "5")
    settings = Settings(_env_file=None)
    assert settings.api.port == 9001
    assert settings.worker.graceful_shutdown_seconds == 7
    assert settings.dev.data_dir == Path("/tmp/elsewhere")
    assert settings.limits.max_depth == 5


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://app:hunter2@db:5432/app")
    settings = Settings(_env_file=None)
    assert isinstance(settings.database_url, SecretStr)
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert "hunter2" in settings.database_url.get_secret_value()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Each would leave a worker that takes work and can never do it: no HTTP
        # connection, no batch in flight, no slot.
        ("UPSERTFLOW_ENRICHMENT__MAX_CONNECTIONS", "0"),
        ("UPSERTFLOW_ENRICHMENT__CONCURRENCY", "0"),
        ("UPSERTFLOW_WORKER__MAX_CONCURRENT_ACTIVITIES", "0"),
        ("UPSERTFLOW_WORKER__MAX_CONCURRENT_WORKFLOW_TASKS", "1"),
        ("UPSERTFLOW_WORKER__MAX_CONCURRENT_LOCAL_ACTIVITIES", "0"),
    ],
)
def test_values_that_would_wedge_a_worker_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match="greater than or equal to"):
        Settings(_env_file=None)
