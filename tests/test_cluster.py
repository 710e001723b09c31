"""cluster/: `ray up` configs, KubeRay manifests, Dockerfile, runtime env and submit script.

Everything here is offline: schemas come from the installed `ray` package, manifests are
checked for the fields the KubeRay operator needs, and the one end-to-end test submits a job
through cluster/submit.sh to a real local Ray head (marked slow).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import LocalRayHead

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SUBMIT = CLUSTER / "submit.sh"
RAY_UP = ["aws.yaml", "gcp.yaml"]

GPU_FAMILIES = {"aws": ("p4d.", "p4de.", "p5.", "p5e.", "p5en."), "gcp": ("a2-", "a3-")}


# ---------------------------------------------------------------- helpers
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """{normalised name: version} for every `name[extras]==version` dependency in pyproject."""
    pins = {}
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+).*", dep)
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _ray_image_tags(text: str) -> list[tuple[str, str]]:
    """(ray version, python tag) of every rayproject/ray image named in text."""
    return re.findall(r"rayproject/ray(?:-ml)?:([0-9][0-9.]*)-(py3\d+)", text)


def _python_allowed(py_tag: str) -> bool:
    major, minor = int(py_tag[2]), int(py_tag[3:])
    spec = _pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m, f"unexpected requires-python {spec!r}; update this test"
    return (major, minor) >= (int(m.group(1)), int(m.group(2)))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected exactly one {kind}, found {len(found)}"
    return found[0]


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    cmds = [c for k in keys for c in cfg.get(k) or []]
    for nt in cfg["available_node_types"].values():
        for k in ("initialization_commands", "worker_setup_commands"):
            cmds += nt.get(k) or []
    return cmds


# ---------------------------------------------------------------- 1. ray up
@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"cluster-config schema not found at {path}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_config_matches_ray_schema(name, ray_schema):
    import jsonschema

    cfg = _load(CLUSTER / name)
    jsonschema.validate(cfg, ray_schema)


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_config_survives_rays_own_preparation(name):
    """What `ray up` does before launching: merge provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_load(CLUSTER / name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_node_types(name):
    cfg = _load(CLUSTER / name)
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "head must be a CPU node"

    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    data = [v for v in workers.values() if v["resources"].get("data_cpu", 0) > 0]
    assert len(gpu) == 1, "expected exactly one GPU worker node type"
    assert gpu[0]["resources"]["GPU"] == 8
    itype = gpu[0]["node_config"].get("InstanceType") or gpu[0]["node_config"].get("machineType")
    assert itype.startswith(GPU_FAMILIES[provider]), f"{itype} is not an 8x A100/H100 type"
    assert gpu[0]["resources"].get("data_cpu", 0) == 0, "GPU nodes must not offer data_cpu"

    assert len(data) == 1, "expected one CPU-only data-loading node type with resource data_cpu"
    assert data[0]["resources"].get("GPU", 0) == 0
    assert data[0]["resources"]["data_cpu"] <= data[0]["resources"]["CPU"]

    for nt_name, nt in workers.items():
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= cfg["max_workers"], nt_name


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_installs_what_pyproject_pins(name):
    cfg = _load(CLUSTER / name)
    text = (CLUSTER / name).read_text()
    pins = _pins()
    cmds = _all_commands(cfg)

    # Either the project is installed from its synced copy, so pip resolves pyproject's pins...
    mounts = {os.path.normpath(os.path.expanduser(r)): local for r, local in (cfg.get("file_mounts") or {}).items()}
    editable = [c for c in cmds if re.search(r"pip install\b.*\s-e\s", c + " ")]
    for c in editable:
        m = re.search(r"cd\s+(\S+)\s*&&", c)
        assert m, f"editable install without `cd <project dir> &&`: {c!r}"
        target = os.path.normpath(os.path.expanduser(m.group(1)))
        assert mounts.get(target) in (".", "./", str(ROOT)), (
            f"{m.group(1)} is not a file_mounts target that syncs the repository root")
    # ...or the pinned packages are named explicitly; any pin that appears must agree.
    named = {}
    for c in cmds:
        for pkg, ver in re.findall(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][^\s\"']*)", c):
            named[_norm(pkg)] = ver
    for pkg, ver in named.items():
        if pkg in pins:
            assert ver == pins[pkg], f"{name} installs {pkg}=={ver}, pyproject pins {pins[pkg]}"
    assert editable or {"torch", "ray"} <= named.keys(), f"{name} does not install the project"

    # Ray images must be the pinned Ray version, with a Python the project supports.
    tags = _ray_image_tags(text)
    assert tags, "expected rayproject/ray images in docker:"
    for ver, py in tags:
        assert ver == pins["ray"], f"image ray {ver} != pyproject ray=={pins['ray']}"
        assert _python_allowed(py), f"{py} not allowed by requires-python"


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_keeps_heavy_paths_out_of_the_sync(name):
    excluded = set(_load(CLUSTER / name).get("rsync_exclude") or [])
    assert {".venv", "runs", "shards"} <= excluded


@pytest.mark.parametrize("name,scheme", [("aws.yaml", "s3://"), ("gcp.yaml", "gs://")])
def test_ray_up_says_where_shards_and_checkpoints_live(name, scheme):
    text = (CLUSTER / name).read_text()
    assert re.search(rf"shards.*{re.escape(scheme)}", text)
    assert re.search(rf"{re.escape(scheme)}\S*\s.*checkpoint|storage_path={re.escape(scheme)}", text)


# ---------------------------------------------------------------- 2. KubeRay
def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    pins = _pins()
    version = _pyproject()["project"]["version"]
    assert str(spec.get("rayVersion")) == pins["ray"], f"{where}: rayVersion != pyproject ray pin"

    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), (
        f"{where}: rayStartParams values must be strings")
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0].get("image") and containers[0].get("name")
    ports = {p.get("name"): p["containerPort"] for p in containers[0].get("ports", [])}
    assert ports.get("gcs-server") == 6379 and ports.get("dashboard") == 8265

    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    gpu_groups = []
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert isinstance(g.get("rayStartParams"), dict), f"{g['groupName']}: rayStartParams"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        cs = g["template"]["spec"]["containers"]
        assert cs and cs[0].get("image") and cs[0].get("name"), g["groupName"]
        limits = cs[0].get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(g)
            assert int(limits["nvidia.com/gpu"]) == 8
            req = cs[0]["resources"].get("requests", {}).get("nvidia.com/gpu")
            assert req in (None, limits["nvidia.com/gpu"]), "GPU request must equal limit"
        if "resources" in g["rayStartParams"]:
            custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
            assert all(isinstance(v, (int, float)) for v in custom.values())
    assert len(gpu_groups) == 1, f"{where}: expected one GPU worker group"
    assert any("data_cpu" in g["rayStartParams"].get("resources", "") for g in groups), (
        f"{where}: expected a CPU worker group offering the data_cpu resource")

    # All images are the project image at the project's version (built from cluster/Dockerfile).
    images = {c["image"] for grp in [head, *groups] for c in grp["template"]["spec"]["containers"]}
    for image in images:
        assert image.rsplit(":", 1)[-1] == version, f"{image} tag != project version {version}"

    # Every volume mount refers to a declared volume.
    for grp in [head, *groups]:
        pod = grp["template"]["spec"]
        vols = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for vm in c.get("volumeMounts", []):
                assert vm["name"] in vols, f"{where}: volumeMount {vm['name']} has no volume"


