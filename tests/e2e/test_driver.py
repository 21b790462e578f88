"""The driver end to end through the real command (`unigap run`), on local Ray with the tiny model.

Each run is a subprocess, as a user runs it: a fresh driver process that starts its own local Ray.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]  # whole runs of the driver

TINY = ["run.rounds=2", "prompts.limit=6", "prompts.per_round=3", "eval.num_prompts=4", "eval.num_images=2",
        "eval.understanding_pairs=8", "train.num_workers=1", "train.epochs=1", "train.batch_size=4",
        "wandb.mode=offline", "ray.num_cpus=2", "pools.review_sample=4", "eval.validation_prompts=2",
        "eval.validation_images=2", "prompts.proposer=describe", "cpr.caption=1.0", "cpr.judgement=1.0",
        "cpr.reflection=1.0", "cpr.reflection_best=0.0", "cpr.reflection_gap=0.0"]


def driver_env(**extra) -> dict:
    """A driver subprocess's environment, as a user's shell gives it: no RAY_ADDRESS, and no
    WANDB_SERVICE -- an earlier test's in-process wandb.init sets it in this process, and drivers that
    inherit it share this process's wandb service, so a SIGKILLed driver's run stays registered there
    and its resume fails with "run ID ... is in use"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **extra}
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_SERVICE", None)
    return env


def unigap(*args, env=None, **kw):
    env = driver_env(WANDB_SILENT="true", **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, **kw)


def comparable(manifest: dict) -> dict:
    """The manifest without wall-clock facts (times, sessions, durations)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in ("done_at", "updated_at", "created_at", "sessions", "seconds", "at")
                    and not k.startswith("time/") and "tokens_per_s" not in k and "per_s" not in k}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(manifest)


def _diff(a, b, path=""):
    """Paths where two JSON trees differ (readable failures for the resume test)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield f"{path}/{key}: only in {'resumed' if key in a else 'reference'}"
            else:
                yield from _diff(a[key], b[key], f"{path}/{key}")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        yield f"{path}: resumed {str(a)[:80]} != reference {str(b)[:80]}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    r = unigap("run", "configs/tiny.yaml", f"run.root={root}", "run.name=two", *TINY, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "two", r


