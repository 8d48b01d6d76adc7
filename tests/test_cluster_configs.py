"""cluster/: the autoscaler YAMLs, the KubeRay RayJob and the job runtime env, checked offline.

* Autoscaler YAMLs go through what ``ray up`` runs before it talks to a cloud:
  ``prepare_config`` (defaults, setup-command merging, docker checks) and ``validate_config``
  (``ray/autoscaler/ray-schema.json`` via jsonschema, head type, min_workers sum), then our own
  checks (GPU worker types declare GPUs that match the hardware, GCP GPU VMs terminate on host
  maintenance, file mounts exist, setup installs draftrl, Ray versions agree).
* The RayJob manifest is checked against a schema for the part of KubeRay's ``ray.io/v1`` CRD it
  uses (field names from kuberay's ``rayjob_types.go`` / ``raycluster_types.go``), its pod
  templates against the Kubernetes ``PodTemplate`` schema (kubernetes-validate, strict), its
  runtime env against cluster/runtime_env.yaml and Ray's ``RuntimeEnv``, and its entrypoint by
  loading the draftrl config it names and checking the GPUs it asks for fit the worker groups.
* Every check also runs on deliberately broken copies, which must be rejected.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

from tools.cli import build_parser
from speculative.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AUTOSCALER_FILES = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

# (vCPUs, GPUs) of the EC2 instance types the AWS YAML uses (AWS instance type specs). A new
# instance type in aws.yaml must be added here, so the GPU count Ray plans with stays checked.
EC2_TYPES = {
    "m6i.2xlarge": (8, 0),
    "m6i.4xlarge": (16, 0),
    "g6e.xlarge": (4, 1),
    "g6e.4xlarge": (16, 1),
    "g6e.12xlarge": (48, 4),
    "g6e.48xlarge": (192, 8),
    "p4d.24xlarge": (96, 8),
    "p4de.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}


class ClusterConfigError(ValueError):
    """A cluster file that Ray might accept but that would not run draftrl as intended."""


def load(name: str | Path) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --------------------------------------------------------------------------------------------
# Autoscaler YAMLs
# --------------------------------------------------------------------------------------------


def ray_check(raw: dict) -> dict:
    """What ``ray up`` does to a config before touching the provider; returns the prepared one."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _ray_pins(text: str) -> set[str]:
    """Ray versions a file pins: docker image tags, ``ray[...]==X`` and ``rayVersion``."""
    pins = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
    pins |= set(re.findall(r"ray(?:\[[a-z,]+\])?==(\d+\.\d+\.\d+)", text))
    pins |= set(re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text))
    return pins


HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def draftrl_check(raw: dict, prepared: dict) -> None:
    """Our own rules on top of Ray's validation (raises ClusterConfigError)."""
    provider = raw["provider"]["type"]
    for local in raw.get("file_mounts", {}).values():  # `ray up` runs from the repo root
        if not (ROOT / Path(local).expanduser()).exists():
            raise ClusterConfigError(f"file_mounts source {local!r} does not exist in the repo")

    setup = " ".join(prepared.get("head_setup_commands", []) + prepared.get("worker_setup_commands", []))
    if "draftrl" not in " ".join(prepared.get("head_setup_commands", [])):
        raise ClusterConfigError("head_setup_commands do not install draftrl (the job driver runs there)")
    if "[vllm]" not in " ".join(prepared.get("worker_setup_commands", [])):
        raise ClusterConfigError("worker_setup_commands do not install draftrl's vllm extra")
    pins = _ray_pins(yaml.safe_dump(raw, width=10**6) + setup)
    if len(pins) > 1:
        raise ClusterConfigError(f"Ray versions disagree within the file: {sorted(pins)}")

    if provider == "local":
        head_ip = raw["provider"].get("head_ip")
        worker_ips = raw["provider"].get("worker_ips")
        if not head_ip or not isinstance(worker_ips, list):
            raise ClusterConfigError("local provider needs head_ip and a worker_ips list")
        for host in [head_ip, *worker_ips]:  # placeholders must at least be addresses/hostnames
            if not isinstance(host, str) or not (_is_ip(host) or HOSTNAME.fullmatch(host)):
                raise ClusterConfigError(f"{host!r} is neither an IP address nor a hostname")
        if head_ip in worker_ips or len(set(worker_ips)) != len(worker_ips):
            raise ClusterConfigError("head_ip repeated among worker_ips")
        return

    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    if head not in types:
        raise ClusterConfigError(f"head_node_type {head!r} is not one of {sorted(types)}")
    for name, node in prepared["available_node_types"].items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", 0)
        if lo > hi:
            raise ClusterConfigError(f"{name}: min_workers {lo} > max_workers {hi}")
        if hi > prepared["max_workers"]:
            raise ClusterConfigError(f"{name}: max_workers {hi} > the global max_workers {prepared['max_workers']}")
        resources = node["resources"]
        if name == head:
            if resources.get("GPU", 0):
                raise ClusterConfigError("the head node type should not be a GPU type")
            continue
        # Every worker type here exists to host rollout actors / learners: it must offer GPUs,
        # and the count Ray plans with must be the hardware's.
        gpus = resources.get("GPU", 0)
        if gpus < 1:
            raise ClusterConfigError(f"worker type {name} declares no GPU resource")
        if hi < 1:
            raise ClusterConfigError(f"worker type {name} has max_workers 0: it can never start")
        config = node["node_config"]
        if provider == "aws":
            itype = config.get("InstanceType")
            if itype not in EC2_TYPES:
                raise ClusterConfigError(f"{name}: instance type {itype!r} not in EC2_TYPES")
            if EC2_TYPES[itype] != (resources.get("CPU"), gpus):
                raise ClusterConfigError(
                    f"{name}: {itype} has (CPU, GPU) {EC2_TYPES[itype]}, config says "
                    f"{(resources.get('CPU'), gpus)}")
            if not config.get("ImageId"):
                raise ClusterConfigError(f"{name}: no ImageId (Ray's default AMI is too old)")
        elif provider == "gcp":
            if "machineType" not in config:  # a Compute VM (Ray treats machineType-less as a TPU)
                raise ClusterConfigError(f"{name}: no machineType")
            accelerators = config.get("guestAccelerators") or []
            declared = sum(int(a["acceleratorCount"]) for a in accelerators)
            if declared != gpus:
                raise ClusterConfigError(f"{name}: guestAccelerators give {declared} GPUs, resources say {gpus}")
            if (config.get("scheduling") or {}).get("onHostMaintenance") != "TERMINATE":
                raise ClusterConfigError(f"{name}: GPU VMs need scheduling.onHostMaintenance TERMINATE")
    if provider == "gcp" and not raw["provider"].get("project_id"):
        raise ClusterConfigError("gcp provider without project_id")


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_yaml_passes_rays_schema_and_validation(name):
    prepared = ray_check(load(name))
    # validate_config ran the schema; run it once more on the raw file too, so that a field that
    # only our file sets (not Ray's defaults) is checked as written.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_yaml_draftrl_rules(name):
    raw = load(name)
    draftrl_check(raw, ray_check(raw))


def test_cloud_yamls_have_head_and_gpu_worker_types():
    for name in CLOUD_FILES:
        raw = load(name)
        workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
        gpus = sorted(v["resources"]["GPU"] for v in workers.values())
        assert gpus[0] == 1 and gpus[-1] == 8, f"{name}: want a 1-GPU and an 8-GPU worker type, got {gpus}"
        assert raw["idle_timeout_minutes"] > 0


def _mutate(raw: dict, changes: dict) -> dict:
    raw = copy.deepcopy(raw)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


