"""cluster/ manifests, checked without Kubernetes or Docker: field names, types, and that they agree with
the code and configs they name.

  * RayJob / RayService: every field we use is checked against a hand-written schema of the KubeRay
    ray.io/v1 CRDs (below; closed objects, so a misspelt field fails), plus what the fields mean for
    us: the entrypoint's config loads with its overrides, the run store is shared storage, the GPU
    worker group has enough GPUs for the config, secrets come from secretKeyRef only.
  * serveConfigV2: Ray's own schema (`ray.serve.schema.ServeDeploySchema`), then the real
    `serve.app:build_app` is built with its args on a temporary run dir.
  * runtime envs: `ray.runtime_env.RuntimeEnv` (Ray's validation).
  * cluster.yaml: Ray's own launcher schema (`prepare_config` + `validate_config`, as `ray up` does
    before touching a cloud).
  * Dependencies: the Dockerfile and the Makefile install requirements.lock (no hand-typed pins); the
    lock is closed over pyproject.toml's requirements and inside their ranges; this venv equals it.

No validator package was adopted: kubeconform/kubeval are Go binaries, and the Python ones
(kubernetes-validate) know core Kubernetes kinds, not the KubeRay CRDs.

Example:
    $ .venv/bin/python -m pytest tests/cluster/test_manifests.py -q
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
YAMLS = ["rayjob.yaml", "rayservice.yaml", "cluster.yaml", "runtime_env.yaml"]

# ----------------------------------------------------------------------------- KubeRay v1 schema
# Field names (json tags) and types of the KubeRay ray.io/v1 CRDs, as far as our manifests use them.
# Sources: ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go (RayJobSpec, SubmitterConfig),
# rayservice_types.go (RayServiceSpec: serveConfigV2, rayClusterConfig), raycluster_types.go
# (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec: rayStartParams is map[string]string), and the KubeRay
# API reference https://ray-project.github.io/kuberay/reference/api/ (AuthOptions.mode: disabled|token,
# KubeRay >= 1.5.1). Pod template fields: Kubernetes core/v1 (PodSpec, Container, EnvVar, Toleration).
# A dict is a closed object (unknown keys fail); [x] a list of x; a str key ending in "!" is required.
ANY, STRMAP, QUANTITY = "any", "map[string]string", "quantity"
QUANTITIES = {"cpu": QUANTITY, "memory": QUANTITY, "nvidia.com/gpu": QUANTITY, "ephemeral-storage": QUANTITY}
CONTAINER = {
    "name!": str, "image!": str, "imagePullPolicy": ("Always", "IfNotPresent", "Never"),
    "command": [str], "args": [str], "lifecycle": ANY, "securityContext": ANY,
    "resources": {"requests": QUANTITIES, "limits": QUANTITIES},
    "env": [{"name!": str, "value": str,
             "valueFrom": {"secretKeyRef": {"name!": str, "key!": str, "optional": bool}}}],
    "ports": [{"containerPort!": int, "name": str, "protocol": str}],
    "volumeMounts": [{"name!": str, "mountPath!": str, "readOnly": bool}],
}
POD_TEMPLATE = {"metadata": ANY, "spec!": {
    "containers!": [CONTAINER], "serviceAccountName": str, "nodeSelector": STRMAP, "affinity": ANY,
    "tolerations": [{"key": str, "operator": ("Exists", "Equal"), "value": str,
                     "effect": ("NoSchedule", "PreferNoSchedule", "NoExecute")}],
    "volumes": [{"name!": str, "emptyDir": {"medium": str, "sizeLimit": QUANTITY},
                 "persistentVolumeClaim": ANY, "secret": ANY}],
}}
RAY_CLUSTER_SPEC = {
    "rayVersion": str, "enableInTreeAutoscaling": bool, "autoscalerOptions": ANY, "suspend": bool,
    "headServiceAnnotations": STRMAP, "gcsFaultToleranceOptions": ANY, "managedBy": str,
    "authOptions": {"mode": ("disabled", "token"), "secretName": str},
    "headGroupSpec!": {"rayStartParams": STRMAP, "template!": POD_TEMPLATE, "serviceType": str,
                       "headService": ANY, "enableIngress": bool},
    "workerGroupSpecs": [{"groupName!": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                          "idleTimeoutSeconds": int, "rayStartParams": STRMAP, "template!": POD_TEMPLATE,
                          "numOfHosts": int, "scaleStrategy": ANY, "suspend": bool}],
}
METADATA = {"name!": str, "namespace": str, "labels": STRMAP, "annotations": STRMAP}
RAYJOB = {"apiVersion!": ("ray.io/v1",), "kind!": ("RayJob",), "metadata!": METADATA, "spec!": {
    "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "metadata": STRMAP, "clusterSelector": STRMAP,
    "submissionMode": ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int, "backoffLimit": int,
    "activeDeadlineSeconds": int, "suspend": bool, "managedBy": str,
    "entrypointNumCpus": float, "entrypointNumGpus": float, "entrypointResources": str,
    "submitterConfig": {"backoffLimit": int}, "submitterPodTemplate": POD_TEMPLATE,
    "rayClusterSpec": RAY_CLUSTER_SPEC}}
RAYSERVICE = {"apiVersion!": ("ray.io/v1",), "kind!": ("RayService",), "metadata!": METADATA, "spec!": {
    "serveConfigV2!": str, "rayClusterConfig!": RAY_CLUSTER_SPEC, "serveService": ANY,
    "upgradeStrategy": ANY, "excludeHeadPodFromServeSvc": bool}}


def schema_errors(value, spec, path="") -> list[str]:
    """Every place where `value` does not fit `spec` (the mini-schema language above)."""
    if spec == ANY:
        return []
    if spec == STRMAP:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return [] if ok else [f"{path}: must map to strings (quote numbers), got {value!r}"]
    if spec == QUANTITY:
        ok = isinstance(value, (int, str)) and re.fullmatch(r"\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
        return [] if ok else [f"{path}: not a Kubernetes quantity: {value!r}"]
    if isinstance(spec, tuple):
        return [] if value in spec else [f"{path}: {value!r} not one of {spec}"]
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, spec[0], f"{path}[{i}]")]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        fields = {k.rstrip("!"): s for k, s in spec.items()}
        errors = [f"{path}.{k}: unknown field" for k in value if k not in fields]
        errors += [f"{path}.{k[:-1]}: required" for k in spec if k.endswith("!") and k[:-1] not in value]
        return errors + [e for k, v in value.items() if k in fields for e in schema_errors(v, fields[k], f"{path}.{k}")]
    if spec is float:
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{path}: not a number"]
    return [] if isinstance(value, spec) and not (spec is int and isinstance(value, bool)) else \
        [f"{path}: expected {spec.__name__}, got {value!r}"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpus_per_pod(group: dict) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_parses_to_a_mapping(name):
    assert isinstance(load(name), dict)


def test_mini_schema_catches_misspelt_and_mistyped_fields():
    bad = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
           "spec": {"entrypont": "x", "rayClusterSpec": {"headGroupSpec": {
               "rayStartParams": {"num-cpus": 0}, "template": {"spec": {"containers": []}}}}}}
    errors = "\n".join(schema_errors(bad, RAYJOB))
    assert "spec.entrypont: unknown field" in errors and "rayStartParams: must map to strings" in errors


@pytest.mark.parametrize("name, schema, key", [("rayjob.yaml", RAYJOB, "rayClusterSpec"),
                                               ("rayservice.yaml", RAYSERVICE, "rayClusterConfig")])
def test_kuberay_manifests_fit_the_crd_fields(name, schema, key):
    doc = load(name)
    assert schema_errors(doc, schema) == []
    spec = doc["spec"][key]
    assert spec["rayVersion"] == importlib.metadata.version("ray")
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "no work on the head"
    images = {c["image"] for c in containers(spec)}
    assert images == {load("cluster.yaml")["docker"]["image"]}, "one image everywhere"
    assert all(gpus_per_pod(g) >= 1 for g in spec["workerGroupSpecs"]), "GPU worker group"
    secrets = [e for c in containers(spec) for e in c.get("env", []) if e["name"] in ("WANDB_API_KEY", "HF_TOKEN")]
    assert secrets and all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in secrets), "no literal secrets"


def test_rayjob_runs_the_1b_config_on_shared_storage_and_has_the_gpus_it_needs():
    from pipelines.config import load_config

    spec = load("rayjob.yaml")["spec"]
    cmd = shlex.split(spec["entrypoint"])
    assert cmd[:2] == ["unigap", "run"]
    cfg = load_config(REPO / cmd[2], cmd[3:])  # the entrypoint's overrides must be valid too
    assert cfg.model.path == "deepseek-community/Janus-Pro-1B"
    assert re.match(r"(s3|gs)://", cfg.run.root), "retries resume only from shared storage"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    gpus = sum(g["replicas"] * gpus_per_pod(g) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    need = max(cfg.generate.num_actors * cfg.generate.num_gpus_per_actor,
               cfg.judge.num_actors * cfg.judge.num_gpus_per_actor, cfg.train.num_workers * cfg.train.use_gpu)
    assert gpus >= need, f"{gpus} GPUs for a config that needs {need}"
    for c in containers(spec["rayClusterSpec"]):
        keys = {e["name"]: e for e in c.get("env", [])}
        assert keys["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}


def test_runtime_envs_are_valid_ray_runtime_envs_and_agree():
    from ray.runtime_env import RuntimeEnv

    file_env = load("runtime_env.yaml")
    RuntimeEnv(**{**file_env, "working_dir": str(REPO)})  # "." as `ray job submit` resolves it
    job_env = yaml.safe_load(load("rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert job_env["working_dir"] == "/app"  # the image's checkout (cluster/Dockerfile WORKDIR)
    RuntimeEnv(**{**job_env, "working_dir": str(REPO)})
    assert set(job_env["env_vars"]) == set(file_env["env_vars"])
    assert {".venv", "runs", "scratch", ".git"} <= set(file_env["excludes"])
    assert "WANDB_API_KEY" not in file_env["env_vars"] and "WANDB_API_KEY" not in job_env["env_vars"]


def test_serve_config_fits_rays_schema_and_builds_the_real_app(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from pipelines.config import load_config
    from pipelines.store import RunStore

    spec = load("rayservice.yaml")["spec"]
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.import_path == "serve.app:build_app"
    if not (REPO / "serve" / "app.py").exists():
        pytest.skip("serve/app.py is not written yet")
    module, attr = app.import_path.split(":")
    build_app = getattr(importlib.import_module(module), attr)
    RunStore(str(tmp_path), "run").init(load_config(REPO / "configs" / "tiny.yaml"))
    args = {**app.args, "run_dir": str(tmp_path / "run"), "model": "tiny"}  # only the paths swapped
    built = build_app(args)
    names = {d.name for d in app.deployments}
    assert names <= {built._bound_deployment.name}, f"serveConfigV2 overrides unknown deployments {names}"
    worker = spec["rayClusterConfig"]["workerGroupSpecs"][0]
    for d in app.deployments:
        assert d.ray_actor_options.num_gpus == app.args["num_gpus"] <= gpus_per_pod(worker)
        replicas_per_pod = gpus_per_pod(worker) // d.ray_actor_options.num_gpus
        assert worker["maxReplicas"] * replicas_per_pod >= d.autoscaling_config["max_replicas"], \
            "the autoscaler can host every replica"


def test_every_rayservice_pod_installs_the_proxy_guard():
    """Proxies run on every node (proxy_location EveryNode) and read the guard's callback from their
    environment when they start: head and every worker group must set it, to an importable callback."""
    from serve.guard import CALLBACK, CALLBACK_ENV

    spec = load("rayservice.yaml")["spec"]
    cluster = spec["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get(CALLBACK_ENV) == CALLBACK, container["name"]
    module, attr = CALLBACK.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_cluster_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "docker", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in raw, key
    validate_config(prepare_config(raw))  # what `ray up` checks before calling the cloud
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "a GPU node type"
    assert any("pip install" in c for c in raw["setup_commands"])


def lock_pins() -> dict[str, str]:
    """requirements.lock as {canonical name: version}; every line is `name==version`."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_every_install_path_installs_from_the_lock():
    docker = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^COPY .*requirements\.lock (\S+)\n(?:#.*\n)*RUN pip install -r \1$", docker, re.M), \
        "cluster/Dockerfile must pip install -r the copied requirements.lock"
    # No second, hand-typed list: the only other pins are torch (the CUDA build of the lock's version)
    # and vllm (its own venv, outside the lock).
    pinned = dict(re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"]*)", docker))
    assert set(pinned) <= {"torch"}, f"cluster/Dockerfile pins {sorted(pinned)} by hand"
    assert pinned.get("torch") == lock_pins()["torch"]
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK\s*:?=\s*requirements\.lock$", make, re.M) and "pip install -q -r $(LOCK)" in make
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_lock_satisfies_pyproject_and_is_closed():
    """Every requirement reachable from pyproject.toml (with its extras) is pinned, inside its range."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project allows 3.10)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    todo = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        assert name in pins, f"{name} ({req}) is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock has {name}=={pins[name]}, outside {req}: run `make lock`"
        for dep in importlib.metadata.requires(name) or []:
            sub = Requirement(dep)
            envs = [{"extra": e} for e in (req.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(e) for e in envs):
                todo.append(sub)
    assert len(seen) > 20


def test_this_venv_is_the_lock():
    """The tested environment has exactly the locked versions (so a fresh machine tests the same stack)."""
    for name, version in lock_pins().items():
        installed = Version(importlib.metadata.version(name)).public  # 2.13.0+cpu -> 2.13.0
        assert installed == Version(version).public, f"{name}: venv {installed} != requirements.lock {version}"


@pytest.mark.parametrize("name", ["janus_pro_1b.yaml", "janus_pro_7b.yaml", "tiny.yaml"])
def test_configs_the_manifests_name_exist_and_load(name):
    from pipelines.config import load_config

    used = "\n".join((CLUSTER / f).read_text() for f in ("rayjob.yaml", "cluster.yaml", "README.md"))
    used += (REPO / "tests" / "cluster" / "test_multinode.py").read_text()
    assert f"configs/{name}" in used
    load_config(REPO / "configs" / name)


def test_the_vllm_judge_server_matches_the_config_that_calls_it():
    from urllib.parse import urlparse

    from pipelines.audit import make_external_judge
    from pipelines.config import load_config

    docs = list(yaml.safe_load_all((CLUSTER / "judge-vllm.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert container["command"][:2] == ["/opt/vllm/bin/vllm", "serve"]  # the image's vLLM venv (WITH_VLLM=1)
    assert container["image"].endswith("-vllm") and int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    cfg = load_config(REPO / "configs" / "janus_pro_7b_judge_server.yaml")
    url = urlparse(cfg.audit.http_url)
    assert cfg.audit.backend == "openai_http" and url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == int(args[args.index("--port") + 1])
    assert cfg.audit.http_model == args[args.index("--served-model-name") + 1]
    assert container["command"][2] == load_config(REPO / "configs" / "janus_pro_7b.yaml").audit.vlm_path
    assert make_external_judge(cfg.audit).url == cfg.audit.http_url
    vllm = load_config(REPO / "configs" / "janus_pro_7b_vllm.yaml")
    assert make_external_judge(vllm.audit).processor_config().model_source == container["command"][2]
