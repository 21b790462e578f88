"""A local multi-node Ray cluster on 127.0.0.1 (`ray start --head` + `ray start --address`), for the
two-node test (tests/cluster/test_multinode.py) and `benchmarks/bench_pipeline.py --nodes 2`.

Isolation from other Rays on this machine (other test sessions run local Rays concurrently): every
port is picked free and distinct; each node has its own short `--temp-dir`; each `ray start --block`
runs in its own process group and teardown signals those groups, then kills (by pid) leftover
processes whose command line names our temp dirs. Never `ray stop`: it stops every Ray of the user.
RAY_AUTH_MODE=disabled: Ray 2.60 turns token auth on by default; a loopback-only cluster does not
need it (and the job CLI would need the token otherwise).

Example:
    c = start_two_nodes("/tmp/ugc-123", head_cpus=0, worker_cpus=2)
    try: ...  # ray.init(address=c.gcs), or `ray job submit --address c.dashboard`
    finally: c.stop()
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
from typing import Optional

RAY = str(Path(sys.executable).with_name("ray"))  # the CLI of the interpreter running this


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


@dataclass
class LocalCluster:
    gcs: str  # 127.0.0.1:<port>, for `ray start --address` and ray.init
    dashboard: str  # http://127.0.0.1:<port>, for `ray job ...`
    env: dict
    temp_dirs: list[str]
    object_store_mib: int = 200
    procs: list[subprocess.Popen] = field(default_factory=list)
    log_files: list = field(default_factory=list)

    def start_node(self, args: list[str], temp_dir: str) -> None:
        log = open(Path(temp_dir + ".log"), "w")  # noqa: SIM115 (closed in stop())
        self.log_files.append(log)
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", temp_dir,
               "--object-store-memory", str(self.object_store_mib * 1024**2), *node_ports(), *args]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def logs(self) -> str:
        return "\n".join(f"--- {d}.log\n" + Path(d + ".log").read_text()[-3000:]
                         for d in self.temp_dirs if Path(d + ".log").exists())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[2])

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


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback only)
        return json.loads(r.read())


def wait_for(what: str, ok, timeout: float, cluster: LocalCluster, every: float = 1.0):
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
    raise TimeoutError(f"timed out waiting for {what} (last: {last!r})\n{cluster.logs()}")


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """The cluster's alive nodes with their resources, from a short-lived driver (ray.nodes())."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print('NODES=' + json.dumps([n for n in ray.nodes() if n['Alive']]))" % cluster.gcs)
    r = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("NODES=")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(lines[-1][len("NODES="):])


def start_two_nodes(tag: str, head_cpus: int, worker_cpus: int, worker_resources: Optional[dict] = None,
                    env: Optional[dict] = None, object_store_mib: int = 200) -> LocalCluster:
    """A head (`head_cpus`, dashboard + job server) and one worker node (`worker_cpus`, custom
    `worker_resources`), both alive when this returns; `tag`: a short unique prefix for temp dirs."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           **(env or {})}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    c = LocalCluster(gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}", env=env,
                     temp_dirs=[f"{tag}-h", f"{tag}-w"], object_store_mib=object_store_mib)
    try:
        c.start_node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus",
                      str(head_cpus), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(dash_port), "--ray-client-server-port", str(free_port())],
                     c.temp_dirs[0])
        wait_for("the head's job server", lambda: http_json(c.dashboard + "/api/version"), 90, c)
        c.start_node(["--address", c.gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", str(worker_cpus),
                      "--resources", json.dumps(worker_resources or {})], c.temp_dirs[1])
        wait_for("two alive nodes", lambda: len(alive_nodes(c)) == 2, 90, c, every=2.0)
    except BaseException:
        c.stop()
        raise
    return c