# (file, dotted path, new value or DELETE, exception the whole check must raise); a dict in
# place of the path applies several changes.
DELETE = object()
BROKEN_AUTOSCALER = [
    ("aws.yaml", "no_such_field", 1, jsonschema.ValidationError),
    ("aws.yaml", "available_node_types.gpu_1x_l40s.resources.GPU", 0.5, jsonschema.ValidationError),
    ("aws.yaml", "available_node_types.gpu_1x_l40s.bogus", 1, jsonschema.ValidationError),
    ("aws.yaml", "available_node_types.gpu_1x_l40s.node_config", DELETE, jsonschema.ValidationError),
    ("aws.yaml", "head_node_type", "nonexistent", ValueError),
    ("aws.yaml", {"max_workers": 1, "available_node_types.gpu_1x_l40s.min_workers": 1,
                  "available_node_types.gpu_8x_h100.min_workers": 1}, None, ValueError),
    ("aws.yaml", "max_workers", 1, ClusterConfigError),
    ("aws.yaml", "docker.imagee", "x", jsonschema.ValidationError),
    ("aws.yaml", "available_node_types.gpu_1x_l40s.min_workers", 5, ClusterConfigError),
    ("aws.yaml", "available_node_types.gpu_1x_l40s.resources", {"CPU": 16}, ClusterConfigError),
    ("aws.yaml", "available_node_types.gpu_8x_h100.resources", {"CPU": 192, "GPU": 4}, ClusterConfigError),
    ("aws.yaml", "available_node_types.gpu_8x_h100.node_config.InstanceType", "p9.huge", ClusterConfigError),
    ("aws.yaml", "file_mounts", {"~/draftrl": "no_such_dir"}, ClusterConfigError),
    ("aws.yaml", "worker_setup_commands", ["pip install -q $HOME/draftrl"], ClusterConfigError),
    ("aws.yaml", "docker.head_image", "rayproject/ray:2.9.0-py311-cpu", ClusterConfigError),
    ("gcp.yaml", "available_node_types.gpu_1x_a100.node_config.scheduling", DELETE, ClusterConfigError),
    ("gcp.yaml", "available_node_types.gpu_8x_h100.resources", {"CPU": 208, "GPU": 4}, ClusterConfigError),
    ("gcp.yaml", "provider.project_id", None, ClusterConfigError),
    ("gcp.yaml", "provider.project_id", 123, jsonschema.ValidationError),
    ("onprem.yaml", "provider.worker_ips", "192.0.2.11", jsonschema.ValidationError),
    ("onprem.yaml", "provider.head_ip", "fill me in", ClusterConfigError),
    ("onprem.yaml", "provider.worker_ips", ["192.0.2.10"], ClusterConfigError),
    ("onprem.yaml", "auth.ssh_pasword", "x", jsonschema.ValidationError),
]


@pytest.mark.parametrize("name,path,value,error", BROKEN_AUTOSCALER,
                         ids=[f"{n}:{'+'.join(p) if isinstance(p, dict) else p}" for n, p, *_ in BROKEN_AUTOSCALER])
def test_broken_autoscaler_yaml_is_rejected(name, path, value, error):
    broken = _mutate(load(name), path if isinstance(path, dict) else {path: value})
    with pytest.raises(error):
        draftrl_check(broken, ray_check(broken))


def test_local_provider_rejects_node_types():
    """Ray's own on-prem rule (why onprem.yaml has no available_node_types) is enforced."""
    broken = copy.deepcopy(load("onprem.yaml"))
    broken["available_node_types"] = copy.deepcopy(load("aws.yaml")["available_node_types"])
    broken["head_node_type"] = "head"
    with pytest.raises(Exception, match="not supported for on-premise"):
        ray_check(broken)


# --------------------------------------------------------------------------------------------
# Runtime env
# --------------------------------------------------------------------------------------------