def test_two_rounds_end_to_end(finished):
    run_dir, r = finished
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for k in (1, 2):
        stages = manifest["rounds"][str(k)]["stages"]
        assert set(stages) == {"propose", "generate", "judge", "pool", "train", "evaluate", "audit", "promote"}
    assert "evaluate" in manifest["rounds"]["0"]["stages"]
    assert manifest["pointers"]["latest"] == 2 and manifest["pointers"]["best"] in (0, 1, 2)
    assert (run_dir / "report.md").is_file()
    assert "[round 1] generate" in r.stdout and "[round 2] promote" in r.stdout
    assert list((run_dir / "wandb").glob("**/offline-run-*")), "W&B offline run missing"
    # per-step training curves: a table per trained round in the offline W&B run, and the report's plot
    trained = [k for k in (1, 2) if (run_dir / "adapters" / f"round_{k}" / "train_metrics.json").is_file()]
    assert trained and (run_dir / "report" / "train.png").is_file()
    for k in trained:
        history = json.loads((run_dir / "adapters" / f"round_{k}" / "train_metrics.json").read_text())["history"]
        tables = list((run_dir / "wandb").glob(f"**/files/media/table/train/steps_{k}_*.table.json"))
        assert len(tables) == 1, tables
        table = json.loads(tables[0].read_text())
        assert table["columns"][:3] == ["round", "step", "loss"]
        assert [row[1] for row in table["data"]] == [h["step"] for h in history]
        assert [row[2] for row in table["data"]] == pytest.approx([h["loss"] for h in history])
    # the validation slice: evaluated every round, paired with the base, never trained on
    import pyarrow.parquet as pq

    val_ids = set(pq.read_table(run_dir / "round_0" / "evaluate" / "validation.parquet")["prompt_id"].to_pylist())
    assert len(val_ids) == 2
    for k in (1, 2):
        metrics = manifest["rounds"][str(k)]["stages"]["evaluate"]["info"]["result"]["metrics"]
        assert 0 <= metrics["eval/val_accuracy"] <= 1 and metrics["eval/val_accuracy/n"] == 4
        assert metrics["eval/val_gain_vs_base/n"] == 2
        parts = run_dir / f"round_{k}" / "generate" / "data"  # written by the actors, not the driver
        assert parts.is_dir() and list(parts.glob("*.parquet"))
        generated = set(pq.read_table(parts)["prompt_id"].to_pylist())
        assert generated and not generated & val_ids
        assert "png" not in pq.read_table(run_dir / f"round_{k}" / "pool" / "data").schema.names  # chunk parts
        # the proposer: one row per unconditional draw (round(0.5 x 3) prompts wanted x 3), each with a
        # status; what it admitted is generated this round (the tiny random model's captions rarely parse)
        from pipelines.propose import STATUSES

        proposals = pq.read_table(run_dir / f"round_{k}" / "propose" / "data.parquet").to_pandas()
        assert len(proposals) == 6 and set(proposals["status"]) <= set(STATUSES)
        assert set(proposals.loc[proposals["status"] == "admitted", "prompt_id"]) <= generated
        info = manifest["rounds"][str(k)]["stages"]["propose"]["info"]
        assert info["drawn"] == 6 and 0 <= info["valid_rate"] <= 1
        # CPR rows: stored with their kind by the pool stage, all of them trained beside the image rows
        cpr = pq.read_table(run_dir / f"round_{k}" / "pool" / "cpr").to_pandas()
        pooled = pq.read_table(run_dir / f"round_{k}" / "pool" / "data").to_pandas()
        pool_of = dict(zip(zip(pooled["prompt_id"], pooled["sample_index"]), pooled["pool"]))
        assert len(cpr) and set(cpr["kind"]) <= {"caption", "judgement", "reflection"}
        for kind, allowed in (("caption", {"accepted"}), ("judgement", {"accepted", "rejected"})):
            rows = cpr[cpr["kind"] == kind]
            assert {pool_of[key] for key in zip(rows["prompt_id"], rows["sample_index"])} <= allowed
        train = manifest["rounds"][str(k)]["stages"]["train"]["info"]
        if k in trained:
            assert train["cpr_rows"] == len(cpr)
            history = json.loads((run_dir / "adapters" / f"round_{k}" / "train_metrics.json").read_text())["history"]
            assert all("und_rows" in h and "reflection_rows" in h for h in history)
            tables = (run_dir / "wandb").glob(f"**/files/media/table/train/steps_{k}_*.table.json")
            assert json.loads(next(tables).read_text())["columns"][-3:] == ["gen_loss", "und_loss", "reflection_loss"]


