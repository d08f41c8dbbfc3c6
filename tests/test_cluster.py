"""cluster/: every YAML parses; launcher YAMLs validate against the schema inside the installed
ray package (and Ray's own checks); KubeRay manifests carry what KubeRay requires; every
repository path they name exists; versions are pinned; dashboards stay off the network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
ALL_YAML = sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])
RAY_VERSION = ray.__version__


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind() -> dict[str, list[tuple[Path, dict]]]:
    kinds: dict[str, list] = {"launcher": [], "RayCluster": [], "RayJob": [], "runtime_env": []}
    for path in ALL_YAML:
        for doc in _docs(path):
            if "provider" in doc and "available_node_types" in doc:
                kinds["launcher"].append((path, doc))
            elif doc.get("kind") in ("RayCluster", "RayJob"):
                kinds[doc["kind"]].append((path, doc))
            elif path.name == "runtime_env.yaml":
                kinds["runtime_env"].append((path, doc))
    return kinds


KINDS = _by_kind()
LAUNCHERS = KINDS["launcher"]
KUBERAY = KINDS["RayCluster"] + KINDS["RayJob"]


def _id(item) -> str:
    return item[0].relative_to(REPO).as_posix()


def test_the_expected_definitions_exist():
    assert {p.name for p, _ in LAUNCHERS} == {"aws.yaml", "gcp.yaml"}
    assert {d["spec"]["rayClusterSpec"] is not None for _, d in KINDS["RayJob"]} == {True}
    assert len(KINDS["RayCluster"]) == 1 and len(KINDS["RayJob"]) == 1 and len(KINDS["runtime_env"]) == 1
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------- Ray cluster launcher


def _ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"{path}: the installed ray has no launcher schema"
    return json.loads(path.read_text())


@pytest.mark.parametrize("item", LAUNCHERS, ids=_id)
def test_launcher_validates_against_ray_schema(item):
    import jsonschema

    path, doc = item
    jsonschema.validate(doc, _ray_schema())
    # Ray's own checks as `ray up` runs them (defaults merged, node types consistent).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(doc))


def test_schema_check_can_fail():
    import jsonschema

    path, doc = LAUNCHERS[0]
    bad = {**doc, "docker": {**doc["docker"], "imagee": "typo"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


@pytest.mark.parametrize("item", LAUNCHERS, ids=_id)
def test_launcher_shape(item):
    path, doc = item
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != doc["head_node_type"]}
    assert "GPU" not in head["resources"], f"{path}: the head should be a CPU node"
    assert any(_is_gpu_node(v, doc["provider"]["type"]) and v["max_workers"] > 0 for v in workers.values()), \
        f"{path}: no GPU worker group with max_workers > 0"
    assert any(_is_spot(v) for v in workers.values()), f"{path}: no optional spot/preemptible group"
    images = [doc["docker"][k] for k in ("image", "head_image", "worker_image") if k in doc["docker"]]
    for image in images:
        assert re.search(rf":{re.escape(RAY_VERSION)}-py3\d+", image), f"{path}: image {image} not pinned to ray {RAY_VERSION}"
    head_cmds = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds, f"{path}: dashboard must bind to 127.0.0.1"
    assert "0.0.0.0" not in json.dumps(doc), f"{path}: something binds 0.0.0.0"


def _is_gpu_node(node: dict, provider: str) -> bool:
    cfg = node["node_config"]
    if node.get("resources", {}).get("GPU"):
        return True
    if provider == "aws":
        return cfg.get("InstanceType", "").split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e"}
    return bool(cfg.get("guestAccelerators")) or cfg.get("machineType", "").startswith(("a2-", "a3-", "g2-"))


def _is_spot(node: dict) -> bool:
    text = json.dumps(node["node_config"])
    return '"spot"' in text or "preemptible" in text or "SPOT" in text


# --------------------------------------------------------------------------- KubeRay


def _pod_templates(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, pod spec) of the head and every worker group."""
    out = [("head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"])]
    for g in spec["workerGroupSpecs"]:
        out.append((g["groupName"], g, g["template"]["spec"]))
    return out


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("item", KUBERAY, ids=_id)
def test_kuberay_required_fields(item):
    path, doc = item
    assert doc["apiVersion"] == "ray.io/v1", path
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "metadata.name: not a DNS label"
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION, f"{path}: rayVersion {spec['rayVersion']} != installed ray {RAY_VERSION}"
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    assert spec["workerGroupSpecs"], f"{path}: no worker group"
    for name, group, pod in _pod_templates(spec):
        params = group["rayStartParams"]
        assert isinstance(params, dict), f"{name}: rayStartParams must be a map"
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{path} {name}: rayStartParams values must be strings (KubeRay map[string]string): {bad}"
        assert pod["containers"], f"{name}: no container"
        for c in pod["containers"]:
            assert c["name"] and c["image"], f"{name}: container needs name and image"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{name}: image {c['image']} not pinned"
            for e in c.get("env", []):
                assert "name" in e and ("value" in e or "valueFrom" in e), e
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and "rayStartParams" in g
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].strip()
        assert doc["spec"].get("shutdownAfterJobFinishes") is True
        yaml.safe_load(doc["spec"].get("runtimeEnvYAML", "{}"))


