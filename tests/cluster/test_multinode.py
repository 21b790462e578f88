"""A real two-node Ray cluster on 127.0.0.1: `ray job submit` runs one round, the work lands on the worker.

What it checks (the path a KubeRay RayJob takes, minus Kubernetes): a head started with `ray start
--head` (0 CPUs, dashboard + job server on loopback) and a second node joined with `ray start
--address` (2 CPUs, custom resource `unigap_worker`); `ray job submit` with the project's
`cluster/runtime_env.yaml` uploads this checkout as the working dir and runs `python -m pipelines.cli
run configs/tiny.yaml` there; the driver joins the cluster through the RAY_ADDRESS the job server
sets. The job must SUCCEED, the manifest must have round 1 complete, and the generate / judge
tables' `node_id` / `judge_node_id` columns must name the worker node: the head has no CPUs, so
every actor has to be scheduled there.

Isolation from other Rays on this machine (other test sessions run local Rays concurrently):
  * every port is picked free and distinct (GCS, dashboard, client server, agents, metrics, node/object
    managers): bind(0) can hand the same port out twice once its socket closes, so picks are remembered;
  * each node has its own short `--temp-dir` (Ray's unix socket paths cap the length);
  * each `ray start --block` runs in its own process group; teardown signals those groups, then
    kills (by pid) leftover processes whose command line names our temp dirs. Never `ray stop`: it
    stops every Ray of the user on the machine.
  * RAY_AUTH_MODE=disabled: Ray 2.60 turns token auth on by default; a loopback-only test cluster
    does not need it (and the job CLI would need the token otherwise).

Runtime: 2.5-3.5 minutes on the contended 2-core box (cluster start ~20 s, the job 1.5-2.5 min).

Example:
    $ OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/cluster/test_multinode.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))  # the CLI of the interpreter running the tests
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

WORKER_RESOURCE = "unigap_worker"
JOB_TIMEOUT_S = 360
STAGES = ("generate", "judge", "pool", "train", "evaluate", "audit", "promote")  # pipelines/driver.py
# One round of the tiny config, small: generate -> judge -> pool -> train -> evaluate -> audit -> promote.
OVERRIDES = ["run.name=multinode", "run.rounds=1", "prompts.limit=4", "generate.num_images=2",
             "eval.num_prompts=2", "eval.num_images=2", "eval.understanding_pairs=4", "train.steps=1",
             "train.num_workers=1", "wandb.mode=disabled", "pools.review_sample=0"]


_TAKEN: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this session.

    The OS may return the same ephemeral port to two back-to-back bind(0) calls once the first socket
    is closed; Ray refuses a node whose components share a port (CI saw dashboard_agent_grpc ==
    runtime_env_agent), so every port picked here is remembered and not given again.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def node_ports() -> list[str]:
    """Per-node ports that default to fixed numbers (or may clash between two nodes on one host)."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    return [arg for name in names for arg in (name, str(free_port()))]


def test_free_ports_are_distinct():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


@dataclass
class LocalCluster:
    gcs: str  # 127.0.0.1:<port>, for `ray start --address` and ray.init
    dashboard: str  # http://127.0.0.1:<port>, for `ray job ...`
    env: dict
    temp_dirs: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    log_files: list = field(default_factory=list)

    def start_node(self, args: list[str], temp_dir: str) -> None:
        log = open(Path(temp_dir + ".log"), "w")  # noqa: SIM115 (closed in stop())
        self.log_files.append(log)
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", temp_dir,
               "--object-store-memory", str(200 * 1024**2), *node_ports(), *args]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def logs(self) -> str:
        return "\n".join(f"--- {d}.log\n" + Path(d + ".log").read_text()[-3000:]
                         for d in self.temp_dirs if Path(d + ".log").exists())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)

    def stop(self) -> None:
        """SIGTERM each `ray start --block` group (it stops its own node), then kill what is left."""
        for p in self.procs:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=10)  # reap it
            except subprocess.TimeoutExpired:
                pass
        for pid in _pids_mentioning(self.temp_dirs):  # workers started in their own groups
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fh in self.log_files:
            fh.close()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
            Path(d + ".log").unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_mentioning(needles: list[str]) -> list[int]:
    """Pids whose command line contains one of our (unique) temp dirs: processes this test started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


def _http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback only)
        return json.loads(r.read())


def _wait(what: str, ok, timeout: float, cluster: LocalCluster, every: float = 1.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = ok()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 (keep polling; report the last error)
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{cluster.logs()}")


def _alive_nodes(cluster: LocalCluster) -> list[dict]:
    """The cluster's alive nodes with their resources, from a short-lived driver (ray.nodes())."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print('NODES=' + json.dumps([n for n in ray.nodes() if n['Alive']]))" % cluster.gcs)
    r = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("NODES=")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(lines[-1][len("NODES="):])


@pytest.fixture(scope="module")
def cluster():
    tag = f"/tmp/ugc-{os.getpid()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    c = LocalCluster(gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}", env=env,
                     temp_dirs=[f"{tag}-h", f"{tag}-w"])
    try:
        c.start_node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus", "0",
                      "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(dash_port), "--ray-client-server-port", str(free_port())],
                     c.temp_dirs[0])
        _wait("the head's job server", lambda: _http_json(c.dashboard + "/api/version"), 90, c)
        c.start_node(["--address", c.gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                      "--resources", json.dumps({WORKER_RESOURCE: 1})], c.temp_dirs[1])
        _wait("two alive nodes", lambda: len(_alive_nodes(c)) == 2, 90, c, every=2.0)
        yield c
    finally:
        c.stop()


def _submit(cluster: LocalCluster, root: Path) -> str:
    submission_id = f"unigap-multinode-{os.getpid()}"
    r = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
                    "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--working-dir", str(REPO),
                    "--no-wait", "--", sys.executable, "-m", "pipelines.cli", "run", "configs/tiny.yaml",
                    f"run.root={root}", *OVERRIDES)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return submission_id


def test_job_submit_runs_a_round_on_the_worker_node(cluster, tmp_path):
    nodes = _alive_nodes(cluster)
    worker = [n["NodeID"] for n in nodes if n["Resources"].get(WORKER_RESOURCE)]
    head = [n["NodeID"] for n in nodes if not n["Resources"].get(WORKER_RESOURCE)]
    assert len(worker) == 1 and len(head) == 1, nodes

    job = _submit(cluster, tmp_path)
    info = _wait("the job to finish", lambda: (lambda s: s if s["status"] in ("SUCCEEDED", "FAILED", "STOPPED")
                                               else None)(_http_json(f"{cluster.dashboard}/api/jobs/{job}")),
                 JOB_TIMEOUT_S, cluster, every=5.0)
    logs = cluster.ray("job", "logs", job, "--address", cluster.dashboard).stdout
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"

    run_dir = tmp_path / "multinode"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(manifest["rounds"]["1"]["stages"]) == sorted(STAGES)
    assert manifest["pointers"]["latest"] == 1 and "[round 1] promote" in logs
    print("\n".join(line for line in logs.splitlines() if line.startswith("[round")))  # stage times (-s)

    from pipelines.rounds import load_stage
    from pipelines.store import RunStore

    store = RunStore(str(tmp_path), "multinode")  # the rows the worker node's actors wrote to the store
    generated, judged = (load_stage(store, 1, name).frame(store) for name in ("generate", "judge"))
    assert len(generated) == 4 * 2
    assert set(generated["node_id"]) == set(worker), "generation actors must run on the worker node"
    assert set(judged["judge_node_id"]) == set(worker), "judge actors must run on the worker node"
