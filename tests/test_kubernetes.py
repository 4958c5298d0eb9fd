"""The Kubernetes manifests (deploy/kubernetes), checked offline and without a cluster.

Every overlay is rendered by a small Kustomize of this file's own, which does the part of
Kustomize the kustomizations use and refuses anything else; where `kustomize` or `kubectl`
is installed, a test renders each overlay with it too and compares. Then:

- every core object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict); KEDA's ScaledObject and TriggerAuthentication, which have no schema there, are
  checked for what KEDA's Temporal scaler reads;
- what users rely on: locked-down containers, probes and resources on every Deployment, the
  worker's grace period against its graceful shutdown, PDBs and Services that select pods,
  the API's HPA, the migration Job and the wait for it, one image for every process;
- the env contract: each process gets the variables that docker-compose.yml gives it (read
  from the compose file at test time), every `UPSERTFLOW_*` name is a field of
  `upsertflow.settings.Settings`, the values parse, the `TEMPORAL_*` ones make the SDK's own
  configuration reach the Temporal that KEDA watches, and every Secret referenced is in
  secrets.example.yaml.

Each check is a function that returns the problems it finds. The tests assert that there
are none; `test_the_checks_catch_broken_manifests` breaks a rendered overlay in the ways that
matter (a probe removed, a grace period too short, …) and asserts that each one is caught.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import AliasChoices, BaseModel

from upsertflow.naming import SEARCH_ATTRIBUTES
from upsertflow.settings import Settings
from upsertflow.temporal import connect_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))
CLOUD_OVERLAYS = [path for path in OVERLAYS if path.name.startswith("temporal-cloud")]
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
COMPOSE_FILE = REPO / "docker-compose.yml"
CLOUD_ENV_EXAMPLE = REPO / "deploy" / "temporal-cloud.env.example"
SETUP_NAMESPACE = REPO / "deploy" / "temporal" / "setup-namespace.sh"
BENCH_RESULTS = REPO / "bench" / "RESULTS.md"

#: The Kubernetes release whose schemas the objects must validate against.
KUBERNETES_VERSION = "1.33"
#: The repository name of the project's image (the Dockerfile's); kustomize's `images:` tags it.
IMAGE = "upsertflow"
#: docker-compose.yml's services that run the project's image (found here by their command).
COMPOSE_ROLES = ("migrate", "api", "worker", "enrichment")
#: What KEDA's Temporal scaler takes (pkg/scalers/temporal_scaler.go, KEDA 2.17+).
KEDA_TEMPORAL_METADATA = {
    "endpoint", "namespace", "taskQueue", "targetQueueSize", "activationTargetQueueSize",
    "queueTypes", "minConnectTimeout", "unsafeSsl", "tlsServerName",
}  # fmt: skip
KEDA_TEMPORAL_AUTH = {"apiKey", "cert", "key", "keyPassword", "ca"}
SCALED_OBJECT_FIELDS = {
    "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
    "idleReplicaCount", "advanced", "triggers", "fallback",
}  # fmt: skip
PINNED_IMAGE = re.compile(r"[a-z0-9][a-z0-9./_-]*:\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?")

Obj = dict[str, Any]


# ---------------------------------------------------------------- a small Kustomize


KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "namespace", "resources", "labels", "configMapGenerator", "patches",
    "images",
}  # fmt: skip
#: The patchMergeKey of the core lists that the strategic-merge patches touch.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "ports": "containerPort",
}  # fmt: skip
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
GENERATED = "__generated__"  # marks a generated ConfigMap until its name gets the hash


def load_documents(path: Path) -> list[Obj]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def build(directory: Path) -> list[Obj]:
    """The objects of one kustomization, names of generated ConfigMaps not suffixed yet."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: this test's Kustomize does not do {sorted(unknown)}"
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_relative_to(K8S), f"{directory}: {entry} is outside deploy/kubernetes"
        objects += build(path) if path.is_dir() else load_documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        generate_config_map(objects, directory, generator)
    for patch in kustomization.get("patches", []):
        apply_patch(objects, directory, patch)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for labels in kustomization.get("labels", []):
        assert set(labels) == {"pairs"}, f"{directory}: labels {labels} (selectors untouched)"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(labels["pairs"])
    for image in kustomization.get("images", []):
        set_image(objects, image)
    return objects


def generate_config_map(objects: list[Obj], directory: Path, generator: Obj) -> None:
    assert set(generator) <= {"name", "behavior", "literals", "files"}, generator
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for file in generator.get("files", []):
        assert "=" not in file, file
        data[Path(file).name] = (directory / file).read_text()
    existing = [
        o for o in objects if o.get(GENERATED) and o["metadata"]["name"] == generator["name"]
    ]
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        assert not existing, f"{generator['name']} is generated twice"
        config_map: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "data": data}
        config_map["metadata"]["name"] = generator["name"]
        objects.append(config_map | {GENERATED: True})
    else:
        assert behavior == "merge" and len(existing) == 1, generator
        existing[0]["data"].update(data)