@pytest.mark.parametrize("item", KUBERAY, ids=_id)
def test_kuberay_gpu_workers_and_secret_credentials(item):
    path, doc = item
    spec = _cluster_spec(doc)
    gpu_groups = 0
    for name, _group, pod in _pod_templates(spec):
        for c in pod["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                gpu_groups += 1
                assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), \
                    f"{path} {name}: GPU pods need a toleration for the nvidia.com/gpu taint"
                assert limits["nvidia.com/gpu"] == c["resources"].get("requests", {}).get("nvidia.com/gpu", limits["nvidia.com/gpu"])
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})]
            assert refs, f"{path} {name}: storage credentials must come from a Secret"
            for e in c.get("env", []):
                from ckf_dist.launch.redact import is_secret_name

                assert not (is_secret_name(e["name"]) and "value" in e), f"{path}: literal credential {e['name']}"
    assert gpu_groups >= 1, f"{path}: no GPU worker group"


@pytest.mark.parametrize("item", KUBERAY, ids=_id)
def test_kuberay_dashboard_not_exposed(item):
    path, doc = item
    spec = _cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path}: head Service must stay ClusterIP"
    host = head["rayStartParams"].get("dashboard-host")
    if doc["kind"] == "RayCluster":
        assert host == "127.0.0.1", f"{path}: use kubectl port-forward, keep the dashboard on loopback"
    else:  # KubeRay's submitter pod must reach the Jobs API over the pod network
        assert host in ("127.0.0.1", "0.0.0.0")


# --------------------------------------------------------------------------- paths, runtime_env


_PATH_RE = re.compile(r"(?:/home/ray/ckf/)?\b((?:configs|cluster|launch|ckf_dist)/[\w./-]*\w)")


def _referenced_paths(text: str) -> set[str]:
    return {m.group(1) for m in _PATH_RE.finditer(text)}


REFERENCING = [*ALL_YAML, CLUSTER / "Dockerfile", CLUSTER / "README.md", REPO / "launch" / "README.md",
               *sorted((REPO / "launch").rglob("*.sh")), *sorted((REPO / "launch").rglob("*.sbatch"))]


@pytest.mark.parametrize("path", REFERENCING, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_referenced_repo_path_exists(path):
    missing = sorted(p for p in _referenced_paths(path.read_text())
                     if not (REPO / p).exists() and "*" not in p and not p.endswith(".local.yaml"))
    assert not missing, f"{path.relative_to(REPO)} names paths that do not exist: {missing}"


def test_path_extraction_can_fail():
    assert _referenced_paths("python -m x train /home/ray/ckf/configs/nope.yaml") == {"configs/nope.yaml"}
    assert not (REPO / "configs/nope.yaml").exists()


@pytest.mark.parametrize("item", LAUNCHERS, ids=_id)
def test_launcher_file_mounts_exist(item):
    path, doc = item
    for remote, local in doc.get("file_mounts", {}).items():
        assert (REPO / local).exists(), f"{path}: file_mounts {remote}: {local} does not exist (run from the repo root)"
    for cmd in doc.get("setup_commands", []):
        for ref in re.findall(r"/home/ray/ckf/([\w./-]+)", cmd):
            assert (REPO / ref).exists(), f"{path}: setup command names {ref}, which does not exist"


def test_dockerfile_copies_existing_paths():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+", text, re.M)
    for line in re.findall(r"^COPY (.*)$", text, re.M):
        srcs = [a for a in line.split() if not a.startswith("--")][:-1]
        for src in srcs:
            assert (REPO / src).exists(), f"cluster/Dockerfile copies {src}, which does not exist"


def test_requirements_are_pinned():
    for line in (CLUSTER / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.+]+", line), f"not pinned: {line}"


def test_runtime_env_file_is_valid_and_holds_no_credentials():
    from ray.runtime_env import RuntimeEnv

    from ckf_dist.launch.redact import find_secrets

    (path, doc), = KINDS["runtime_env"]
    assert not find_secrets(doc)
    assert "working_dir" not in doc, "ckf submit chooses the working dir"
    RuntimeEnv(**doc)
    for v in doc.get("env_vars", {}).values():
        assert isinstance(v, str), "runtime_env env_vars values must be strings"


def test_no_credentials_anywhere_in_cluster_files():
    from ckf_dist.launch.redact import find_secrets

    for path in ALL_YAML:
        for doc in _docs(path):
            assert not find_secrets(doc), f"{path}: {find_secrets(doc)}"