def test_raycluster_manifest():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    rc = _one(path, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"], "RayCluster")
    _check_claims_declared(path)


def _check_claims_declared(path: Path) -> None:
    docs = _docs(path)
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    text = yaml.safe_dump(docs)
    for claim in re.findall(r"claimName: (\S+)", text):
        assert claim in claims, f"{path.name}: PVC {claim} is used but not declared"


def test_rayjob_manifest():
    path = CLUSTER / "kuberay" / "rayjob.yaml"
    job = _one(path, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["raytrain", "train"], spec["entrypoint"]
    assert argv[argv.index("--config") + 1] == "configs/r50_paper.yaml"
    assert any(a.startswith("train.storage_path=") for a in argv), (
        "checkpoints must go to a volume or bucket via train.storage_path=")
    assert spec["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in spec
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    _check_claims_declared(path)

    # The storage path is on a mounted volume of every pod, or a bucket.
    storage = next(a for a in argv if a.startswith("train.storage_path=")).split("=", 1)[1]
    if not re.match(r"(s3|gs)://", storage):
        rcs = spec["rayClusterSpec"]
        for grp in [rcs["headGroupSpec"], *[g for g in rcs["workerGroupSpecs"]
                                           if "nvidia.com/gpu" in str(g)]]:
            mounts = [vm["mountPath"] for c in grp["template"]["spec"]["containers"]
                      for vm in c.get("volumeMounts", [])]
            assert any(storage.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{storage} is not on a volume mounted in every training pod")

    # The runtime env KubeRay passes to `ray job submit` is a valid Ray runtime env.
    from ray.runtime_env import RuntimeEnv

    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(renv) <= RuntimeEnv.known_fields
    # working_dir is a path inside the image (the submitter pod runs the head's image): it must
    # be the Dockerfile's WORKDIR. Ray checks that local paths exist, so validate the rest here.
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)[-1]
    assert renv.pop("working_dir", workdir) == workdir
    RuntimeEnv(**renv)


def test_rayjob_entrypoint_names_an_existing_config():
    spec = _one(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"RayJob entrypoint names {config}, which does not exist"
    yaml.safe_load((ROOT / config).read_text())


def test_dockerfile():
    text = (CLUSTER / "Dockerfile").read_text()
    pins = _pins()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    froms = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), f)
             for f in re.findall(r"^FROM\s+(\S+)", text, re.M)]
    assert froms, "no FROM line"
    tags = _ray_image_tags(" ".join(froms))
    assert tags and all(v == pins["ray"] for v, _ in tags), f"base {froms} != ray=={pins['ray']}"
    assert all(_python_allowed(py) for _, py in tags)
    assert "-gpu" in froms[-1] or "-cu" in froms[-1], "base image should be a GPU (CUDA) image"
    assert re.search(r"^COPY\b.*\s\.\s+\.\s*$", text, re.M), "project is not copied into the image"
    assert re.search(r"pip install\b.*\s-e\s", text), "project is not pip-installed"
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", "shards"} <= set(ignore)


# ---------------------------------------------------------------- 3. runtime env + submit
def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    renv = _load(CLUSTER / "runtime_env.yaml")
    unknown = set(renv) - RuntimeEnv.known_fields
    assert not unknown, f"not RuntimeEnv fields: {unknown}"
    assert "working_dir" not in renv, "working_dir comes from `--working-dir .`"
    env = RuntimeEnv(**renv)
    assert {".venv", "runs", "shards"} <= set(env["excludes"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in renv["env_vars"].items())
    assert "RAYTRAIN_HOME" in renv["env_vars"]


def _run_submit(*args, env=None, **kw):
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYTRAIN_DRY_RUN")}
    base.update(env or {})
    return subprocess.run(["bash", str(SUBMIT), *args], env=base, capture_output=True,
                          text=True, timeout=60, **kw)


def test_submit_script_is_bash_clean():
    assert os.access(SUBMIT, os.X_OK), "cluster/submit.sh must be executable"
    r = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(SUBMIT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_submit_help():
    r = _run_submit("--help")
    assert r.returncode == 0
    for needle in ("train", "tune", "eval", "RAY_ADDRESS", "ray job submit", "--working-dir",
                   "cluster/runtime_env.yaml"):
        assert needle in r.stdout, needle


def test_submit_rejects_bad_usage():
    r = _run_submit()
    assert r.returncode == 2 and "Usage" in r.stderr
    r = _run_submit("demo", env={"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert r.returncode == 2 and "unknown command 'demo'" in r.stderr


def test_submit_shard_runs_the_conversion_on_the_cluster():
    r = _run_submit("shard", "coco", "--npz", "/data/c.npz", "--img-root", "/data/coco", "--out",
                    "s3://bucket/shards/coco", "--ray",
                    env={"RAY_ADDRESS": "http://10.0.0.1:8265", "RAYTRAIN_DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.splitlines()[0])
    assert argv[argv.index("--") + 1:] == ["raytrain", "shard", "coco", "--npz", "/data/c.npz", "--img-root",
                                           "/data/coco", "--out", "s3://bucket/shards/coco", "--ray"]
    assert "the shards and manifest.json under s3://bucket/shards/coco" in r.stdout


def test_submit_without_ray_address_says_so():
    r = _run_submit("train", "--config", "configs/r50_paper.yaml")
    assert r.returncode != 0
    assert "RAY_ADDRESS is not set" in r.stderr


def test_submit_builds_the_documented_command(tmp_path):
    r = _run_submit("tune", "--config", "configs/r50_paper.yaml", "--name", "a b",
                    "train.storage_path=s3://bucket/runs",
                    env={"RAY_ADDRESS": "http://10.0.0.1:8265", "RAYTRAIN_DRY_RUN": "1",
                         "RAYTRAIN_SUBMISSION_ID": "job-1"},
                    cwd=tmp_path)  # run from elsewhere: the script must cd to the repo root
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.splitlines()[0])
    assert argv == ["ray", "job", "submit", "--address", "http://10.0.0.1:8265",
                    "--submission-id", "job-1", "--no-wait", "--working-dir", ".",
                    "--runtime-env", "cluster/runtime_env.yaml", "--",
                    "raytrain", "tune", "--config", "configs/r50_paper.yaml", "--name", "a b",
                    "train.storage_path=s3://bucket/runs"]
    assert "ray job logs -f job-1" in r.stdout
    assert "s3://bucket/runs" in r.stdout.split("Results:", 1)[1]


def test_cluster_readme_names_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    paths = set(re.findall(r"\b((?:cluster|configs|tune)/[\w./-]+\.(?:ya?ml|sh))\b", text))
    assert paths, "README names no files"
    for p in paths:
        assert (ROOT / p).is_file(), f"cluster/README.md names {p}, which does not exist"
    for cmd in ("ray up", "ray job submit", "kubectl apply", "docker build"):
        assert cmd in text, cmd


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_submit_runs_a_job_on_a_local_head(tmp_path):
    """cluster/submit.sh against a real local Ray head; `raytrain` is a stand-in script on the
    head's PATH, so this checks the submission path (working dir upload, excludes, env vars,
    argument quoting), not the training code."""
    from ray.job_submission import JobStatus

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "raytrain"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'printf "ARG<%s>\\n" "$@"\n'
        'echo "SUBMIT:$(test -f cluster/submit.sh && echo yes || echo no)"\n'
        'echo "VENV:$(test -e .venv && echo yes || echo no)"\n'
        'echo "HOME_VAR:$RAYTRAIN_HOME"\n')
    fake.chmod(0o755)

    with LocalRayHead(num_cpus=1, path_prefix=[fake_bin]) as head:
        r = _run_submit("eval", "--experiment", "runs/x y", "--best",
                        env={"RAY_ADDRESS": head.address, "RAYTRAIN_SUBMISSION_ID": "e2e-1",
                             "PATH": head.env["PATH"], "RAY_AUTH_MODE": "token"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ray job logs -f e2e-1" in r.stdout
        status, logs = head.wait_for_job("e2e-1", timeout=180)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs}"
    assert "ARG<eval>\nARG<--experiment>\nARG<runs/x y>\nARG<--best>\n" in logs
    assert "SUBMIT:yes" in logs, "working dir is not the repository root"
    assert "VENV:no" in logs, ".venv was uploaded with the working dir"
    assert re.search(r"HOME_VAR:/\S*\.raytrain", logs), "runtime_env env_vars not applied"
