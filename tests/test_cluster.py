"""cluster/: the Ray cluster-launcher config (validated against the schema inside the ray
package), the KubeRay RayJob (same entrypoint and runtime environment as the job), the local
head script, and a real `ray job submit` of the job to a local head started with it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from nexus.job.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
RAYJOB = ROOT / "cluster" / "rayjob.yaml"
LOCAL_HEAD = ROOT / "cluster" / "local-head.sh"
#: what `ray job submit --working-dir <repo>` leaves out (Ray also honours .gitignore)
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    ".nexus_cache",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "benchmarks/results",
]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> dict:
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def _image_ray_version(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu)", image)
    assert match, f"unexpected image {image}"
    return match.group(1)


# -- the cluster-launcher config --------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)
    # Ray's own checks on top of the schema (head type, min/max workers), before and after
    # `ray up` fills in the provider's defaults
    validate_config(config)
    validate_config(prepare_config(config))

    broken = dict(config, max_wrokers=3)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_config_has_head_cpu_and_gpu_groups():
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {n for n, t in workers.items() if "gpu" in t.get("docker", {}).get("worker_image", "")}
    cpu = set(workers) - gpu
    assert gpu and cpu
    for name in workers:  # autoscaling groups that start from zero
        assert workers[name]["min_workers"] == 0 < workers[name]["max_workers"] <= config["max_workers"]
    assert all(types[n]["resources"].get("GPU", 0) == 0 for n in cpu)
    for image in [config["docker"]["image"], *(types[n]["docker"]["worker_image"] for n in gpu)]:
        assert _requirements()["ray"].specifier.contains(_image_ray_version(image)), image


def test_launcher_config_installs_the_project():
    config = yaml.safe_load(LAUNCHER.read_text())
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert remote, "the checkout (.) must be mounted on the nodes"
    setup = " ; ".join(config["setup_commands"])
    assert f"pip install -q -e {remote[0]}" in setup
    assert ".venv" in config["rsync_exclude"]


def test_launcher_config_keeps_dashboard_private_and_auth_on():
    config = yaml.safe_load(LAUNCHER.read_text())
    text = yaml.safe_dump(config)  # the settings, without the comments
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in text
    for cmd in (head, " ".join(config["worker_start_ray_commands"])):
        for start in [c for c in cmd.split(";") if "ray start" in c]:
            assert "RAY_AUTH_MODE=token ray start" in start
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*(disabled|off|none)", text, re.I)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# -- the KubeRay RayJob -----------------------------------------------------------------------


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_runs_the_job_entrypoint_with_a_valid_config():
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/specialize.py"]
    assert (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert not Path(config).is_absolute()  # relative to the working directory (the checkout)
    load_config(ROOT / config)


def test_rayjob_runtime_env_matches_the_project():
    job = _rayjob()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # the checkout as an archive: a remote zip, since a RayJob has no local directory to upload
    assert re.fullmatch(r"(s3|gs|https)://\S+\.zip", runtime_env["working_dir"])
    from packaging.requirements import Requirement

    pip = {Requirement(r).name.lower(): Requirement(r) for r in runtime_env["pip"]}
    deps = _requirements()
    # every dependency of the project except Ray itself, which the image provides
    assert set(pip) == set(deps) - {"ray"}
    for name, req in pip.items():
        assert str(req.specifier) == str(deps[name].specifier), name
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    for image in images:
        assert _image_ray_version(image) == spec["rayVersion"], image
    assert deps["ray"].specifier.contains(spec["rayVersion"])


def test_rayjob_has_cpu_and_gpu_groups_and_stays_private():
    job = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    assert "dashboard-host" not in spec["headGroupSpec"]["rayStartParams"]  # KubeRay's in-pod default
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups, cpu_groups = [], []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        (gpu_groups if "nvidia.com/gpu" in limits else cpu_groups).append(group)
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert gpu_groups and cpu_groups
    text = yaml.safe_dump(job)  # the settings, without the comments
    assert not re.search(r"RAY_AUTH_MODE.{0,40}(disabled|off|none)", text, re.I | re.S)
    assert not re.search(r"(LoadBalancer|NodePort)", text)


# -- the local head script ------------------------------------------------------------------


def test_local_head_script_is_valid_bash_with_private_dashboard():
    subprocess.run(["bash", "-n", str(LOCAL_HEAD)], check=True)
    text = LOCAL_HEAD.read_text()
    assert "--dashboard-host 127.0.0.1" in text
    assert "RAY_AUTH_MODE=token" in text
    assert "ray stop" not in text  # would stop every Ray instance on the machine
    out = subprocess.run(["bash", str(LOCAL_HEAD), "bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


# -- `ray job submit` against a local head ---------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _kill_tree(processes) -> None:
    """End the given processes (the head's, recorded by pid when it started) if still alive."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=10)
    for p in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.mark.slow
def test_ray_job_submit_to_a_local_head(demo_tiny, tmp_path):
    """`ray job submit --working-dir <repo> -- python jobs/specialize.py --config ...` against a
    head started with `ray start --head` (through cluster/local-head.sh), token auth on."""
    import psutil
    from test_job import small_corpus, tiny_job_config

    corpus_dir, model_dir = demo_tiny
    corpus_dir = small_corpus(corpus_dir, tmp_path / "corpus")
    out = tmp_path / "job-output"
    config = tiny_job_config(corpus_dir, model_dir, out, sample={"enabled": False})
    config_path = tmp_path / "tiny-job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    # a second Ray cluster beside the test session's: its own temp dir (short, for Ray's Unix
    # sockets), free ports, its own token
    head_dir = Path(tempfile.mkdtemp(prefix="nxhead-", dir="/tmp"))
    token_path = head_dir / "auth_token"
    token = secrets.token_hex(32)
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs, dash, client, nm, om, agent_http, agent_grpc, rtenv, metrics = _free_ports(9)
    ray_bin = Path(sys.executable).with_name("ray")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    }
    env.update(
        RAY=str(ray_bin),
        PATH=f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        NEXUS_HEAD_DIR=str(head_dir),
        NEXUS_HEAD_PORT=str(gcs),
        NEXUS_DASHBOARD_PORT=str(dash),
        NEXUS_HEAD_CPUS="2",
        NEXUS_HEAD_EXTRA_ARGS=(
            f"--ray-client-server-port {client} --node-manager-port {nm} --object-manager-port {om} "
            f"--dashboard-agent-listen-port {agent_http} --dashboard-agent-grpc-port {agent_grpc} "
            f"--runtime-env-agent-port {rtenv} --metrics-export-port {metrics}"
        ),
        NEXUS_RAY_LOGS="0",
    )
    address = f"http://127.0.0.1:{dash}"
    submission_id = f"nexus-test-{secrets.token_hex(4)}"
    head_tree: list = []
    try:
        started = subprocess.run(
            ["bash", str(LOCAL_HEAD), "start"], env=env, capture_output=True, text=True, timeout=180
        )
        assert started.returncode == 0, started.stderr[-3000:]
        head = psutil.Process(int((head_dir / "head.pid").read_text()))
        head_tree = [head, *head.children(recursive=True)]

        # the job API listens on loopback only and refuses requests without the right token
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == dash
        }
        assert listening == {"127.0.0.1"}
        assert _get(f"{address}/api/jobs/") == 401
        assert _get(f"{address}/api/jobs/", token="0" * 64) == 403
        assert _get(f"{address}/api/jobs/", token=token) == 200

        t0 = time.perf_counter()
        submit = subprocess.run(
            [
                str(ray_bin),
                "job",
                "submit",
                "--address",
                address,
                "--submission-id",
                submission_id,
                "--working-dir",
                str(ROOT),
                "--runtime-env-json",
                json.dumps({"excludes": UPLOAD_EXCLUDES}),
                "--",
                "python",
                "jobs/specialize.py",
                "--config",
                str(config_path),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=480,
        )
        seconds = time.perf_counter() - t0
        status = subprocess.run(
            [str(ray_bin), "job", "status", "--address", address, submission_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        logs = (submit.stdout + submit.stderr)[-4000:]
        state = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert re.search(r"\bsucceeded\b", state, re.I), logs + state
        assert submit.returncode == 0, logs
        print(f"ray job submit: {seconds:.0f}s")
    finally:
        stopped = subprocess.run(
            ["bash", str(LOCAL_HEAD), "stop"], env=env, capture_output=True, text=True, timeout=120
        )
        _kill_tree(head_tree)  # whatever the script did not end
        shutil.rmtree(head_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr

    # the artifacts, written by the job on the head
    statuses = {s["stage"]: s["status"] for s in json.loads((out / "stages.json").read_text())}
    assert statuses == {
        "sample": "skipped",
        "collect": "ran",
        "analyze": "ran",
        "convert": "ran",
        "distill": "skipped",
        "train": "ran",
        "evaluate": "ran",
        "export": "skipped",
    }
    report = (out / "report.md").read_text()
    assert "base ppl" in report and "specialised ppl" in report
    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert {"domain", "general"} <= set(evaluation["corpora"])
    assert list((out / "train" / "adapter").glob("*.safetensors"))
    # the job printed its table at the end
    assert "| domain |" in submit.stdout