def runtime_env_check(runtime_env: dict, local_working_dir: bool = True) -> RuntimeEnv:
    """Ray's RuntimeEnv validation plus what it lets through. ``local_working_dir=False`` for a
    working_dir that exists on the cluster, not here (RuntimeEnv checks local paths exist)."""
    unknown = set(runtime_env) - set(RuntimeEnv.known_fields)
    if unknown:  # RuntimeEnv itself accepts unknown keys (as plugin fields)
        raise ClusterConfigError(f"unknown runtime_env fields {sorted(unknown)}")
    fields = dict(runtime_env)
    if not local_working_dir and not isinstance(fields.pop("working_dir", ""), str):
        raise ClusterConfigError("working_dir must be a string")
    env = RuntimeEnv(**fields)  # validates each known field's type
    excludes = runtime_env.get("excludes", [])
    for heavy in (".venv/", "runs/", ".git/"):
        if heavy not in excludes:
            raise ClusterConfigError(f"runtime_env excludes lack {heavy!r}: the upload would carry it")
    return env


def test_runtime_env_accepted_by_ray_as_the_cli_reads_it():
    # Exactly what `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` builds.
    runtime_env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    env = runtime_env_check(runtime_env)
    assert env.working_dir() == "."
    assert env.env_vars()["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("broken,error", [
    ({"env_vars": {"PYTHONUNBUFFERED": 1}}, TypeError),
    ({"excludes": ".venv/"}, TypeError),
    ({"env_var": {"A": "1"}}, ClusterConfigError),
    ({"excludes": ["runs/", ".git/"]}, ClusterConfigError),
])
def test_broken_runtime_env_is_rejected(broken, error):
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    runtime_env.update(broken)
    with pytest.raises(error):
        runtime_env_check(runtime_env)


# --------------------------------------------------------------------------------------------
# KubeRay RayJob
# --------------------------------------------------------------------------------------------

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1}},
        },
    },
}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
# The part of KubeRay's ray.io/v1 RayJob that the manifest may use, written from the field names
# and json tags in kuberay's ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go. Objects list
# their fields exhaustively (additionalProperties: false) so that a misspelt key fails here and
# not in the cluster (where the API server would prune it silently).
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": _STR_MAP,
                "annotations": _STR_MAP,
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": _INT32,
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "additionalProperties": False,
                            "properties": {
                                "serviceType": {"type": "string"},
                                "headService": {"type": "object"},
                                "enableIngress": {"type": "boolean"},
                                "rayStartParams": _STR_MAP,
                                "template": _POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string", "minLength": 1},
                                    "replicas": _INT32,
                                    "minReplicas": _INT32,
                                    "maxReplicas": _INT32,
                                    "numOfHosts": {"type": "integer", "minimum": 1},
                                    "rayStartParams": _STR_MAP,
                                    "template": _POD_TEMPLATE,
                                    "scaleStrategy": {"type": "object"},
                                },
                            },
                        },
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "resources": {"type": "object"},
                                "image": {"type": "string"},
                                "imagePullPolicy": {"type": "string"},
                                "env": {"type": "array"},
                                "envFrom": {"type": "array"},
                                "volumeMounts": {"type": "array"},
                                "securityContext": {"type": "object"},
                                "idleTimeoutSeconds": _INT32,
                                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                            },
                        },
                        "headServiceAnnotations": _STR_MAP,
                        "suspend": {"type": "boolean"},
                    },
                },
                "submitterPodTemplate": _POD_TEMPLATE,
                "metadata": _STR_MAP,
                "clusterSelector": _STR_MAP,
                "submitterConfig": {"type": "object"},
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionStrategy": {"type": "object"},
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": _INT32,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
                "schedule": {"type": "string"},
            },
        },
    },
}


def _pod_gpus(template: dict) -> int:
    total = 0
    for container in template["spec"]["containers"]:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or {}
        gpu = int(limits.get("nvidia.com/gpu", 0))
        if "nvidia.com/gpu" in requests and int(requests["nvidia.com/gpu"]) != gpu:
            raise ClusterConfigError(f"{container['name']}: nvidia.com/gpu requests != limits")
        total += gpu
    return total


