"""The production-shaped deployment, checked without a Docker engine.

- `docker-compose.yml` (and the Temporal Cloud override) against the Compose Specification
  with check-jsonschema, and by Docker Compose itself (`config`) where its binary is installed;
- the stack's shape: pinned images, health checks, an acyclic `depends_on` graph with explicit
  conditions, migrations and Temporal setup before the API and workers, scalable workers, the
  worker's stop timeout against its graceful shutdown, secrets from the environment;
- the job that registers the search attributes, run against a real Temporal dev server;
- the Dockerfile with hadolint, and what its stages install and copy;
- what the image contains: the wheel its builder stage installs, built offline from the
  sources it copies, holds the application and nothing of the dev stack, the benchmark or
  the tests.
"""

from __future__ import annotations

import ast
import graphlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from upsertflow.naming import SEARCH_ATTRIBUTES
from upsertflow.settings import Worker

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
CLOUD_OVERRIDE = REPO / "deploy" / "temporal-cloud.compose.yml"
CLOUD_ENV_EXAMPLE = REPO / "deploy" / "temporal-cloud.env.example"
SETUP_NAMESPACE = REPO / "deploy" / "temporal" / "setup-namespace.sh"
SETUP_SCHEMA = REPO / "deploy" / "temporal" / "setup-schema.sh"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
README = REPO / "README.md"
VENV_BIN = Path(sys.prefix) / "bin"

CONDITIONS = {"service_healthy", "service_completed_successfully"}
# name:tag with at least major.minor in the tag (an optional -variant), or a digest.
PINNED_IMAGE = re.compile(
    r"[a-z0-9][a-z0-9./_-]*:\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?(@sha256:[0-9a-f]{64})?"
)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")
APP_ROLES = ("api", "worker")


# ---------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def with_defaults(value: str) -> str:
    """Interpolate `${VAR:-default}` as Compose does with nothing set: the default."""
    return INTERPOLATION.sub(lambda match: match.group(2) or "", value)


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dependencies = service.get("depends_on", {})
    assert isinstance(dependencies, dict), "depends_on must be the long form, with a condition"
    return dependencies


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping"
    return {str(key): str(value) for key, value in env.items()}


def one_shot_jobs(services: dict[str, dict[str, Any]]) -> set[str]:
    """The services that some other service waits for to complete."""
    return {
        name
        for service in services.values()
        for name, dependency in depends_on(service).items()
        if dependency.get("condition") == "service_completed_successfully"
    }


def seconds(duration: str) -> float:
    """Parse a Compose duration such as `45s`, `1m30s` or `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file that a bind mount of `service` shows at `container_path`."""
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        target = rest.split(":")[0]
        if source.startswith("./") and (
            container_path == target or container_path.startswith(target.rstrip("/") + "/")
        ):
            return REPO / source / os.path.relpath(container_path, target)
    return None