def apply_patch(objects: list[Obj], directory: Path, entry: Obj) -> None:
    assert set(entry) <= {"path", "patch", "target"}, entry
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    if isinstance(patch, list):  # JSON 6902, on the object the target names
        target = entry["target"]
        assert set(target) <= {"group", "version", "kind", "name"}, target
        found = [o for o in objects if matches_target(o, target)]
        assert len(found) == 1, f"{directory}: the patch's target {target} matches {len(found)}"
        for operation in patch:
            json_patch(found[0], operation)
        return
    # A strategic-merge patch names its object; only core kinds, whose merge keys are known.
    assert "target" not in entry and patch["apiVersion"] in CORE_API_VERSIONS, entry
    found = [
        o
        for o in objects
        if (o["kind"], o["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
    ]
    assert len(found) == 1, f"{directory}: {entry['path']} matches {len(found)} objects"
    strategic_merge(found[0], patch)


def matches_target(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = (target.get("group", group), target.get("version", version), target["kind"])
    return wanted == (group, version, obj["kind"]) and target["name"] == obj["metadata"]["name"]


def strategic_merge(target: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(target.get(key), list):
            target[key] = merge_list(target[key], value, MERGE_KEYS[key])
        else:
            target[key] = copy.deepcopy(value)


def merge_list(items: list[Obj], patch: list[Obj], key: str) -> list[Obj]:
    """Merge a list by its merge key: matching items merge, `$patch: delete` removes one, new
    ones go first (where Kustomize puts them)."""
    merged = copy.deepcopy(items)
    added = []
    for element in patch:
        match = next((i for i, item in enumerate(merged) if item.get(key) == element[key]), None)
        if element.get("$patch") == "delete":
            if match is not None:
                del merged[match]
        elif match is None:
            added.append(copy.deepcopy(element))
        else:
            strategic_merge(merged[match], element)
    return added + merged


def json_patch(document: Obj, operation: Obj) -> None:
    *parents, last = [
        part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
    ]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            node[index] = copy.deepcopy(operation["value"])
        else:
            assert op == "remove", operation
            del node[index]
    elif op in ("add", "replace"):
        assert op == "add" or last in node, f"replace of a missing {operation['path']}"
        node[last] = copy.deepcopy(operation["value"])
    else:
        assert op == "remove", operation
        del node[last]


def set_image(objects: list[Obj], image: Obj) -> None:
    assert set(image) <= {"name", "newName", "newTag"}, image
    for _, pod in workloads(objects):
        for container in containers(pod):
            name, tag = split_image(container["image"])
            if name == image["name"]:
                tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def split_image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, "")


def kustomize_hash(config_map: Obj) -> str:
    """Kustomize's name suffix (api/hasher): the sha256 of the JSON of kind, name and data,
    its first ten hex digits with 0, 1, 3, a, e replaced. Its lookup of `metadata/name`
    finds nothing, so the name hashed is always ""; Go's JSON escapes <, > and &."""
    encoded = json.dumps(
        {"data": config_map.get("data", {}), "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def render(overlay: Path) -> list[Obj]:
    """An overlay as `kustomize build` prints it (in another order)."""
    objects = build(overlay)
    renamed: dict[str, str] = {}
    for obj in objects:
        if obj.pop(GENERATED, False):
            name = obj["metadata"]["name"]
            renamed[name] = obj["metadata"]["name"] = f"{name}-{kustomize_hash(obj)}"
    for _, pod in workloads(objects):
        references = [v["configMap"] for v in pod.get("volumes", []) if "configMap" in v]
        for container in containers(pod):
            references += [
                s["configMapRef"] for s in container.get("envFrom", []) if "configMapRef" in s
            ]
            references += [
                v["valueFrom"]["configMapKeyRef"]
                for v in container.get("env", [])
                if "configMapKeyRef" in v.get("valueFrom", {})
            ]
        for reference in references:
            reference["name"] = renamed.get(reference["name"], reference["name"])
    return objects


def kustomize_binary() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


# ---------------------------------------------------------------- reading rendered objects


def workloads(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(Deployment or Job, its pod spec)."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def named(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def is_ours(container: Obj) -> bool:
    return split_image(container["image"])[0].split("/")[-1] == IMAGE


def running(objects: list[Obj], command: list[str]) -> tuple[Obj, Obj, Obj]:
    """The workload, pod spec and (main) container that run `command`."""
    found = [
        (workload, pod, container)
        for workload, pod in workloads(objects)
        for container in pod.get("containers", [])
        if container.get("command", []) + container.get("args", []) == command
    ]
    assert len(found) == 1, f"{len(found)} containers run {command}"
    return found[0]


def environment(container: Obj, objects: list[Obj], secrets: list[Obj]) -> dict[str, str]:
    """The environment the container gets: ConfigMaps of envFrom, then env (which wins);
    a Secret's value is its example's, a missing optional key is left out."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for config_map in find(objects, "ConfigMap", source.get("configMapRef", {}).get("name")):
            env.update(config_map.get("data", {}))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
            continue
        source = variable["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            for config_map in find(objects, "ConfigMap", ref["name"]):
                env[variable["name"]] = config_map["data"][ref["key"]]
        elif "secretKeyRef" in source and not source["secretKeyRef"].get("optional"):
            ref = source["secretKeyRef"]
            for secret in find(secrets, "Secret", ref["name"]):
                env[variable["name"]] = secret.get("stringData", {}).get(ref["key"], "")
    return env


def env_names(container: Obj, objects: list[Obj]) -> set[str]:
    """Every variable the container may get, optional Secret keys included."""
    names = {variable["name"] for variable in container.get("env", [])}
    for source in container.get("envFrom", []):
        for config_map in find(objects, "ConfigMap", source.get("configMapRef", {}).get("name")):
            names |= set(config_map.get("data", {}))
    return names


def setting_for(variable: str) -> str | None:
    """The `Settings` field that an environment variable sets, as a dotted path."""
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias == variable or (isinstance(alias, AliasChoices) and variable in alias.choices):
            return name
    prefix = str(Settings.model_config.get("env_prefix", ""))
    delimiter = str(Settings.model_config.get("env_nested_delimiter", "__"))
    if not variable.startswith(prefix):
        return None
    model: type[BaseModel] = Settings
    path = []
    parts = variable[len(prefix) :].lower().split(delimiter)
    for depth, part in enumerate(parts):
        found = model.model_fields.get(part)
        if found is None:
            return None
        path.append(part)
        annotation = found.annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
    return ".".join(path)


def settings_for(env: dict[str, str]) -> Settings:
    """The settings a process with this environment reads (and nothing else of ours)."""
    ours = {k: v for k, v in env.items() if k.startswith("UPSERTFLOW_") or k == "DATABASE_URL"}
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith("UPSERTFLOW_") or n == "DATABASE_URL"]:
            del os.environ[name]
        os.environ.update(ours)
        return Settings(_env_file=None)


def setting(settings: BaseModel, flat: str) -> Any:
    """A setting by its flat name (`worker_metrics_port`), whether or not it is in a group."""
    if flat in type(settings).model_fields:
        return getattr(settings, flat)
    for name, value in settings:
        if isinstance(value, BaseModel) and flat.startswith(name + "_"):
            return setting(value, flat[len(name) + 1 :])
    raise KeyError(flat)


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?", str(value))
    assert match, f"not a quantity: {value}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def container_port(container: Obj, port: int | str) -> int | None:
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return int(declared["containerPort"])
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def replica_floor(objects: list[Obj], deployment: Obj) -> int:
    name = deployment["metadata"]["name"]
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"].get("minReplicas", 1))
    for scaled in find(objects, "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] == name:
            return int(scaled["spec"].get("minReplicaCount", 0))
    return int(deployment["spec"].get("replicas", 1))


# ---------------------------------------------------------------- the checks


def security_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for workload, pod in workloads(objects):
        where = named(workload)
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it does not need")
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{where}: service links put *_PORT=tcp://… into the environment")
        pod_context = pod.get("securityContext", {})
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in containers(pod):
            at = f"{where} {container['name']}"
            context = container.get("securityContext", {})
            effective = pod_context | context
            if effective.get("runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if effective.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: the root filesystem is writable")
            if context.get("privileged"):
                problems.append(f"{at}: privileged")
            capabilities = context.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
                problems.append(f"{at}: capabilities are not dropped (ALL, none added)")
            if not any(
                m["mountPath"] == "/tmp" and m["name"] in tmp_volumes and not m.get("readOnly")
                for m in container.get("volumeMounts", [])
            ):
                problems.append(f"{at}: no writable emptyDir at /tmp")
    return problems


def probe_and_resource_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for workload, pod in workloads(objects):
        for container in containers(pod):
            at = f"{named(workload)} {container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        problems.append(f"{at}: no {resource} {kind[:-1]}")
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                if request and limit and quantity(limit) < quantity(request):
                    problems.append(f"{at}: {resource} limit {limit} below request {request}")
        if workload["kind"] != "Deployment":
            continue
        for container in pod["containers"]:
            at = f"{named(workload)} {container['name']}"
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    problems.append(f"{at}: no {probe}")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = container.get(probe, {}).get("httpGet", {})
                if action and container_port(container, action["port"]) is None:
                    problems.append(
                        f"{at}: {probe} on {action['port']}, a port it does not declare"
                    )
    return problems


def disruption_problems(objects: list[Obj]) -> list[str]:
    problems = []
    deployments = find(objects, "Deployment")
    budgets = find(objects, "PodDisruptionBudget")
    for budget in budgets:
        selector = budget["spec"]["selector"].get("matchLabels", {})
        selected = [
            d for d in deployments if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        if len(selected) != 1:
            problems.append(f"{named(budget)} selects the pods of {len(selected)} Deployments")
            continue
        floor = replica_floor(objects, selected[0])
        spec = budget["spec"]
        if "maxUnavailable" in spec:
            if int(spec["maxUnavailable"]) < 1:
                problems.append(f"{named(budget)}: maxUnavailable 0 blocks every drain")
        elif int(spec.get("minAvailable", 0)) >= floor:
            problems.append(
                f"{named(budget)}: minAvailable {spec['minAvailable']} >= {floor} replicas"
            )
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not any(selects(b["spec"]["selector"].get("matchLabels", {}), labels) for b in budgets):
            problems.append(f"{named(deployment)} has no PodDisruptionBudget")
        if not selects(deployment["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{named(deployment)}: its selector does not select its pods")
    return problems


def service_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for service in find(objects, "Service"):
        selected = [
            (d, pod)
            for d, pod in workloads(objects)
            if d["kind"] == "Deployment"
            and selects(
                service["spec"].get("selector", {}), d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        if len(selected) != 1:
            problems.append(f"{named(service)} selects the pods of {len(selected)} Deployments")
            continue
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(container_port(c, target) for c in selected[0][1]["containers"]):
                problems.append(f"{named(service)}: targetPort {target} is no port of its pods")
    return problems


def scaling_problems(objects: list[Obj]) -> list[str]:
    problems = []
    targets: list[str] = []
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        targets.append(ref["name"])
        found = find(objects, ref["kind"], ref["name"])
        if ref["kind"] != "Deployment" or not found:
            problems.append(f"{named(hpa)} scales {ref['kind']}/{ref['name']}, which is not here")
            continue
        for metric in hpa["spec"].get("metrics", []):
            resource = metric.get("resource", {}).get("name")
            if metric["type"] == "Resource" and any(
                resource not in c.get("resources", {}).get("requests", {})
                for c in found[0]["spec"]["template"]["spec"]["containers"]
            ):
                problems.append(f"{named(hpa)}: scales on {resource} that is not requested")
    for scaled in find(objects, "ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        targets.append(ref["name"])
        if ref.get("kind", "Deployment") != "Deployment" or not find(
            objects, "Deployment", ref["name"]
        ):
            problems.append(f"{named(scaled)} scales {ref['name']}, no Deployment here")
    for name in targets:
        if targets.count(name) > 1:
            problems.append(f"Deployment/{name} has two autoscalers")
        for deployment in find(objects, "Deployment", name):
            if "replicas" in deployment["spec"]:
                problems.append(f"{named(deployment)}: `replicas` fights its autoscaler on apply")
    return problems


def keda_problems(objects: list[Obj]) -> list[str]:
    """KEDA's objects have no schema here: what the Temporal scaler reads, and that it watches
    the queue the workers poll, on the Temporal they connect to, with their credentials."""
    scaled_objects = find(objects, "ScaledObject")
    if len(scaled_objects) != 1:
        return [f"{len(scaled_objects)} ScaledObjects; the workers need one"]
    scaled = scaled_objects[0]
    at = named(scaled)
    spec = scaled["spec"]
    problems = []
    if scaled["apiVersion"] != "keda.sh/v1alpha1":
        problems.append(f"{at}: apiVersion {scaled['apiVersion']}")
    if set(spec) - SCALED_OBJECT_FIELDS:
        problems.append(f"{at}: unknown fields {sorted(set(spec) - SCALED_OBJECT_FIELDS)}")
    if not 1 <= spec.get("minReplicaCount", 0) < spec.get("maxReplicaCount", 100):
        problems.append(
            f"{at}: from {spec.get('minReplicaCount')} to {spec.get('maxReplicaCount')}"
        )
    workload, _, worker = running(objects, ["upsertflow-worker"])
    if spec["scaleTargetRef"]["name"] != workload["metadata"]["name"]:
        problems.append(f"{at} scales {spec['scaleTargetRef']['name']}, not the workers")
    if [trigger.get("type") for trigger in spec.get("triggers", [])] != ["temporal"]:
        return [*problems, f"{at}: triggers {spec.get('triggers')}, not one `temporal`"]
    trigger = spec["triggers"][0]
    metadata = trigger.get("metadata", {})
    if set(metadata) - KEDA_TEMPORAL_METADATA:
        problems.append(f"{at}: unknown metadata {sorted(set(metadata) - KEDA_TEMPORAL_METADATA)}")
    if any(not isinstance(value, str) for value in metadata.values()):
        problems.append(f"{at}: trigger metadata values are strings, not {metadata}")
    sizes = (metadata.get("targetQueueSize", ""), metadata.get("activationTargetQueueSize", "0"))
    if not all(str(size).isdigit() for size in sizes) or int(sizes[0]) < 1:
        problems.append(f"{at}: targetQueueSize, activationTargetQueueSize {sizes}")
    if set(str(metadata.get("queueTypes", "")).split(",")) != {"workflow", "activity"}:
        problems.append(f"{at}: queueTypes must name both workflow and activity")
    env = environment(worker, objects, [])
    watched = (metadata.get("endpoint"), metadata.get("namespace"), metadata.get("taskQueue"))
    polled = (
        env.get("TEMPORAL_ADDRESS"),
        env.get("TEMPORAL_NAMESPACE", "default"),
        setting(settings_for(env), "task_queue"),
    )
    if watched != polled:
        problems.append(f"{at} watches {watched}, the workers poll {polled}")
    return problems + keda_auth_problems(objects, trigger, workload, worker)


def keda_auth_problems(objects: list[Obj], trigger: Obj, workload: Obj, worker: Obj) -> list[str]:
    """KEDA reads the backlog with the workers' own credentials, or none if they use none."""
    env = {variable["name"]: variable for variable in worker.get("env", [])}
    expected: dict[str, tuple[str, str]] = {}
    if "TEMPORAL_API_KEY" in env:
        ref = env["TEMPORAL_API_KEY"]["valueFrom"]["secretKeyRef"]
        expected["apiKey"] = (ref["name"], ref["key"])
    pod = workload["spec"]["template"]["spec"]
    for parameter, variable in (
        ("cert", "TEMPORAL_TLS_CLIENT_CERT_PATH"),
        ("key", "TEMPORAL_TLS_CLIENT_KEY_PATH"),
    ):
        if variable in env:
            expected[parameter] = mounted_secret(pod, worker, env[variable]["value"]) or ("?", "?")
    reference = trigger.get("authenticationRef")
    if not reference:
        return [f"the workers authenticate with {expected}, KEDA does not"] if expected else []
    kind = reference.get("kind", "TriggerAuthentication")
    found = find(objects, "TriggerAuthentication", reference["name"])
    if kind != "TriggerAuthentication" or not found:
        return [f"KEDA's {kind}/{reference['name']} is not here"]
    given = {r["parameter"]: (r["name"], r["key"]) for r in found[0]["spec"]["secretTargetRef"]}
    if set(given) - KEDA_TEMPORAL_AUTH:
        return [f"{named(found[0])}: unknown parameters {sorted(set(given) - KEDA_TEMPORAL_AUTH)}"]
    if given != expected:
        return [f"{named(found[0])} gives KEDA {given}, the workers use {expected}"]
    return []


def mounted_secret(pod: Obj, container: Obj, path: str) -> tuple[str, str] | None:
    """The (Secret, key) that a file path of the container comes from, if it does."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            for volume in pod.get("volumes", []):
                if volume["name"] == mount["name"] and "secret" in volume:
                    return volume["secret"]["secretName"], path[len(prefix) :]
    return None


def reference_problems(objects: list[Obj], secrets: list[Obj]) -> list[str]:
    """Every ConfigMap referenced is in the overlay; every Secret key in secrets.example.yaml."""
    problems = []
    wanted: list[tuple[str, str, str | None]] = []  # (who, Secret, key)
    for workload, pod in workloads(objects):
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                wanted.append((named(workload), volume["secret"]["secretName"], None))
            if "configMap" in volume and not find(
                objects, "ConfigMap", volume["configMap"]["name"]
            ):
                problems.append(
                    f"{named(workload)}: ConfigMap {volume['configMap']['name']} is not here"
                )
        for container in containers(pod):
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                if name and not find(objects, "ConfigMap", name):
                    problems.append(f"{named(workload)}: ConfigMap {name} is not here")
                if "secretRef" in source:
                    wanted.append((named(workload), source["secretRef"]["name"], None))
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.append((named(workload), ref["name"], ref["key"]))
    for auth in find(objects, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            wanted.append((named(auth), ref["name"], ref["key"]))
    for who, name, key in wanted:
        found = find(secrets, "Secret", name)
        if not found:
            problems.append(f"{who}: Secret {name} is not in {SECRETS_EXAMPLE.name}")
        elif key is not None and key not in found[0].get("stringData", {}):
            problems.append(f"{who}: Secret {name} has no key {key} in {SECRETS_EXAMPLE.name}")
    return problems


def env_problems(objects: list[Obj], compose: dict[str, Obj]) -> list[str]:
    """Each process gets what docker-compose.yml gives it, under names that are settings."""
    problems = []
    for role in COMPOSE_ROLES:
        service = compose[role]
        command = service["command"]
        workload, pod, container = running(objects, command)
        names = env_names(container, objects)
        missing = set(service.get("environment", {})) - names
        if missing:
            problems.append(
                f"{named(workload)}: not given {sorted(missing)} (docker-compose.yml's {role})"
            )
    # The init containers that wait for the migrations read what the migration reads.
    migrate = set(compose["migrate"].get("environment", {}))
    for workload, pod in workloads(objects):
        for container in pod.get("initContainers", []):
            missing = migrate - env_names(container, objects) if is_ours(container) else set()
            if missing:
                problems.append(f"{named(workload)} {container['name']}: not given {missing}")
    for workload, pod in workloads(objects):
        for container in containers(pod):
            if not is_ours(container):
                continue
            for name in sorted(env_names(container, objects)):
                if not (name.startswith("UPSERTFLOW_") or name == "DATABASE_URL"):
                    continue
                if setting_for(name) is None:
                    problems.append(f"{named(workload)} {container['name']}: {name} is no setting")
    return problems


def temporal_problems(objects: list[Obj], secrets: list[Obj], files: Path) -> list[str]:
    """The SDK's environment configuration (temporalio.envconfig) reads from the API's and the
    workers' TEMPORAL_* variables the address and namespace they name — and, for a Temporal
    outside the cluster, an API key or a client certificate from a mounted Secret."""
    problems = []
    for command in (["upsertflow-api"], ["upsertflow-worker"]):
        workload, pod, container = running(objects, command)
        env = {
            k: v
            for k, v in environment(container, objects, secrets).items()
            if k.startswith("TEMPORAL_")
        }
        for variable in [k for k in env if k.endswith("_PATH")]:
            source = mounted_secret(pod, container, env[variable])
            example = find(secrets, "Secret", source[0]) if source else []
            if not source or not example or source[1] not in example[0].get("stringData", {}):
                problems.append(
                    f"{named(workload)}: {variable} {env[variable]} is no key of a mounted Secret"
                )
                continue
            copy_of = files / workload["metadata"]["name"] / source[1]
            copy_of.parent.mkdir(parents=True, exist_ok=True)
            copy_of.write_text(example[0]["stringData"][source[1]])
            env[variable] = str(copy_of)
        if any(p.startswith(named(workload)) for p in problems):
            continue
        config = connect_config(env)
        if config.get("target_host") != env.get("TEMPORAL_ADDRESS") or not env.get(
            "TEMPORAL_ADDRESS"
        ):
            problems.append(f"{named(workload)}: the SDK connects to {config.get('target_host')}")
        if config.get("namespace", "default") != env.get("TEMPORAL_NAMESPACE", "default"):
            problems.append(f"{named(workload)}: the SDK uses namespace {config.get('namespace')}")
        in_cluster = re.search(r"\.svc(\.cluster\.local)?:\d+$", config.get("target_host", ""))
        if not in_cluster and not (
            config.get("api_key") or getattr(config.get("tls"), "client_cert", None)
        ):
            problems.append(f"{named(workload)}: {config.get('target_host')} without credentials")
    return problems


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Obj]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert isinstance(services, dict)
    return services


@pytest.fixture(scope="module")
def secrets() -> list[Obj]:
    return load_documents(SECRETS_EXAMPLE)


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda path: path.name)
def overlay(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture
def objects(overlay: Path) -> list[Obj]:
    return render(overlay)


# ---------------------------------------------------------------- rendering


def test_there_is_a_self_hosted_and_a_temporal_cloud_overlay() -> None:
    assert {"self-hosted", "temporal-cloud"} <= {path.name for path in OVERLAYS}
    assert {"temporal-cloud", "temporal-cloud-mtls"} <= {path.name for path in CLOUD_OVERLAYS}


@pytest.mark.skipif(kustomize_binary() is None, reason="neither kustomize nor kubectl is installed")
def test_the_renderer_renders_what_kustomize_renders(overlay: Path) -> None:
    command = kustomize_binary()
    assert command is not None
    result = subprocess.run(
        [*command, str(overlay)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr

    def key(obj: Obj) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    expected = sorted(load_documents_from(result.stdout), key=key)
    assert sorted(render(overlay), key=key) == expected


def load_documents_from(text: str) -> list[Obj]:
    return [document for document in yaml.safe_load_all(text) if document]


def test_every_file_is_used_by_a_kustomization() -> None:
    used = {SECRETS_EXAMPLE}
    for kustomization in K8S.rglob("kustomization.yaml"):
        used.add(kustomization)
        spec = yaml.safe_load(kustomization.read_text())
        entries = [
            *spec.get("resources", []),
            *(p["path"] for p in spec.get("patches", []) if "path" in p),
        ]
        entries += [f for g in spec.get("configMapGenerator", []) for f in g.get("files", [])]
        used |= {(kustomization.parent / entry).resolve() for entry in entries}
    unused = {p for p in K8S.rglob("*") if p.is_file()} - used
    assert not unused, f"files no kustomization uses: {sorted(map(str, unused))}"


def test_the_manifests_cite_readme_sections_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    headings = {line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("#")}
    for path in K8S.rglob("*.yaml"):
        for section in re.findall(r'README\.md,\s+(?:#\s+)?"([^"]+)"', path.read_text()):
            assert section in headings, f"{path.relative_to(REPO)} cites README section {section!r}"


# ---------------------------------------------------------------- schemas


def test_core_objects_match_the_kubernetes_schemas(objects: list[Obj]) -> None:
    core = [o for o in objects if not o["apiVersion"].startswith("keda.sh/")]
    kinds = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job"}
    assert {o["kind"] for o in core} >= kinds
    for obj in core:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{named(obj)}: {path}: {error.message}")


def test_the_secrets_example_matches_the_schemas_and_holds_placeholders_only(
    secrets: list[Obj],
) -> None:
    for secret in secrets:
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
        assert secret["kind"] == "Secret" and "data" not in secret
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{named(secret)} {key}: not an obvious placeholder"


def test_keda_objects_configure_the_temporal_scaler(objects: list[Obj]) -> None:
    assert keda_problems(objects) == []
    for auth in find(objects, "TriggerAuthentication"):
        assert auth["apiVersion"] == "keda.sh/v1alpha1"
        assert auth["spec"]["secretTargetRef"], named(auth)


# ---------------------------------------------------------------- what users rely on


def test_every_container_runs_locked_down(objects: list[Obj]) -> None:
    assert security_problems(objects) == []


def test_every_deployment_has_probes_and_every_container_resources(objects: list[Obj]) -> None:
    assert probe_and_resource_problems(objects) == []


def test_disruption_budgets_cover_every_deployment_without_blocking_drains(
    objects: list[Obj],
) -> None:
    assert disruption_problems(objects) == []


def test_services_select_existing_pods(objects: list[Obj]) -> None:
    assert service_problems(objects) == []


def test_the_api_and_workers_autoscale(objects: list[Obj]) -> None:
    assert scaling_problems(objects) == []
    api, _, _ = running(objects, ["upsertflow-api"])
    (hpa,) = [
        h
        for h in find(objects, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    ]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # Two at least: the PDB lets a drain take one while the other answers.
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_every_reference_resolves(objects: list[Obj], secrets: list[Obj]) -> None:
    assert reference_problems(objects, secrets) == []


def test_the_api_listens_where_its_service_and_probes_look(
    objects: list[Obj], secrets: list[Obj]
) -> None:
    _, _, api = running(objects, ["upsertflow-api"])
    settings = settings_for(environment(api, objects, secrets))
    assert setting(settings, "api_host") == "0.0.0.0"
    port = setting(settings, "api_port")
    assert container_port(api, "http") == port
    assert container_port(api, api["livenessProbe"]["httpGet"]["port"]) == port
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (service,) = [
        s
        for s in find(objects, "Service")
        if selects(
            s["spec"]["selector"],
            running(objects, ["upsertflow-api"])[0]["spec"]["template"]["metadata"]["labels"],
        )
    ]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]


def test_the_worker_probes_its_metrics_port(objects: list[Obj], secrets: list[Obj]) -> None:
    _, _, worker = running(objects, ["upsertflow-worker"])
    settings = settings_for(environment(worker, objects, secrets))
    port = setting(settings, "worker_metrics_port")
    assert port, "the worker's probes need its metrics endpoint"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        action = worker[probe]["httpGet"]
        assert (action["path"], container_port(worker, action["port"])) == ("/metrics", port)


def grace_problems(objects: list[Obj]) -> list[str]:
    workload, pod, worker = running(objects, ["upsertflow-worker"])
    shutdown = setting(
        settings_for(environment(worker, objects, [])), "worker_graceful_shutdown_seconds"
    )
    grace = pod.get("terminationGracePeriodSeconds", 30)
    # Past the window the SDK still cancels the activities and reports them: keep a margin.
    if grace < shutdown + 10:
        return [f"{named(workload)}: SIGKILL after {grace} s, graceful shutdown takes {shutdown} s"]
    return []


def test_the_worker_is_killed_only_after_its_graceful_shutdown(objects: list[Obj]) -> None:
    assert grace_problems(objects) == []


def test_the_enrichment_url_names_the_enrichment_service(
    objects: list[Obj], secrets: list[Obj]
) -> None:
    _, _, worker = running(objects, ["upsertflow-worker"])
    url = setting(settings_for(environment(worker, objects, secrets)), "enrichment_url")
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
    assert match, url
    (service,) = find(objects, "Service", match.group(1))
    assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    _, _, enrichment = running(
        objects, ["upsertflow-enrichment", "--host", "0.0.0.0", "--port", match.group(2)]
    )
    assert enrichment["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_migrations_run_once_and_the_processes_wait_for_them(
    objects: list[Obj], compose: dict[str, Obj]
) -> None:
    job, pod, migrate = running(objects, compose["migrate"]["command"])
    assert job["kind"] == "Job"
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1
    # A Job's template is immutable: it goes after it ends, and the next apply makes a new one.
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    for command in (["upsertflow-api"], ["upsertflow-worker"]):
        workload, pod, _ = running(objects, command)
        waits = [
            c
            for c in pod.get("initContainers", [])
            if c.get("args") == ["alembic", "current", "--check-heads"]
        ]
        assert len(waits) == 1, f"{named(workload)} does not wait for the migrations"
        assert waits[0]["image"] == migrate["image"]


def test_one_image_for_every_process_tagged_by_kustomize(objects: list[Obj]) -> None:
    ours = {c["image"] for _, pod in workloads(objects) for c in containers(pod) if is_ours(c)}
    assert len(ours) == 1, ours
    (image,) = ours
    _, tag = split_image(image)
    assert tag and tag != "latest", image
    others = {
        c["image"] for _, pod in workloads(objects) for c in containers(pod) if not is_ours(c)
    }
    for other in others:
        assert PINNED_IMAGE.fullmatch(other), f"{other} is not pinned to a version"


def test_resources_cover_the_benchmarks_worker_peak(objects: list[Obj]) -> None:
    match = re.search(r"worker peak RSS \(MiB\) \|[^|]*\| (\d+)", BENCH_RESULTS.read_text())
    assert match, "bench/RESULTS.md no longer reports the worker's peak RSS"
    peak = int(match.group(1)) * 2**20
    _, _, worker = running(objects, ["upsertflow-worker"])
    resources = worker["resources"]
    assert quantity(resources["requests"]["memory"]) >= peak
    assert quantity(resources["limits"]["memory"]) >= 2 * peak


# ---------------------------------------------------------------- the env contract


def test_each_process_gets_what_compose_gives_it_under_real_setting_names(
    objects: list[Obj], compose: dict[str, Obj]
) -> None:
    assert env_problems(objects, compose) == []


def test_each_process_runs_the_command_compose_runs(
    objects: list[Obj], compose: dict[str, Obj]
) -> None:
    for role in COMPOSE_ROLES:
        _, _, container = running(objects, compose[role]["command"])
        assert is_ours(container), role


def test_the_settings_parse(objects: list[Obj], secrets: list[Obj]) -> None:
    for _, pod in workloads(objects):
        for container in containers(pod):
            if is_ours(container):
                settings_for(environment(container, objects, secrets))  # raises if one is invalid


def test_the_sdk_reads_the_temporal_connection_from_the_environment(
    objects: list[Obj], secrets: list[Obj], tmp_path: Path
) -> None:
    assert temporal_problems(objects, secrets, tmp_path) == []


@pytest.mark.parametrize("cloud_overlay", CLOUD_OVERLAYS, ids=lambda path: path.name)
def test_temporal_cloud_overlays_carry_the_variables_of_the_compose_cloud_setup(
    cloud_overlay: Path,
) -> None:
    objects = render(cloud_overlay)
    example = CLOUD_ENV_EXAMPLE.read_text()
    active = set(re.findall(r"^(TEMPORAL_[A-Z_]+)=", example, re.MULTILINE))
    commented = set(re.findall(r"^#(TEMPORAL_[A-Z_]+)=", example, re.MULTILINE))
    assert "TEMPORAL_API_KEY" in active and commented, "the example changed: update this test"
    for command in (["upsertflow-api"], ["upsertflow-worker"]):
        _, _, container = running(objects, command)
        names = env_names(container, objects)
        expected = (
            active if "TEMPORAL_API_KEY" in names else active - {"TEMPORAL_API_KEY"} | commented
        )
        assert expected <= names, f"{command}: missing {sorted(expected - names)}"


def test_the_codec_keys_are_an_optional_secret(objects: list[Obj]) -> None:
    for command in (["upsertflow-api"], ["upsertflow-worker"]):
        _, _, container = running(objects, command)
        (variable,) = [v for v in container["env"] if v["name"] == "UPSERTFLOW_CODEC__KEYS"]
        assert variable["valueFrom"]["secretKeyRef"]["optional"] is True


# ---------------------------------------------------------------- self-hosted Temporal


def test_the_self_hosted_overlay_registers_the_search_attributes(
    compose: dict[str, Obj],
) -> None:
    objects = render(K8S / "overlays" / "self-hosted")
    (job,) = [
        j
        for j in find(objects, "Job")
        if not is_ours(j["spec"]["template"]["spec"]["containers"][0])
    ]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == compose["temporal-setup"]["image"]
    env = environment(container, objects, [])
    declared = env["SEARCH_ATTRIBUTES"]
    assert dict(pair.split("=", 1) for pair in declared.split()) == SEARCH_ATTRIBUTES
    _, _, worker = running(objects, ["upsertflow-worker"])
    workers = environment(worker, objects, [])
    assert (env["TEMPORAL_ADDRESS"], env["TEMPORAL_NAMESPACE"]) == (
        workers["TEMPORAL_ADDRESS"], workers["TEMPORAL_NAMESPACE"]
    )  # fmt: skip
    # It runs deploy/temporal/setup-namespace.sh, as compose does: a copy, the same bytes.
    shell, script = container["command"]
    assert shell == "/bin/sh"
    (mount,) = [m for m in container["volumeMounts"] if script.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (config_map,) = find(objects, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"][Path(script).name] == SETUP_NAMESPACE.read_text()


# ---------------------------------------------------------------- the checks can fail


def _deployment(objects: list[Obj], command: str) -> Obj:
    return running(objects, [command])[0]


def _container(objects: list[Obj], command: str) -> Obj:
    return running(objects, [command])[2]


def _ungroup_env(objects: list[Obj]) -> None:
    """Spell the worker's grouped settings the old way (`…_WORKER_…` for `…_WORKER__…`)."""
    for variable in _container(objects, "upsertflow-worker")["env"]:
        variable["name"] = variable["name"].replace("__", "_")


MUTATIONS: dict[str, tuple[Callable[[list[Obj]], object], Callable[[list[Obj]], list[str]]]] = {
    "the API's readiness probe removed": (
        lambda o: _container(o, "upsertflow-api").pop("readinessProbe"),
        probe_and_resource_problems,
    ),
    "the worker's liveness probe removed": (
        lambda o: _container(o, "upsertflow-worker").pop("livenessProbe"),
        probe_and_resource_problems,
    ),
    "a probe on an undeclared port": (
        lambda o: _container(o, "upsertflow-api")["livenessProbe"]["httpGet"].update(port="web"),
        probe_and_resource_problems,
    ),
    "the worker's memory limit removed": (
        lambda o: _container(o, "upsertflow-worker")["resources"]["limits"].pop("memory"),
        probe_and_resource_problems,
    ),
    "a writable root filesystem": (
        lambda o: _container(o, "upsertflow-worker")["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        security_problems,
    ),
    "root allowed": (
        lambda o: _deployment(o, "upsertflow-api")["spec"]["template"]["spec"][
            "securityContext"
        ].update(runAsNonRoot=False),
        security_problems,
    ),
    "a capability kept": (
        lambda o: _container(o, "upsertflow-api")["securityContext"]["capabilities"].update(
            drop=["NET_RAW"]
        ),
        security_problems,
    ),
    "the grace period cut to the graceful shutdown": (
        lambda o: _deployment(o, "upsertflow-worker")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30
        ),
        grace_problems,
    ),
    "a longer graceful shutdown than the grace period": (
        lambda o: [
            v.update(value="60")
            for v in _container(o, "upsertflow-worker")["env"]
            if v["name"].endswith("GRACEFUL_SHUTDOWN_SECONDS")
        ],
        grace_problems,
    ),
    "a PDB that selects nothing": (
        lambda o: find(o, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "nothing"}
        ),
        disruption_problems,
    ),
    "a PDB that blocks drains": (
        lambda o: [b["spec"].update(maxUnavailable=0) for b in find(o, "PodDisruptionBudget")],
        disruption_problems,
    ),
    "a Service that selects nothing": (
        lambda o: find(o, "Service")[0]["spec"]["selector"].update(
            {"app.kubernetes.io/component": "nothing"}
        ),
        service_problems,
    ),
    "replicas beside the HPA": (
        lambda o: _deployment(o, "upsertflow-api")["spec"].update(replicas=3),
        scaling_problems,
    ),
    "KEDA watching another task queue": (
        lambda o: find(o, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"].update(
            taskQueue="other"
        ),
        keda_problems,
    ),
    "KEDA asking another Temporal": (
        lambda o: find(o, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"].update(
            endpoint="elsewhere:7233"
        ),
        keda_problems,
    ),
    "a number where KEDA takes a string": (
        lambda o: find(o, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"].update(
            targetQueueSize=10
        ),
        keda_problems,
    ),
    "a setting under its old name": (
        _ungroup_env,
        lambda o: env_problems(o, yaml.safe_load(COMPOSE_FILE.read_text())["services"]),
    ),
    "a variable of compose's left out": (
        lambda o: [
            c["data"].pop("UPSERTFLOW_TASK_QUEUE")
            for c in find(o, "ConfigMap")
            if "UPSERTFLOW_TASK_QUEUE" in c["data"]
        ],
        lambda o: env_problems(o, yaml.safe_load(COMPOSE_FILE.read_text())["services"]),
    ),
    "a Secret that is not in the example": (
        lambda o: _container(o, "upsertflow-api")["env"][0]["valueFrom"]["secretKeyRef"].update(
            name="nowhere"
        ),
        lambda o: reference_problems(o, load_documents(SECRETS_EXAMPLE)),
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_checks_catch_broken_manifests(mutation: str) -> None:
    mutate, check = MUTATIONS[mutation]
    objects = render(K8S / "overlays" / "self-hosted")
    assert check(objects) == []
    broken = copy.deepcopy(objects)
    mutate(broken)
    assert check(broken) != [], f"{mutation}: not caught"


def test_the_checks_catch_a_cloud_overlay_without_credentials(tmp_path: Path) -> None:
    objects = render(K8S / "overlays" / "temporal-cloud")
    secrets = load_documents(SECRETS_EXAMPLE)
    assert temporal_problems(objects, secrets, tmp_path) == []
    assert keda_problems(objects) == []
    for command in ("upsertflow-api", "upsertflow-worker"):
        container = _container(objects, command)
        container["env"] = [v for v in container["env"] if v["name"] != "TEMPORAL_API_KEY"]
    assert temporal_problems(objects, secrets, tmp_path) != []
    assert keda_problems(objects) != []