def _entrypoint_config(entrypoint: str):
    argv = shlex.split(entrypoint)
    if argv[:3] != ["python", "-m", "pipeline.train"]:
        raise ClusterConfigError(f"entrypoint does not run `python -m pipeline.train`: {argv[:3]}")
    args = build_parser().parse_args(["train", *argv[3:]])  # what pipeline.train parses
    if args.config is None:
        raise ClusterConfigError("entrypoint gives no --config")
    return load_config(ROOT / args.config, args.overrides)  # relative to the job's working_dir


def demand_bundles(distributed) -> list[dict[str, float]]:
    """The placement-group bundles the `distributed:` section asks Ray for (each must fit on one
    node). From the pipeline's own ``pipeline.placement.bundles`` when it is there."""
    try:
        from pipeline.placement import bundles
    except ImportError:  # the Ray pipeline's placement module is not in this checkout
        d = distributed
        return ([{"CPU": d.cpus_per_actor, "GPU": d.gpus_per_learner}] * d.num_learners
                + [{"CPU": d.cpus_per_actor, "GPU": d.gpus_per_rollout_actor}] * d.num_rollout_actors)
    return [bundle for group in bundles(distributed).values() for bundle in group]


def gpu_demand(distributed) -> tuple[float, float]:
    """(total GPUs, the largest single bundle's GPUs) of a `distributed:` section."""
    gpus = [bundle.get("GPU", 0.0) for bundle in demand_bundles(distributed)]
    return sum(gpus), max(gpus)


def fit_check(distributed, shapes: list[tuple[float, float, int]]) -> None:
    """``shapes``: (CPUs, GPUs, max count) per worker node type / group."""
    bundles = demand_bundles(distributed)
    for bundle in bundles:
        if not any(bundle.get("CPU", 0) <= cpu and bundle.get("GPU", 0) <= gpu for cpu, gpu, _ in shapes):
            raise ClusterConfigError(f"one actor asks for {bundle}, which no worker node can hold")
    total = sum(bundle.get("GPU", 0.0) for bundle in bundles)
    capacity = sum(gpu * count for _, gpu, count in shapes)
    if total > capacity:
        raise ClusterConfigError(f"the job asks for {total} GPUs, the workers offer at most {capacity}")