def strings_in(value: object) -> list[str]:
    """Every string in a parsed YAML document, keys and values."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in strings_in(key) + strings_in(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = load_yaml(COMPOSE_FILE)
    found = compose["services"]
    assert isinstance(found, dict)
    return found


# ---------------------------------------------------------------- the compose file


@pytest.mark.parametrize("path", [COMPOSE_FILE, CLOUD_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    result = run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_is_pinned_or_built_from_the_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = REPO / build.get("context", ".")
            assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
            continue
        image = str(service["image"])
        assert "latest" not in image, f"{name}: {image}"
        assert PINNED_IMAGE.fullmatch(image), f"{name}: {image} is not pinned to a version"


def test_temporal_admin_tools_match_the_server_version(
    services: dict[str, dict[str, Any]],
) -> None:
    # The schema setup must be the server's version: its schema directories are the server's.
    server_tag = services["temporal"]["image"].split(":")[1]
    assert services["temporal"]["image"].startswith("temporalio/server:")
    for job in ("temporal-admin-tools", "temporal-setup"):
        assert services[job]["image"] == f"temporalio/admin-tools:{server_tag}"
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")


def test_long_running_services_have_healthchecks_and_jobs_do_not_restart(
    services: dict[str, dict[str, Any]],
) -> None:
    jobs = one_shot_jobs(services)
    assert jobs == {"temporal-admin-tools", "temporal-setup", "migrate"}
    for name, service in services.items():
        if name in jobs:
            assert service.get("restart", "no") == "no", name
            continue
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable"), name
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") == "unless-stopped", name


def test_depends_on_is_explicit_and_acyclic(services: dict[str, dict[str, Any]]) -> None:
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        for dependency, spec in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert spec.get("condition") in CONDITIONS, f"{name} -> {dependency}: {spec}"
            if spec["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{dependency} has none"
        graph[name] = set(depends_on(service))
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert order.index("migrate") < order.index("api")
    assert order.index("temporal-setup") < order.index("worker")


def test_migrations_and_temporal_setup_complete_before_the_api_and_workers(
    services: dict[str, dict[str, Any]],
) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert "build" in migrate
    assert depends_on(migrate)["postgres"]["condition"] == "service_healthy"
    for role in APP_ROLES:
        dependencies = depends_on(services[role])
        assert dependencies["migrate"]["condition"] == "service_completed_successfully"
        assert dependencies["temporal-setup"]["condition"] == "service_completed_successfully"
        assert dependencies["temporal"]["condition"] == "service_healthy"
    assert depends_on(services["temporal"])["temporal-admin-tools"]["condition"] == (
        "service_completed_successfully"
    )
    assert depends_on(services["temporal-setup"])["temporal"]["condition"] == "service_healthy"


def test_every_process_sees_the_same_database_and_namespace(
    services: dict[str, dict[str, Any]],
) -> None:
    urls = {environment(services[name])["DATABASE_URL"] for name in ("migrate", *APP_ROLES)}
    assert len(urls) == 1
    url = with_defaults(urls.pop())
    assert url.startswith("postgresql+asyncpg://upsertflow:upsertflow@postgres:5432/")
    namespaces = {
        environment(services[name])["TEMPORAL_NAMESPACE"] for name in ("temporal-setup", *APP_ROLES)
    }
    assert len(namespaces) == 1, "the attributes must be registered where the app runs"
    for role in APP_ROLES:
        assert environment(services[role])["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_the_worker_scales(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: a fixed name cannot be scaled"
    worker = services["worker"]
    assert "ports" not in worker, "published ports clash between replicas"
    assert "hostname" not in worker
    assert worker["command"] == ["upsertflow-worker"]


def test_the_worker_stops_after_its_graceful_shutdown_window(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    default = Worker().graceful_shutdown_seconds
    shutdown = float(
        environment(worker).get("UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS", default)
    )
    grace = seconds(worker["stop_grace_period"])
    # Past the window the SDK still cancels the activities and reports them: keep a margin.
    assert grace >= shutdown + 10, f"stop_grace_period {grace}s vs shutdown {shutdown}s"
    assert worker.get("stop_signal", "SIGTERM") in ("SIGTERM", "SIGINT")


def test_the_api_listens_in_the_container_and_checks_healthz(
    services: dict[str, dict[str, Any]],
) -> None:
    api = services["api"]
    env = environment(api)
    assert env["UPSERTFLOW_API__HOST"] == "0.0.0.0"
    port = env["UPSERTFLOW_API__PORT"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])
    assert [with_defaults(str(p)).rsplit(":", 1)[1] for p in api["ports"]] == [port]


def test_published_ports_are_on_loopback_by_default(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert with_defaults(str(port)).startswith("127.0.0.1:"), f"{name}: {port}"


def test_the_ui_links_point_at_the_published_ui(services: dict[str, dict[str, Any]]) -> None:
    ui_port = with_defaults(str(services["temporal-ui"]["ports"][0])).split(":")[1]
    for role in APP_ROLES:
        url = with_defaults(environment(services[role])["UPSERTFLOW_TEMPORAL_UI_URL"])
        assert url == f"http://localhost:{ui_port}"


def test_secrets_come_from_the_environment_with_documented_local_defaults(
    services: dict[str, dict[str, Any]],
) -> None:
    secret = re.compile(r"PASSWORD|PWD|SECRET|API_KEY")
    for name, service in services.items():
        for key, value in environment(service).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:-[^}]+\}", value), f"{name}.{key}: {value}"
    assert "${UPSERTFLOW_DB_PASSWORD:-" in environment(services["api"])["DATABASE_URL"]
    documentation = deploying_section()
    used = {match[0] for value in strings_in(services) for match in INTERPOLATION.findall(value)}
    for variable in sorted(used):
        assert f"`{variable}`" in documentation, f"{variable} is not in README's Deploying"


# ---------------------------------------------------------------- Temporal's one-shot jobs


def test_the_search_attributes_are_registered_by_a_compose_job(
    services: dict[str, dict[str, Any]],
) -> None:
    setup = services["temporal-setup"]
    declared = environment(setup)["SEARCH_ATTRIBUTES"]
    assert dict(pair.split("=", 1) for pair in declared.split()) == SEARCH_ATTRIBUTES

    entrypoint = setup["entrypoint"]
    assert entrypoint[0] == "/bin/sh"
    assert host_path(setup, entrypoint[1]) == SETUP_NAMESPACE

    script = SETUP_NAMESPACE.read_text()
    assert "operator search-attribute create" in script
    default = re.search(r': "\$\{SEARCH_ATTRIBUTES:=([^}]*)\}"', script)
    assert default and default.group(1) == declared


def test_the_schema_job_runs_the_schema_script(services: dict[str, dict[str, Any]]) -> None:
    job = services["temporal-admin-tools"]
    assert host_path(job, job["entrypoint"][1]) == SETUP_SCHEMA
    required = re.findall(r': "\$\{([A-Z_]+):\?', SETUP_SCHEMA.read_text())
    assert set(required) <= set(environment(job)), required
    server = environment(services["temporal"])
    assert server["DB"] == "postgres12"
    assert "--plugin postgres12" in SETUP_SCHEMA.read_text()
    dynamic_config = host_path(
        services["temporal"], "/etc/temporal/config/dynamicconfig/docker.yaml"
    )
    assert dynamic_config is not None and dynamic_config.is_file()
    assert load_yaml(dynamic_config)


def search_attributes_of(address: str, namespace: str) -> dict[str, str]:
    command = [str(VENV_BIN / "temporal"), "operator", "search-attribute", "list", "-o", "json"]
    result = run([*command, "--address", address, "--namespace", namespace])
    assert result.returncode == 0, result.stderr
    custom: dict[str, str] = json.loads(result.stdout).get("customAttributes", {})
    return custom


def test_the_setup_script_registers_the_attributes_on_a_real_server(
    temporal_address: str, services: dict[str, dict[str, Any]]
) -> None:
    """Run the compose job's script against the dev server (its CLI stands in for admin-tools')."""
    sh = shutil.which("sh")
    assert sh is not None
    namespace = f"setup-{uuid.uuid4().hex[:12]}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TEMPORAL_CLI": str(VENV_BIN / "temporal"),
        "TEMPORAL_ADDRESS": temporal_address,
        "TEMPORAL_NAMESPACE": namespace,
        "SEARCH_ATTRIBUTES": environment(services["temporal-setup"])["SEARCH_ATTRIBUTES"],
        "SETUP_SLEEP_SECONDS": "0.2",
        "SETUP_ATTEMPTS": "150",
    }

    first = run([sh, str(SETUP_NAMESPACE)], env=env, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr

    expected = {
        name: f"INDEXED_VALUE_TYPE_{kind.upper()}" for name, kind in SEARCH_ATTRIBUTES.items()
    }
    registered = search_attributes_of(temporal_address, namespace)
    assert {name: registered.get(name) for name in expected} == expected

    again = run([sh, str(SETUP_NAMESPACE)], env=env, timeout=120)
    assert again.returncode == 0, "a rerun (every `docker compose up`) must succeed"

    started = time.monotonic()
    conflict = run(
        [sh, str(SETUP_NAMESPACE)],
        env=env | {"SEARCH_ATTRIBUTES": "ResourceVersion=Keyword"},
        timeout=120,
    )
    assert conflict.returncode != 0
    assert "different type" in conflict.stderr
    assert time.monotonic() - started < 10, "a type conflict fails at once, without retries"


# ---------------------------------------------------------------- the Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def copies(self) -> list[tuple[str | None, list[str], str]]:
        """Each COPY as (its --from stage or None, its sources, its destination)."""
        found = []
        for args in self.args("COPY"):
            words = args.split()
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            source_stage = next(
                (f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None
            )
            found.append((source_stage, paths[:-1], paths[-1]))
        return found


def dockerfile_stages() -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    result = run(
        [str(VENV_BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_stages_use_the_same_pinned_slim_python() -> None:
    stages = dockerfile_stages()
    assert [stage.name for stage in stages] == ["builder", "runtime"]
    bases = {stage.base for stage in stages}
    assert len(bases) == 1, "the venv is copied across: both stages need the same Python"
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-(bookworm|trixie)", bases.pop())


def test_the_builder_installs_the_project_not_editable_and_without_extras() -> None:
    builder = dockerfile_stages()[0]
    installs = [args for args in builder.args("RUN") if "pip install" in args]
    assert len(installs) == 1
    words = installs[0].split("&&")[0].split()
    assert words[-1] == ".", installs[0]
    assert "-e" not in words and "--editable" not in words
    assert "[" not in installs[0], "no extras: the image carries no test or dev tools"

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    packages = {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    modules = {f"{module}.py" for module in setuptools["py-modules"]}
    copied = {source for _, sources, _ in builder.copies() for source in sources}
    needed = packages | modules | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied, f"not copied into the builder: {needed - copied}"


def test_the_final_stage_runs_as_non_root_and_carries_the_migrations() -> None:
    builder, final = dockerfile_stages()
    users = final.args("USER")
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")

    copies = final.copies()
    assert (builder.name, ["/opt/venv"], "/opt/venv") in copies
    local = {source for stage, sources, _ in copies if stage is None for source in sources}
    assert {"alembic.ini", "migrations"} <= local
    assert final.args("WORKDIR") == ["/app"], "`alembic upgrade head` runs next to alembic.ini"

    for args in final.args("RUN"):
        for forbidden in ("apt-get install", "pip install", "gcc", "build-essential"):
            assert forbidden not in args, f"the final stage builds: {args}"

    healthcheck = final.args("HEALTHCHECK")
    assert len(healthcheck) == 1 and "/healthz" in healthcheck[0]
    assert "python" in healthcheck[0] and "urllib" in healthcheck[0]
    assert final.args("CMD") == ['["upsertflow-api"]']


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out `path` (relative to it): the last pattern that
    matches the path or one of its parent folders decides, `!` bringing it back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        if any(fnmatch(prefix, pattern.removeprefix("!").strip("/")) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def context_sources(stage: Stage) -> set[str]:
    """What a stage copies from the build context."""
    return {source for origin, paths, _ in stage.copies() if origin is None for source in paths}


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = dockerignore_patterns()
    for required in (".git", ".venv", ".data", "tests", "**/__pycache__", ".mypy_cache"):
        assert required in patterns, required
    sources = {source for stage in dockerfile_stages() for source in context_sources(stage)}
    for source in sorted(sources):
        assert (REPO / source).exists(), source
        excluded = [p for p in patterns if not p.startswith("!") and fnmatch(source, p)]
        assert not excluded, f"{source} is copied but .dockerignore excludes it: {excluded}"


# ---------------------------------------------------------------- what the image contains

#: Development only: the dev stack (and where it used to live), the benchmark, the tests.
DEV_ONLY = ("devstack", "upsertflow/embedded", "upsertflow/dev.py", "bench", "tests")


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel that the builder stage installs (the image's venv holds nothing else of the
    project), built offline from what the stage copies of the context, as .dockerignore
    leaves it."""
    root = tmp_path_factory.mktemp("image")
    context, wheels = root / "context", root / "wheels"
    patterns = dockerignore_patterns()
    for source in context_sources(dockerfile_stages()[0]):
        if (REPO / source).is_dir():
            shutil.copytree(
                REPO / source,
                context / source,
                ignore=lambda folder, names: [
                    name
                    for name in names
                    if dockerignored(
                        os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/"),
                        patterns,
                    )
                ],
            )
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, context / source)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    built = run([*pip, "--quiet", "--wheel-dir", str(wheels), str(context)], timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("*.whl")
    return zipfile.ZipFile(wheel)


def test_the_image_carries_the_application_and_no_dev_only_code(
    image_wheel: zipfile.ZipFile,
) -> None:
    names = image_wheel.namelist()
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    modules = {f"{module}.py" for module in setuptools["py-modules"]}
    shipped = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert shipped == packages | modules
    dev_only = [name for name in names if name.startswith(DEV_ONLY)]
    assert not dev_only, f"development-only code in the image: {dev_only}"
    for module in ("upsertflow/settings.py", "api/main.py", "workflows/upsert.py"):
        assert module in names


def test_the_image_code_imports_nothing_that_is_development_only(
    image_wheel: zipfile.ZipFile,
) -> None:
    dev_only = {"devstack", "bench", "tests", "upsertflow.embedded", "upsertflow.dev"}
    for name in image_wheel.namelist():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(image_wheel.read(name), name)):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module]
            else:
                continue
            for module in imported:
                parents = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 2)}
                assert not parents & dev_only, f"{name} imports {module}"


