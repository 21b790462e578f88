"""A real two-node Ray cluster on 127.0.0.1: `ray job submit` runs one round, the work lands on the worker.

What it checks (the path a KubeRay RayJob takes, minus Kubernetes): a head started with `ray start
--head` (0 CPUs, dashboard + job server on loopback) and a second node joined with `ray start
--address` (2 CPUs, custom resource `unigap_worker`); `ray job submit` with the project's
`cluster/runtime_env.yaml` uploads this checkout as the working dir and runs `python -m pipelines.cli
run configs/tiny.yaml` there; the driver joins the cluster through the RAY_ADDRESS the job server
sets. The job must SUCCEED, the manifest must have round 1 complete, and the generate / judge
tables' `node_id` / `judge_node_id` columns must name the worker node: the head has no CPUs, so
every actor has to be scheduled there.

Isolation from other Rays on this machine (tests/cluster/localcluster.py, shared with
`benchmarks/bench_pipeline.py --nodes 2`; other test sessions run local Rays concurrently):
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
import sys
from pathlib import Path

import pytest
from tests.cluster.localcluster import LocalCluster, alive_nodes, http_json, start_two_nodes, wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

WORKER_RESOURCE = "unigap_worker"
JOB_TIMEOUT_S = 360
STAGES = ("generate", "judge", "pool", "train", "evaluate", "audit", "promote")  # pipelines/driver.py
# One round of the tiny config, small: generate -> judge -> pool -> train -> evaluate -> audit -> promote.
OVERRIDES = ["run.name=multinode", "run.rounds=1", "prompts.limit=4", "generate.num_images=2",
             "eval.num_prompts=2", "eval.num_images=2", "eval.understanding_pairs=4", "train.steps=1",
             "train.num_workers=1", "wandb.mode=disabled", "pools.review_sample=0"]


def test_free_ports_are_distinct():
    from tests.cluster.localcluster import free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


@pytest.fixture(scope="module")
def cluster():
    c = start_two_nodes(f"/tmp/ugc-{os.getpid()}", head_cpus=0, worker_cpus=2,
                        worker_resources={WORKER_RESOURCE: 1}, env={"PYTHONPATH": str(REPO)})
    try:
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
    nodes = alive_nodes(cluster)
    worker = [n["NodeID"] for n in nodes if n["Resources"].get(WORKER_RESOURCE)]
    head = [n["NodeID"] for n in nodes if not n["Resources"].get(WORKER_RESOURCE)]
    assert len(worker) == 1 and len(head) == 1, nodes

    job = _submit(cluster, tmp_path)
    info = wait_for("the job to finish", lambda: (lambda s: s if s["status"] in ("SUCCEEDED", "FAILED", "STOPPED")
                                               else None)(http_json(f"{cluster.dashboard}/api/jobs/{job}")),
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