def _cpu_quantity(value) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def rayjob_check(manifest: dict) -> None:
    jsonschema.validate(manifest, RAYJOB_SCHEMA)
    spec = manifest["spec"]
    if spec.get("shutdownAfterJobFinishes") is not True:
        raise ClusterConfigError("shutdownAfterJobFinishes must be true (GPU pods outlive the job otherwise)")

    # Pod templates: the Kubernetes schema for PodTemplate (strict: unknown fields are errors).
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cluster = spec["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
             "template": group["template"]},
            kubernetes_validate.latest_version(), strict=True)

    if _pod_gpus(cluster["headGroupSpec"]["template"]):
        raise ClusterConfigError("the head pod asks for GPUs")
    workers = cluster.get("workerGroupSpecs", [])
    if not workers:
        raise ClusterConfigError("no worker groups")
    if len({g["groupName"] for g in workers}) != len(workers):
        raise ClusterConfigError("duplicate worker groupName")
    shapes = []
    for group in workers:
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not lo <= group.get("replicas", lo) <= hi:
            raise ClusterConfigError(f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas")
        gpus = _pod_gpus(group["template"])
        if gpus < 1:
            raise ClusterConfigError(f"worker group {group['groupName']} has no nvidia.com/gpu limit")
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        shapes.append((_cpu_quantity(limits.get("cpu", 0)), gpus, hi))

    # The runtime env: cluster/runtime_env.yaml plus a working_dir that exists in the image.
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    if not isinstance(runtime_env, dict):
        raise ClusterConfigError("runtimeEnvYAML is not a YAML mapping")
    runtime_env_check(runtime_env, local_working_dir=False)
    reference = yaml.safe_load(RUNTIME_ENV.read_text())
    for key in (set(reference) | set(runtime_env)) - {"working_dir"}:
        if runtime_env.get(key) != reference.get(key):
            raise ClusterConfigError(f"runtimeEnvYAML.{key} differs from cluster/runtime_env.yaml")
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    if runtime_env.get("working_dir") != workdir:
        raise ClusterConfigError(f"runtimeEnvYAML.working_dir is not the image's repo copy {workdir}")

    # The entrypoint: a real draftrl config whose GPU demand the worker groups can meet.
    config = _entrypoint_config(spec["entrypoint"])
    distributed = config.distributed
    if not distributed.enabled:
        raise ClusterConfigError("entrypoint config does not enable the distributed pipeline")
    fit_check(distributed, shapes)

    pins = _ray_pins(yaml.safe_dump(manifest, width=10**6)) | _ray_pins(DOCKERFILE.read_text())
    if len(pins) != 1:
        raise ClusterConfigError(f"rayVersion and the Dockerfile's Ray disagree: {sorted(pins)}")


def test_rayjob_manifest():
    rayjob_check(yaml.safe_load(RAYJOB.read_text()))


def test_dockerfile_copies_every_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject).group(1)
    packages = [p.strip().strip('"').rstrip("*") for p in include.split(",") if p.strip()]
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", DOCKERFILE.read_text(), re.M))
    assert packages and set(packages) <= copied, f"{packages} vs {copied}"
    assert "configs" in copied and "pyproject.toml" in copied


def _container(manifest: dict, group: int) -> dict:
    return manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][group]["template"]["spec"]["containers"][0]


def _break(manifest: dict, how: str) -> None:
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    if how == "apiVersion":
        manifest["apiVersion"] = "ray.io/v1alpha1"
    elif how == "kind":
        manifest["kind"] = "RayCluster"
    elif how == "typo_in_spec":
        spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")
    elif how == "no_shutdown":
        spec["shutdownAfterJobFinishes"] = False
    elif how == "no_head":
        del cluster["headGroupSpec"]
    elif how == "no_containers":
        cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"] = []
    elif how == "container_typo":
        _container(manifest, 0)["imagee"] = _container(manifest, 0).pop("image")
    elif how == "bad_quantity_type":
        _container(manifest, 0)["resources"]["limits"]["cpu"] = ["8"]
    elif how == "no_gpu_limit":
        for part in ("limits", "requests"):
            _container(manifest, 0)["resources"][part].pop("nvidia.com/gpu")
    elif how == "gpu_request_ne_limit":
        _container(manifest, 0)["resources"]["requests"]["nvidia.com/gpu"] = 2
    elif how == "int_start_param":
        cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    elif how == "replicas_over_max":
        cluster["workerGroupSpecs"][0]["replicas"] = 9
    elif how == "entrypoint_module":
        spec["entrypoint"] = spec["entrypoint"].replace("pipeline.train", "pipeline.trainer")
    elif how == "entrypoint_bad_field":
        spec["entrypoint"] += " --set distributed.num_learner=2"
    elif how == "entrypoint_not_distributed":
        spec["entrypoint"] = spec["entrypoint"].replace("distributed.enabled=true", "distributed.enabled=false")
    elif how == "entrypoint_too_many_gpus":
        spec["entrypoint"] += " --set distributed.num_rollout_actors=20"
    elif how == "entrypoint_actor_bigger_than_pod":
        spec["entrypoint"] += " --set distributed.gpus_per_learner=9"  # 10 GPUs in all: fits
    elif how == "runtime_env_drift":
        spec["runtimeEnvYAML"] = spec["runtimeEnvYAML"].replace('"false"', '"true"')
    elif how == "runtime_env_not_yaml":
        spec["runtimeEnvYAML"] = "env_vars: [unclosed"
    elif how == "runtime_env_workdir":
        spec["runtimeEnvYAML"] = spec["runtimeEnvYAML"].replace("/home/ray/draftrl", "/tmp/elsewhere")
    elif how == "ray_version":
        cluster["rayVersion"] = "2.9.0"
    else:
        raise AssertionError(how)


