"""The deployment under deploy/: Kubernetes and KubeRay manifests, Dockerfiles and their guide.

Pure parsing (no cluster, no Docker, no Ray, no network). Every YAML document is loaded with
``yaml.safe_load_all`` and held to what the deployment promises: only known kinds in one namespace,
nothing exposed outside the cluster, resources on every container, every credential read from a Secret
that ``secrets.example.yaml`` declares with placeholders only, and a RayJob entrypoint that the real
``shoal`` CLI and config loader accept on a cluster that can hold it. Tests are parametrized per file or
per document so that a failure names it.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from orchestrator import load_config
from orchestrator._cli import build_parser

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
SECRETS_FILE = K8S / "secrets.example.yaml"
PLACEHOLDER = "REPLACE_ME"
NAMESPACE = "shoal"
SHARED_MOUNT = "/mnt/shoal"
GPU = "nvidia.com/gpu"

ALLOWED_KINDS = {
    "Namespace": "v1",
    "Service": "v1",
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
}
# An env var whose name says it holds a credential, or whose value is a URI with user:password in it.
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN")
CREDENTIAL_URI = re.compile(r"://[^/\s@]+:[^/\s@]+@")
# A URI's userinfo in a command line is fine only when every part of it is a variable the shell expands.
USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://([^/\s@\"']+)@")
VARIABLE_ONLY = re.compile(r"(\$\{\w+\}|\$\(\w+\)|\$\w+)(:(\$\{\w+\}|\$\(\w+\)|\$\w+))?")
SERVICE_DNS = re.compile(r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local(?::(\d+))?")

YAML_FILES = sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")})


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def load(path: Path) -> tuple[Any, ...]:
    with path.open() as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name"))

    @property
    def id(self) -> str:
        return f"{rel(self.path)}#{self.index}:{self.kind}/{self.name}"


def _all_docs() -> list[Doc]:
    docs = []
    for path in YAML_FILES:
        try:
            loaded = load(path)
        except yaml.YAMLError:
            continue  # test_yaml_file_parses names the file
        docs += [Doc(path, i, body) for i, body in enumerate(loaded) if isinstance(body, dict)]
    return docs


DOCS = _all_docs()


def docs_of(*kinds: str) -> list[Any]:
    return [pytest.param(d, id=d.id) for d in DOCS if not kinds or d.kind in kinds]


# --- walking the documents -------------------------------------------------------------------------


def cluster_specs(doc: Doc) -> list[dict[str, Any]]:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    if doc.kind == "RayCluster":
        return [doc.body["spec"]]
    if doc.kind == "RayJob" and "rayClusterSpec" in doc.body["spec"]:
        return [doc.body["spec"]["rayClusterSpec"]]
    return []


def pod_specs(doc: Doc) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = doc.body.get("spec") or {}
    if doc.kind in ("Deployment", "StatefulSet"):
        yield "template", spec["template"]["spec"]
    for cluster in cluster_specs(doc):
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker group {group.get('groupName')}", group["template"]["spec"]
    if doc.kind == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"]


def containers(doc: Doc) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container of the document, KubeRay's autoscaler sidecar included (its autoscalerOptions)."""
    for where, pod in pod_specs(doc):
        for field in ("initContainers", "containers"):
            for c in pod.get(field) or []:
                yield f"{where}/{c.get('name')}", c
    for cluster in cluster_specs(doc):
        if cluster.get("enableInTreeAutoscaling"):
            yield "autoscaler", cluster.get("autoscalerOptions") or {}


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def items(obj: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every mapping entry, depth first."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k, v
            yield from items(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from items(v, f"{path}[{i}]")


def quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity as a number: "7" -> 7, "500m" -> 0.5."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def secrets_declared() -> dict[str, set[str]]:
    declared: dict[str, set[str]] = {}
    for body in load(SECRETS_FILE):
        if body.get("kind") == "Secret":
            keys = {*(body.get("stringData") or {}), *(body.get("data") or {})}
            declared[body["metadata"]["name"]] = keys
    return declared


def services() -> dict[tuple[str, str], set[int]]:
    """(namespace, name) -> ports of every Service under deploy/."""
    return {
        (d.body["metadata"].get("namespace", "default"), d.name): {int(p["port"]) for p in d.body["spec"]["ports"]}
        for d in DOCS
        if d.kind == "Service"
    }


def gpu_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in cluster.get("workerGroupSpecs", []) if group_limit(g, GPU) > 0]


def group_limit(group: dict[str, Any], resource: str) -> float:
    """The resource one pod of the group gives Ray (KubeRay derives --num-cpus/--num-gpus from limits)."""
    ray_container = group["template"]["spec"]["containers"][0]
    limits = ray_container.get("resources", {}).get("limits", {})
    return quantity(limits.get(resource, 0))


RAYJOBS = ("shoal-camvid", "shoal-camvid-s3")
"""The data on the shared volume, and the pool in the MinIO bucket."""


def the_rayjob(name: str = "shoal-camvid") -> Doc:
    jobs = [d for d in DOCS if d.kind == "RayJob"]
    assert sorted(d.body["metadata"]["name"] for d in jobs) == sorted(RAYJOBS), [d.id for d in jobs]
    return next(d for d in jobs if d.body["metadata"]["name"] == name)


def entrypoint_args(doc: Doc) -> Any:
    words = shlex.split(doc.body["spec"]["entrypoint"])
    assert words[0] == "shoal", f"{doc.id}: the entrypoint must run the shoal CLI, got {words[0]!r}"
    return build_parser().parse_args(words[1:])


# --- files and kinds -------------------------------------------------------------------------------


def test_deploy_has_manifests_and_dockerfiles() -> None:
    kinds = sorted(d.kind for d in DOCS)
    for kind in ("Namespace", "Secret", "PersistentVolumeClaim", "Deployment", "StatefulSet", "RayCluster", "RayJob"):
        assert kind in kinds, f"no {kind} under deploy/ (found {kinds})"
    assert {name for (_, name) in services()} >= {"mlflow", "postgres", "minio"}
    assert SECRETS_FILE.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_file_parses_into_documents(path: Path) -> None:
    docs = load(path)
    assert docs, f"{rel(path)}: no YAML document"
    for i, body in enumerate(docs):
        assert isinstance(body, dict), f"{rel(path)}#{i}: a document must be a mapping, got {type(body).__name__}"


@pytest.mark.parametrize("doc", docs_of())
def test_document_kind_and_api_version_are_allowed(doc: Doc) -> None:
    assert "apiVersion" in doc.body and "kind" in doc.body, f"{doc.id}: apiVersion and kind are required"
    assert doc.kind in ALLOWED_KINDS, f"{doc.id}: kind {doc.kind} not allowed; allowed: {sorted(ALLOWED_KINDS)}"
    assert doc.body["apiVersion"] == ALLOWED_KINDS[doc.kind], f"{doc.id}: apiVersion {doc.body['apiVersion']}"
    assert doc.body.get("metadata", {}).get("name"), f"{doc.id}: metadata.name is required"


@pytest.mark.parametrize("doc", docs_of())
def test_document_lives_in_the_shoal_namespace(doc: Doc) -> None:
    if doc.kind == "Namespace":
        assert doc.name == NAMESPACE
    else:
        assert doc.body["metadata"].get("namespace") == NAMESPACE, f"{doc.id}: metadata.namespace must be {NAMESPACE}"


# --- nothing exposed -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", docs_of("Service"))
def test_service_is_cluster_ip(doc: Doc) -> None:
    spec = doc.body["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP", f"{doc.id}: type {spec.get('type')}"
    for field in ("externalIPs", "loadBalancerIP", "externalName"):
        assert field not in spec, f"{doc.id}: {field} exposes the service"


@pytest.mark.parametrize("doc", docs_of())
def test_nothing_is_exposed_outside_the_cluster(doc: Doc) -> None:
    assert doc.kind not in ("Ingress", "IngressClass", "Gateway", "HTTPRoute"), doc.id
    for path, key, value in items(doc.body):
        assert value not in ("LoadBalancer", "NodePort"), f"{doc.id}: {path}.{key} = {value}"
        assert not (key in ("hostNetwork", "hostPort", "hostPID", "hostIPC") and value), f"{doc.id}: {path}.{key}"
    for cluster in cluster_specs(doc):
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", doc.id


# --- containers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", docs_of("Deployment", "StatefulSet", "RayCluster", "RayJob"))
def test_every_container_has_resource_requests_and_limits(doc: Doc) -> None:
    found = list(containers(doc))
    assert found, f"{doc.id}: no containers found"
    for where, c in found:
        resources = c.get("resources") or {}
        for part in ("requests", "limits"):
            assert resources.get(part), f"{doc.id} {where}: resources.{part} missing"
            for resource in ("cpu", "memory"):
                assert resource in resources[part], f"{doc.id} {where}: resources.{part}.{resource} missing"


@pytest.mark.parametrize("doc", docs_of("Deployment", "StatefulSet", "RayCluster", "RayJob"))
def test_pods_run_as_non_root(doc: Doc) -> None:
    for where, pod in pod_specs(doc):
        security = pod.get("securityContext") or {}
        assert security.get("runAsNonRoot") is True, f"{doc.id} {where}: securityContext.runAsNonRoot"
        assert security.get("runAsUser", 1) != 0, f"{doc.id} {where}: runAsUser 0"
        for c in pod.get("containers", []):
            assert not (c.get("securityContext") or {}).get("privileged"), f"{doc.id} {where}: privileged"


# --- credentials -----------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", docs_of("Deployment", "StatefulSet", "RayCluster", "RayJob"))
def test_credential_env_vars_come_from_secret_refs(doc: Doc) -> None:
    for where, c in containers(doc):
        for env in c.get("env") or []:
            name, value = env["name"], env.get("value")
            looks_secret = bool(CREDENTIAL_NAME.search(name.upper())) or bool(
                isinstance(value, str) and CREDENTIAL_URI.search(value)
            )
            if not looks_secret:
                continue
            assert "value" not in env, f"{doc.id} {where}: env {name} has an inline value; use valueFrom.secretKeyRef"
            ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
            assert ref.get("name") and ref.get("key"), f"{doc.id} {where}: env {name} must use valueFrom.secretKeyRef"


@pytest.mark.parametrize("doc", docs_of())
def test_no_credentials_written_into_uris(doc: Doc) -> None:
    """A URI with user:password in any string (a command line, an annotation) may only name variables."""
    if doc.kind == "Secret":
        return
    for text in strings(doc.body):
        for userinfo in USERINFO.findall(text):
            assert VARIABLE_ONLY.fullmatch(userinfo), f"{doc.id}: credentials written into a URI: {userinfo!r}"


@pytest.mark.parametrize("doc", docs_of("Deployment", "StatefulSet", "RayCluster", "RayJob"))
def test_secret_references_are_declared_in_the_example(doc: Doc) -> None:
    declared = secrets_declared()
    refs = []
    for _, c in containers(doc):
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"]))
        for source in c.get("envFrom") or []:
            if "secretRef" in source:
                refs.append((source["secretRef"]["name"], None))
    for cluster in cluster_specs(doc):
        auth = cluster.get("authOptions") or {}
        assert auth.get("mode") == "token", f"{doc.id}: Ray token authentication must be on (authOptions.mode)"
        # KubeRay reads the token from the key auth_token of the named Secret.
        refs.append((auth["secretName"], "auth_token"))
    for name, key in refs:
        assert name in declared, f"{doc.id}: Secret {name} is not in {rel(SECRETS_FILE)}"
        assert key is None or key in declared[name], (
            f"{doc.id}: key {key} of Secret {name} is not in {rel(SECRETS_FILE)}"
        )


@pytest.mark.parametrize("doc", docs_of("Secret"))
def test_secrets_only_in_the_example_and_only_placeholders(doc: Doc) -> None:
    assert doc.path == SECRETS_FILE, f"{doc.id}: Secrets belong in {rel(SECRETS_FILE)} only"
    values = dict(doc.body.get("stringData") or {})
    values.update({k: base64.b64decode(v).decode() for k, v in (doc.body.get("data") or {}).items()})
    assert values, f"{doc.id}: no keys"
    for key, value in values.items():
        assert value == PLACEHOLDER, f"{doc.id}: {key} must hold the placeholder {PLACEHOLDER}, not a value"


# --- services referenced by DNS name ---------------------------------------------------------------


@pytest.mark.parametrize("path", [*YAML_FILES, DEPLOY / "README.md"], ids=rel)
def test_cluster_dns_names_name_services_defined_here(path: Path) -> None:
    defined = services()
    for name, namespace, port in SERVICE_DNS.findall(path.read_text()):
        assert (namespace, name) in defined, f"{rel(path)}: {name}.{namespace}.svc.cluster.local is no Service here"
        if port:
            assert int(port) in defined[(namespace, name)], f"{rel(path)}: {name}.{namespace} has no port {port}"


# --- Ray -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", docs_of("RayCluster", "RayJob"))
def test_ray_cluster_head_and_autoscaling_gpu_workers(doc: Doc) -> None:
    (cluster,) = cluster_specs(doc)
    assert cluster.get("enableInTreeAutoscaling") is True, f"{doc.id}: enableInTreeAutoscaling"

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", f"{doc.id}: head dashboard-host"
    head_container = head["template"]["spec"]["containers"][0]
    head_resources = head_container["resources"]
    assert GPU not in head_resources.get("limits", {}) and GPU not in head_resources.get("requests", {}), doc.id
    assert head_container["image"].endswith("shoal:cpu"), f"{doc.id}: head image {head_container['image']}"

    groups = gpu_groups(cluster)
    assert groups, f"{doc.id}: no worker group with {GPU} limits"
    for group in groups:
        name = group["groupName"]
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= high and high >= 1, f"{doc.id} {name}: minReplicas {low}, maxReplicas {high}"
        assert low <= group.get("replicas", low) <= high, f"{doc.id} {name}: replicas outside [min, max]"
        pod = group["template"]["spec"]
        assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), f"{doc.id} {name}: no {GPU} toleration"
        image = pod["containers"][0]["image"]
        assert image.endswith("shoal:cuda"), f"{doc.id} {name}: image {image}"


def test_raycluster_gpu_group_scales_to_zero() -> None:
    for doc in (d for d in DOCS if d.kind == "RayCluster"):
        for group in gpu_groups(doc.body["spec"]):
            assert group["minReplicas"] == 0, f"{doc.id}: an idle cluster should hold no GPU node"


@pytest.mark.parametrize("doc", docs_of("RayCluster", "RayJob"))
def test_shared_volume_is_mounted_on_head_and_workers(doc: Doc) -> None:
    claims = {
        d.name: d.body["spec"]
        for d in DOCS
        if d.kind == "PersistentVolumeClaim" and d.body["metadata"]["namespace"] == NAMESPACE
    }
    for where, pod in pod_specs(doc):
        if where == "submitter":
            continue
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == SHARED_MOUNT]
        assert mounts, f"{doc.id} {where}: nothing mounted at {SHARED_MOUNT}"
        volume = volumes[mounts[0]["name"]]
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        assert claim in claims, f"{doc.id} {where}: {SHARED_MOUNT} must be a PVC defined under deploy/, got {volume}"
        assert "ReadWriteMany" in claims[claim]["accessModes"], f"{doc.id}: PVC {claim} must be ReadWriteMany"


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_lifecycle(name: str) -> None:
    job = the_rayjob(name)
    spec = job.body["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{job.id}: shutdownAfterJobFinishes"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0, job.id
    assert "rayClusterSpec" in spec or "clusterSelector" in spec, job.id
    if "runtimeEnvYAML" in spec:
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(runtime_env, dict), f"{job.id}: runtimeEnvYAML must be a mapping"
        working_dir = runtime_env.get("working_dir")
        if working_dir:
            # The submitter runs the head image: working_dir must be where that image keeps configs/.
            dockerfile = instructions(DOCKER / "Dockerfile.cpu")
            workdirs = [arg for op, arg in dockerfile if op == "WORKDIR"]
            assert workdirs and workdirs[-1] == working_dir, f"{job.id}: working_dir {working_dir} vs {workdirs}"
            assert any(op == "COPY" and arg.split()[0] == "configs" for op, arg in dockerfile), "configs/ not in image"


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_entrypoint_is_a_real_shoal_command(name: str) -> None:
    job = the_rayjob(name)
    args = entrypoint_args(job)
    assert args.command == "run", f"{job.id}: expected `shoal run`, got {args.command}"
    config = PurePosixPath(args.config)
    assert not config.is_absolute() and config.parts[0] == "configs", f"{job.id}: --config {config}"
    assert (ROOT / config).is_file(), f"{job.id}: --config {config} does not exist in the repository"
    assert PurePosixPath(args.workdir).is_relative_to(SHARED_MOUNT), f"{job.id}: --workdir must be on {SHARED_MOUNT}"

    # The overrides name real keys with valid values: the loader is strict.
    cfg = load_config(ROOT / config, args.set or [])
    if cfg.data.kind == "folder":
        for key in ("train_dir", "val_dir"):
            value = str(getattr(cfg.data, key))
            if value.startswith("s3://"):  # read from the bucket with the shoal-s3 Secret's credentials
                assert s3_credentials_on_every_ray_container(job), f"{job.id}: data.{key} {value} needs credentials"
                continue
            assert PurePosixPath(value).is_relative_to(SHARED_MOUNT), f"{job.id}: data.{key} {value} is not on {SHARED_MOUNT}"

    uri = urlsplit(str(cfg.tracking.tracking_uri))
    assert uri.scheme == "http" and uri.hostname and uri.port, f"{job.id}: tracking_uri {cfg.tracking.tracking_uri}"
    match = SERVICE_DNS.fullmatch(f"{uri.hostname}:{uri.port}")
    assert match, f"{job.id}: tracking_uri must name an in-cluster Service: {uri.geturl()}"
    assert (match[2], match[1]) in services() and uri.port in services()[(match[2], match[1])], uri.geturl()


def s3_credentials_on_every_ray_container(job: Doc) -> bool:
    """The AWS SDK's variables from the shoal-s3 Secret on the head (the driver) and every worker."""
    cluster = job.body["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]
    wanted = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in container.get("env", [])}
            if not wanted <= set(env) or {env[k] for k in wanted} != {"shoal-s3"}:
                return False
    return True


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_cluster_can_hold_the_training_it_starts(name: str) -> None:
    """Mirrors workers/_train.py::_check_resources, which refuses training the cluster cannot hold *now*:
    the pods the RayJob's cluster starts with (minReplicas) must carry the workers the entrypoint asks for."""
    job = the_rayjob(name)
    args = entrypoint_args(job)
    cfg = load_config(ROOT / args.config, args.set or [])
    cluster = job.body["spec"]["rayClusterSpec"]
    workers = max(cfg.train.num_workers, 1)
    groups = cluster.get("workerGroupSpecs", [])
    head_cpus = quantity(cluster["headGroupSpec"]["rayStartParams"].get("num-cpus", 0))
    cpus = head_cpus + sum(g["minReplicas"] * group_limit(g, "cpu") for g in groups)
    gpus = sum(g["minReplicas"] * group_limit(g, GPU) for g in groups)
    if cfg.train.num_workers > 0:
        assert cpus >= workers * cfg.train.cpus_per_worker, f"{job.id}: {cpus:g} CPUs at start for {workers} workers"
    if cfg.train.use_gpu:
        assert gpus >= workers, f"{job.id}: {gpus:g} GPUs at start, train.num_workers={workers} with use_gpu"
    if cfg.score.gpus_per_actor > 0:
        most = sum(g["maxReplicas"] * group_limit(g, GPU) for g in groups)
        assert cfg.score.num_actors * cfg.score.gpus_per_actor <= most, f"{job.id}: scoring needs more GPUs than max"


# --- MLflow ----------------------------------------------------------------------------------------


def test_mlflow_server_command() -> None:
    (doc,) = [d for d in DOCS if d.kind == "Deployment" and d.name == "mlflow"]
    (server,) = [c for where, c in containers(doc) if where.endswith("/mlflow")]
    command = " ".join([*server.get("command", []), *server.get("args", [])])
    assert "mlflow server" in command
    assert re.search(r"--host 0\.0\.0\.0\b", command) and re.search(r"--port 5000\b", command), command
    assert "--artifacts-destination s3://shoal-mlflow/" in command
    store = re.search(r"(?:--backend-store-uri |MLFLOW_BACKEND_STORE_URI=)\"?(postgresql://\S+?)\"?(\s|$)", command)
    assert store, f"{doc.id}: no postgresql:// backend store in {command!r}"
    env = {e["name"] for e in server.get("env", [])}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        assert name in env, f"{doc.id}: env {name} missing"
    for variable in re.findall(r"\$\{(\w+)\}", store[1]):
        assert variable in env, f"{doc.id}: the store URI uses ${{{variable}}}, which the container does not set"

    # MLflow answers only Host headers it allows; the RayJob's tracking URI must be one of them.
    job_args = entrypoint_args(the_rayjob())
    uri = urlsplit(str(load_config(ROOT / job_args.config, job_args.set or []).tracking.tracking_uri))
    allowed = re.search(r"--allowed-hosts[ =]\"?([^\"\s]+)", command)
    assert allowed, f"{doc.id}: without --allowed-hosts MLflow refuses the Host {uri.netloc}"
    assert uri.netloc in allowed[1].split(","), f"{doc.id}: {uri.netloc} is not in --allowed-hosts"


# --- Dockerfiles -----------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        op, _, rest = pending.partition(" ")
        out.append((op.upper(), rest.strip()))
        pending = ""
    return out


def base_images(path: Path) -> list[str]:
    """The images of FROM lines, ARG defaults substituted, stage names (FROM <stage>) left out."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for op, rest in instructions(path):
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key.strip(), value.strip().strip('"'))
        elif op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), words[0])
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image not in stages:
                images.append(image)
    return images


def dockerignore(dockerfile: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """The Dockerfile-specific ignore file BuildKit reads for `docker build -f <dockerfile> .`."""
    rules = []
    for raw in Path(f"{dockerfile}.dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((keep, re.compile(regex.replace(r"\?", "[^/]"))))
    return rules


def sent(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether a context path reaches the builder: the last rule matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = True
    for keep, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = keep
    return result


RUNTIMES = ["cpu", "cuda"]
DOCKERFILES = [*RUNTIMES, "mlflow"]


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfile_bases_are_pinned(variant: str) -> None:
    path = DOCKER / f"Dockerfile.{variant}"
    assert path.is_file(), f"{rel(path)} missing"
    images = base_images(path)
    assert images, f"{rel(path)}: no FROM"
    for image in images:
        assert "$" not in image, f"{rel(path)}: FROM {image} has an ARG without a default"
        name = image.rsplit("/", 1)[-1]
        assert ":" in name or "@sha256:" in image, f"{rel(path)}: FROM {image} has no tag"
        assert not image.endswith(":latest"), f"{rel(path)}: FROM {image} is not pinned"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfile_runs_as_non_root(variant: str) -> None:
    path = DOCKER / f"Dockerfile.{variant}"
    users = [rest for op, rest in instructions(path) if op == "USER"]
    assert users, f"{rel(path)}: no USER, so the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{rel(path)}: USER {users[-1]}"
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert user.isdigit(), f"{rel(path)}: USER {users[-1]} should be numeric"


@pytest.mark.parametrize("variant", RUNTIMES)
def test_runtime_dockerfile_installs_the_project(variant: str) -> None:
    path = DOCKER / f"Dockerfile.{variant}"
    steps = instructions(path)
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), f"{rel(path)}: no `pip install .`"
    assert "shoal --help" in runs, f"{rel(path)}: should check that `shoal` is on PATH"
    assert re.search(r"apt-get install [^&]*\bwget\b", runs), f"{rel(path)}: KubeRay's probes need wget"
    copied = {rest.split()[0] for op, rest in steps if op == "COPY" and not rest.startswith("--")}
    assert {"pyproject.toml", "orchestrator", "workers", "strategies", "configs"} <= copied, copied


def test_runtime_images_share_one_python_patch_version() -> None:
    """Ray refuses a worker node whose Python differs from the head's, down to the patch version."""
    versions = {}
    for variant in RUNTIMES:
        path = DOCKER / f"Dockerfile.{variant}"
        found = [
            rest.split("=", 1)[1]
            for op, rest in instructions(path)
            if op == "ARG" and rest.startswith("PYTHON_VERSION=")
        ]
        assert found, f"{rel(path)}: no ARG PYTHON_VERSION=<x.y.z>"
        assert re.fullmatch(r"3\.11\.\d+", found[0]), (
            f"{rel(path)}: PYTHON_VERSION {found[0]} is not a 3.11 patch release"
        )
        versions[variant] = found[0]
    assert len(set(versions.values())) == 1, versions
    assert any(versions["cpu"] in image for image in base_images(DOCKER / "Dockerfile.cpu"))


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_build_context_sends_what_the_image_copies_and_nothing_local(variant: str) -> None:
    path = DOCKER / f"Dockerfile.{variant}"
    rules = dockerignore(path)
    for op, rest in instructions(path):
        if op != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            assert sent(rules, source), f"{rel(path)}: COPY {source}, but its .dockerignore leaves it out"
            if (ROOT / source).is_dir():
                files = [rel(p) for p in (ROOT / source).rglob("*") if p.is_file()]
                assert any(sent(rules, f) for f in files), f"{rel(path)}: nothing of {source}/ is sent"
    for local in (".venv/bin/python", "runs/quickstart/mlflow.db", ".git/config", "orchestrator/__pycache__/x.pyc"):
        assert not sent(rules, local), f"{rel(path)}: the build context would include {local}"


# --- the guide -------------------------------------------------------------------------------------


def test_readme_covers_every_manifest_and_the_steps() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in YAML_FILES:
        assert rel(path) in readme, f"deploy/README.md does not mention {rel(path)}"
    for step in (
        "docker build -f deploy/docker/Dockerfile.cpu -t shoal:cpu .",
        "docker build -f deploy/docker/Dockerfile.cuda -t shoal:cuda .",
        "create secret generic",
        "helm install",
        "kubectl -n shoal port-forward svc/mlflow",
        "8265:8265",
        "ray job submit",
    ):
        assert step in readme, f"deploy/README.md: missing {step!r}"


def test_cuda_image_matches_the_torch_wheel_cuda() -> None:
    """The base image's CUDA is the one the pinned torch wheel was built for (the dev venv has the
    same PyPI wheel), and the README states the driver that CUDA needs."""
    import torch

    text = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    match = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-", text)
    assert match, "Dockerfile.cuda: no nvidia/cuda cudnn runtime base"
    assert torch.version.cuda is not None, "the dev venv's torch is a CPU build: no CUDA to compare"
    assert f"{match.group(1)}.{match.group(2)}" == torch.version.cuda
    assert "580.65.06" in (DEPLOY / "README.md").read_text() and "580.65.06" in text


def test_readme_job_submit_passes_what_the_rayjob_entrypoint_passes() -> None:
    """The `ray job submit` example of deploy/README.md sets every --set of the RayJob's entrypoint,
    and waits for the RayCluster before waiting for its head pod (the pod does not exist yet right
    after `kubectl apply`)."""
    readme = (DEPLOY / "README.md").read_text()
    block = readme[readme.index(".venv/bin/ray job submit"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    submitted = shlex.split(block)
    entry = shlex.split(the_rayjob().body["spec"]["entrypoint"])

    def sets(words: list[str]) -> dict[str, str]:
        return dict(w.split("=", 1) for prev, w in zip(words, words[1:]) if prev == "--set")

    job, example = sets(entry), sets(submitted)
    assert {k: v for k, v in job.items() if k in example} == {k: example[k] for k in job if k in example}
    assert set(job) <= set(example), f"the README example drops {sorted(set(job) - set(example))}"
    apply_at = readme.index("kubectl apply -f deploy/k8s/raycluster.yaml")
    assert readme.index("raycluster/shoal --timeout", apply_at) < readme.index("--for=condition=Ready pod", apply_at)