def test_compare_tables_the_finished_run_with_paired_gains(finished, tmp_path):
    run_dir, _ = finished
    manifest = json.loads((run_dir / "manifest.json").read_text())
    r = unigap("compare", str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp.md"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "cmp.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| two | ")]
    assert len(rows) == 2 * 3 + 2  # 3 rounds (0-2) per copy of the run, plus 2 summary rows
    for k in (1, 2):
        m = manifest["rounds"][str(k)]["stages"]["evaluate"]["info"]["result"]["metrics"]
        gain = m["eval/gen_gain_vs_base"]
        assert gain == pytest.approx(m["eval/gen_accuracy"] - manifest["rounds"]["0"]["stages"]["evaluate"]["info"]
                                     ["result"]["metrics"]["eval/gen_accuracy"], abs=1e-9)  # paired == difference
        assert m["eval/gen_gain_vs_base/ci_low"] <= gain <= m["eval/gen_gain_vs_base/ci_high"]
        assert f"| two | {k} | " in text and f"{100 * gain:+.1f} [" in text
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # pooled arms: one run pooled with itself is its own last-round gain; two identical arms differ by 0
    pooled = unigap("compare", "--arm", f"a={run_dir},{run_dir}", "--arm", f"b={run_dir}", timeout=300)
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    last = manifest["rounds"]["2"]["stages"]["evaluate"]["info"]["result"]["metrics"]["eval/gen_gain_vs_base"]
    lines = pooled.stdout.splitlines()
    assert any(line.startswith("a ") and "external_verdict" in line and f"runs=2: {100 * last:+.1f} [" in line
               for line in lines), lines
    assert "a - b (external_verdict): +0.0 [+0.0, +0.0] points" in lines and len(lines) == 6
    bad = unigap("compare", "--arm", "nodirs", timeout=120)
    assert bad.returncode != 0 and "NAME=RUN_DIR" in bad.stderr
    # the validation slice pools the same way, from its own rows (chosen on, never trained on)
    import pyarrow.parquet as pq

    val = pq.read_table(run_dir / "round_2" / "evaluate" / "validation.parquet").to_pandas()
    val0 = pq.read_table(run_dir / "round_0" / "evaluate" / "validation.parquet").to_pandas()
    per = lambda f: f.groupby("prompt_id")["external_verdict"].mean()  # noqa: E731
    want = 100 * (per(val) - per(val0)).mean()
    v = unigap("compare", "--split", "validation", "--arm", f"a={run_dir}", "--arm", f"b={run_dir}", timeout=300)
    assert v.returncode == 0, v.stderr[-3000:]
    lines = v.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("a ") and f"runs=1: {want:+.1f} [" in lines[0], lines
    assert lines[0].endswith("(2 validation prompts)") and "second_verdict" not in v.stdout
    missing = unigap("compare", "--split", "validation", "--arm", f"a={tmp_path / 'nothing'}", timeout=120)
    assert missing.returncode != 0 and "not a run dir" in missing.stderr
    # --round pools every run at that round (runs of unequal length); a round not evaluated is an error
    first = manifest["rounds"]["1"]["stages"]["evaluate"]["info"]["result"]["metrics"]["eval/gen_gain_vs_base"]
    r1 = unigap("compare", "--round", "1", "--arm", f"a={run_dir}", timeout=300)
    assert r1.returncode == 0 and f"runs=1: {100 * first:+.1f} [" in r1.stdout.splitlines()[0], r1.stdout
    late = unigap("compare", "--round", "9", "--arm", f"a={run_dir}", timeout=120)
    assert late.returncode != 0 and "round 9 has not been evaluated" in late.stderr
    # --by-category: each category's prompts once, the categories together are all the prompts
    cats = unigap("compare", "--by-category", "--split", "validation", "--arm", f"a={run_dir}", timeout=300)
    assert cats.returncode == 0, cats.stderr[-3000:]
    per_cat = [line for line in cats.stdout.splitlines() if line.startswith("  a ")]
    assert per_cat and sum(int(line.rsplit("(", 1)[1].split()[0]) for line in per_cat) == len(set(val["prompt_id"]))


def test_resume_after_sigkill_gives_the_same_manifest(finished, tmp_path):
    reference, _ = finished
    env = driver_env()
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "configs/tiny.yaml", f"run.root={tmp_path}",
           "run.name=two", *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = ""
    deadline = time.time() + 600
    for line in proc.stdout:  # kill -9 the whole driver (and its local Ray) mid-round-1
        seen += line
        if "[round 1] judge" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "[round 1] judge" in seen, seen[-2000:]
    r = unigap("run", "configs/tiny.yaml", f"run.root={tmp_path}", "run.name=two", *TINY, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed" in r.stdout
    got = json.loads((tmp_path / "two" / "manifest.json").read_text())
    want = json.loads((reference / "manifest.json").read_text())
    differences = list(_diff(comparable(got["rounds"]), comparable(want["rounds"])))
    assert not differences, differences[:10]
    assert got["pointers"] == want["pointers"]


def test_bad_config_fails_before_ray_starts(tmp_path):
    t = time.time()
    r = unigap("run", "configs/tiny.yaml", f"run.root={tmp_path}", "pools.accept_threshold=0.1",
               "pools.reject_threshold=0.9", timeout=120)
    assert r.returncode == 2 and "pools.accept_threshold" in r.stderr
    r = unigap("run", "configs/tiny.yaml", f"run.root={tmp_path}", "train.bta=0.1", timeout=120)
    assert r.returncode == 2 and "train.bta" in r.stderr and "beta" in r.stderr
    assert time.time() - t < 60 and not list(tmp_path.iterdir()), "nothing may be written for a bad config"


def test_bad_prompt_file_or_unwritable_root_writes_nothing(tmp_path):
    prompts = tmp_path / "p.jsonl"  # training rows only: no held-out rows to evaluate on
    prompts.write_text("".join(json.dumps({"prompt": f"a red circle {i}", "split": "train"}) + "\n" for i in range(3)))
    root = tmp_path / "runs"
    r = unigap("run", "configs/tiny.yaml", f"run.root={root}", f"prompts.source={prompts}",
               "audit.backend=vlm", "audit.vlm_path=tiny", timeout=120)
    assert r.returncode == 2 and "held-out" in r.stderr, r.stderr[-2000:]
    assert not root.exists(), "a failed start must leave no run dir (its hash would block the fixed command)"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = unigap("run", "configs/tiny.yaml", f"run.root={blocker}/runs", timeout=120)
    assert r.returncode == 2 and f"run.root='{blocker}/runs' is not writable" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_killed_driver_leaves_no_ray_processes(tmp_path):
    """kill -9 of the driver alone (not its group): the local Ray it started goes too. Without the
    reaper, Ray's dashboard and runtime-env agents were left running, reparented to init."""
    from pipelines.reaper import descendants

    env = driver_env()
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "configs/tiny.yaml",
                                 f"run.root={tmp_path}", *TINY], cwd=REPO, env=env, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while "[round 1] generate" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        assert proc.poll() is None, log.read_text()[-2000:]
        ours = descendants(proc.pid)
        assert len(ours) >= 4, ours  # gcs, raylet, agents, workers, the reaper
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        alive = ours
        while alive and time.time() < deadline:
            time.sleep(1)
            alive = {p: s for p, s in ours.items() if _start_time(p) == s}
        assert not alive, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in alive}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _start_time(pid: int):
    from pipelines.reaper import _stat

    st = _stat(pid)
    return st and st[1]