def test_every_command_of_the_image_has_its_module(image_wheel: zipfile.ZipFile) -> None:
    names = set(image_wheel.namelist())
    [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    scripts = {}
    section = ""
    for line in image_wheel.read(entry_points).decode().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "console_scripts" and "=" in line:
            command, _, target = (part.strip() for part in line.partition("="))
            scripts[command] = target.split(":")[0]
    assert {"upsertflow-api", "upsertflow-worker", "upsertflow-enrichment"} <= set(scripts)
    for command, module in scripts.items():
        path = module.replace(".", "/")
        assert {f"{path}.py", f"{path}/__init__.py"} & names, f"{command}: {module} is missing"


def deploying_section() -> str:
    """The README's "Deploying" section."""
    text = README.read_text()
    start = text.index("\n## Deploying\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_deploying_is_a_readme_section() -> None:
    text = deploying_section()
    assert "docker compose up --scale worker=3" in text


def test_the_deployment_files_cite_what_exists() -> None:
    """Every document and README section that the Dockerfile, the compose files and the
    deploy scripts point their reader to exists."""
    headings = {
        line.lstrip("#").strip() for line in README.read_text().splitlines() if line.startswith("#")
    }
    for path in (DOCKERFILE, COMPOSE_FILE, CLOUD_OVERRIDE, SETUP_NAMESPACE, SETUP_SCHEMA):
        text = path.read_text()
        for document in re.findall(r"[\w./-]+\.md\b", text):
            assert (REPO / document).is_file(), f"{path.name} cites {document}: there is none"
        for section in re.findall(r'README\.md, (?:section )?"([^"]+)"', text):
            assert section in headings, f"{path.name} cites the README section {section!r}"