V, C = jsonschema.ValidationError, ClusterConfigError
# (how to break the manifest, the error, a regex its message must match: the intended reason)
BROKEN_RAYJOB = [
    ("apiVersion", V, "ray.io/v1"),
    ("kind", V, "RayJob"),
    ("typo_in_spec", V, "shutdownAfterJobFinish"),
    ("no_shutdown", C, "shutdownAfterJobFinishes"),
    ("no_head", V, "headGroupSpec"),
    ("no_containers", V, "non-empty"),
    ("container_typo", V, "imagee"),
    ("bad_quantity_type", V, "not valid"),
    ("no_gpu_limit", C, "no nvidia.com/gpu"),
    ("gpu_request_ne_limit", C, "requests != limits"),
    ("int_start_param", V, "not of type 'string'"),
    ("replicas_over_max", C, "replicas"),
    ("entrypoint_module", C, "pipeline.train"),
    ("entrypoint_bad_field", ConfigError, "invalid config"),
    ("entrypoint_not_distributed", C, "does not enable"),
    ("entrypoint_too_many_gpus", C, "workers offer at most"),
    ("entrypoint_actor_bigger_than_pod", C, "no worker node can hold"),
    ("runtime_env_drift", C, "env_vars differs"),
    ("runtime_env_not_yaml", yaml.YAMLError, "flow sequence"),
    ("runtime_env_workdir", C, "working_dir"),
    ("ray_version", C, "disagree"),
]


@pytest.mark.parametrize("how,error,match", BROKEN_RAYJOB, ids=[h for h, *_ in BROKEN_RAYJOB])
def test_broken_rayjob_is_rejected(how, error, match):
    manifest = yaml.safe_load(RAYJOB.read_text())
    _break(manifest, how)
    with pytest.raises(error, match=match):
        rayjob_check(manifest)


# The layouts of cluster/README.md's table: (distributed fields, GPUs it says they need).
README_LAYOUTS = [
    (dict(placement="colocated", num_learners=1, num_rollout_actors=1,
          gpus_per_learner=0.5, gpus_per_rollout_actor=0.5), 1),
    (dict(placement="colocated", num_learners=4, num_rollout_actors=4,
          gpus_per_learner=0.5, gpus_per_rollout_actor=0.5), 4),
    (dict(placement="separate", num_learners=1, num_rollout_actors=1,
          gpus_per_learner=1, gpus_per_rollout_actor=1), 2),
    (dict(placement="separate", num_learners=2, num_rollout_actors=6,
          gpus_per_learner=1, gpus_per_rollout_actor=1), 8),
]


@pytest.mark.parametrize("fields,gpus", README_LAYOUTS)
def test_readme_layouts_need_the_stated_gpus_and_fit_the_cloud_clusters(fields, gpus):
    distributed = load_config(ROOT / "configs/sft_smollm2.yaml").distributed.model_copy(
        update={"enabled": True, **fields})
    assert gpu_demand(distributed)[0] == gpus
    for name in CLOUD_FILES:
        prepared = ray_check(load(name))
        shapes = [(node["resources"].get("CPU", 0), node["resources"].get("GPU", 0), node["max_workers"])
                  for key, node in prepared["available_node_types"].items() if key != prepared["head_node_type"]]
        fit_check(distributed, shapes)
        with pytest.raises(ClusterConfigError):  # and the check can fail: 100x the job does not fit
            fit_check(distributed.model_copy(update={"num_learners": 100 * distributed.num_learners,
                                                     "num_rollout_actors": 100 * distributed.num_rollout_actors}),
                      shapes)