# The corrupted-judge control on the shipped shapes model: the judge's scores are inverted (SFT on what
# the model itself rejects), trained hard enough that the damage is far outside evaluation noise.
INVERTED = ["run.rounds=2", "prompts.per_round=null", "generate.num_images=8", "eval.num_images=4",
            "eval.understanding_pairs=16", "train.num_workers=1", "train.lr=3e-3", "audit.tolerance=0.0",
            "audit.on_degradation=continue_from_best", "wandb.mode=offline", "ray.num_cpus=2",
            "pools.review_sample=0"]


def audit_prompt_file(path: Path) -> Path:
    """One-object prompts only (categories single and shape): the train split to train on, both
    splits to evaluate on. Evaluation overlaps training on purpose: this test is about the audit, so
    the damage must be unmistakable, and one-object prompts are the ones the shipped model draws
    right often enough for a fall to show (its spatial accuracy is near zero: nothing to lose)."""
    from shapes.world import heldout_prompts, train_prompts

    one = ("single", "shape")
    rows = [{"id": f"t{i}", "prompt": s.text, "category": s.category, "split": "train"}
            for i, s in enumerate(train_prompts()) if s.category in one]
    rows += [{"id": f"h{i}", "prompt": s.text, "category": s.category, "split": "heldout"}
             for i, s in enumerate(train_prompts() + heldout_prompts()) if s.category in one]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_inverted_judge_triggers_the_audit_and_nothing_is_promoted(tmp_path):
    prompts = audit_prompt_file(tmp_path / "prompts.jsonl")
    r = unigap("run", "configs/experiments/judge-inverted.yaml", f"run.root={tmp_path}", "run.name=inv",
               f"prompts.source={prompts}", *INVERTED, timeout=1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((tmp_path / "inv" / "manifest.json").read_text())
    audits = [manifest["rounds"][str(k)]["stages"]["audit"]["info"]["result"] for k in (1, 2)]
    base = audits[0]["best_value"]
    assert base > 0.1, f"the base model must draw some correct images for a fall to be visible ({base})"
    assert not any(a["promote"] for a in audits), [a["reason"] for a in audits]
    assert all(a["degraded"] and a["value"] < base and a["best_round"] == 0 for a in audits), \
        [a["reason"] for a in audits]
    assert manifest["pointers"]["best"] == 0 and manifest["pointers"]["latest"] == 2
    assert r.stdout.count("decision=degraded") == 2, r.stdout[-3000:]
    report = (tmp_path / "inv" / "report.md").read_text()
    assert report.count("degraded") >= 2
