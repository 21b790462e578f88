"""W&B tracking (offline and disabled, no network) and the run report (markdown + PNGs)."""

from __future__ import annotations

import glob
import io
import json
import os
import socket
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.config import load_config
from pipelines.report import round_table, write_report
from pipelines.rounds import progress
from pipelines.store import RunStore
from pipelines.tracking import Tracker, experiment_family, resolve_mode, wandb_run_id


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def _samples(round_: int, prompts=("a red circle", "two blue squares", "a triangle")) -> pd.DataFrame:
    rows = []
    for i, p in enumerate(prompts):
        for s in range(2):
            rows.append({"kind": "generation", "prompt_id": f"p{i}", "prompt": p,
                         "category": ["single", "counting", "shape"][i], "sample_index": s, "seed": s,
                         "png": _png((40 * round_, 80 * s, 60 * i)), "own_score": 0.1 * (i + s),
                         "own_valid": True, "own_verdict": False, "external_verdict": (i + s + round_) % 2 == 0,
                         "label_source": "oracle", "judge_mode": "prob"})
    rows.append(dict(rows[0], kind="understanding", sample_index=0))
    return pd.DataFrame(rows)


def _history() -> list[dict]:
    out = []
    for k, acc in enumerate([0.10, 0.14, 0.08]):
        r = {"round": k, "time/generate": 10.0 + k, "time/evaluate": 5.0}
        for name, v in (("gen_accuracy", acc), ("und_accuracy", 0.7), ("nonunified", 0.4 - 0.1 * k),
                        ("und_win_rate", float("nan") if k == 0 else 0.6)):
            r.update({f"eval/{name}": v, f"eval/{name}/ci_low": v - 0.05, f"eval/{name}/ci_high": v + 0.05,
                      f"eval/{name}/n": 0 if k == 0 and name == "und_win_rate" else 200})
        r.update({"audit/promote": k < 2, "audit/degraded": k == 2, "audit/co_degraded": k == 2,
                  "audit/delta": acc - 0.14 if k else 0.0, "audit/best_round": 1 if k == 2 else 0,
                  "audit/reason": "DEGRADED: drop beyond tolerance" if k == 2 else "ok"})
        out.append(r)
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every IP connection made from this process."""
    attempts = []
    real = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def test_offline_tracker_writes_a_run_dir_with_the_table(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["run.name=shapes-sft-seed1", "wandb.mode=online"])  # env wins
    assert resolve_mode(cfg) == "offline"
    with Tracker(cfg, str(tmp_path)) as t:
        assert t.dir == str(tmp_path) and t.group == "shapes-sft"
        t.log_round(0, {"eval/gen_accuracy": 0.1, "eval/gen_accuracy/n": np.int64(12), "note": "x"})
        t.log_samples(0, _samples(0))
        t.flag(1, "gen accuracy fell while Nonunified improved")
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and runs[0].endswith(wandb_run_id(cfg))
    assert os.path.getsize(glob.glob(f"{runs[0]}/run-*.wandb")[0]) > 0
    tables = glob.glob(f"{runs[0]}/files/media/table/**/*.table.json", recursive=True)
    assert tables, "the samples table was not written"
    table = json.loads(open(tables[0]).read())
    assert table["columns"][:4] == ["round", "kind", "prompt_id", "prompt"] and len(table["data"]) == 7
    assert table["data"][0][1] == "generation"
    assert t.flags and no_network == []


def test_disabled_tracker_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, ["wandb.mode=disabled"])
    t = Tracker(cfg, str(tmp_path))
    assert not t.enabled and t.dir is None
    t.log_round(0, {"a": 1.0})
    t.log_samples(0, _samples(0))
    t.flag(0, "x")
    t.finish()
    assert list(tmp_path.iterdir()) == []


def test_run_identity_and_family():
    a = load_config(None, ["run.name=exp-a"])
    assert wandb_run_id(a) == wandb_run_id(load_config(None, ["run.name=exp-a", "run.rounds=9"]))
    assert wandb_run_id(a) != wandb_run_id(load_config(None, ["run.name=exp-a", "train.lr=0.1"]))
    assert experiment_family("shapes-dpo_r2") == "shapes-dpo" and experiment_family("shapes") == "shapes"
    assert experiment_family("exp-3") == "exp"


def test_report_files_and_table(tmp_path):
    store = RunStore(str(tmp_path), "demo")
    store.init(load_config(None))
    path = write_report(store, _history(), {0: _samples(0), 2: _samples(2)})
    md = open(path).read()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| round")]
    assert len(rows) == 3 and [r.split("|")[1].strip() for r in rows] == ["0", "1", "2"]
    assert "CO-DEGRADATION" in rows[2] and "degraded" in rows[2] and "promote" in rows[1]
    assert "0.140 [0.09-0.19] n=200" in rows[1] and "generate 11.0" in rows[1]
    for name in ("metrics.png", "grid.png"):
        with Image.open(tmp_path / "demo" / "report" / name) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    assert "report/grid.png" in md and "report/metrics.png" in md


def test_tracker_accepts_the_run_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=demo"])
    store = RunStore.from_config(cfg)
    with Tracker(cfg, store) as t:
        t.log_round(0, {"eval/gen_accuracy": 0.1})
    assert t.dir == store.root and glob.glob(f"{store.root}/wandb/offline-run-*")


def test_report_reads_the_grid_from_the_store_and_nested_history(tmp_path):
    store = RunStore(str(tmp_path), "demo")
    store.init(load_config(None))
    for k in (0, 1):
        store.write_table(k, "evaluate", _samples(k), name="samples")
    store.set_pointer("best", 1)
    history = [{"round": 0, "start": None, "decision": {"promote": True, "degraded": False, "reason": "base"},
                "metrics": {"eval/gen_accuracy": 0.1}},
               {"round": 1, "start": 0, "decision": {"promote": True, "degraded": False, "reason": "better",
                                                     "delta": 0.05, "best_round": 0},
                "metrics": {"eval/gen_accuracy": 0.15, "time/train": 3.0}}]
    md = open(write_report(store, history)).read()
    assert (tmp_path / "demo" / "report" / "grid.png").is_file() and "rounds 0, 1" in md
    assert "promote (+0.050 vs r0)" in md and "train 3.0" in md and "- round 1: better" in md


def test_report_without_grid_and_progress_line(tmp_path):
    store = RunStore(str(tmp_path), "demo")
    store.init(load_config(None))
    write_report(store, [{"round": 0, "eval/gen_accuracy": 0.1}], None)
    assert (tmp_path / "demo" / "report" / "metrics.png").is_file()
    assert not (tmp_path / "demo" / "report" / "grid.png").exists()
    assert "| 0 | 0.100 |" in round_table([{"round": 0, "eval/gen_accuracy": 0.1}])
    line = progress(2, "judge", {"rows": 944, "nonunified": 0.3124, "seconds": 12.34, "x": {"a": 1}}, resumed=True)
    assert line == "[round 2] judge     resumed    12.3s  rows=944 nonunified=0.312"


def test_ray_data_progress_bars_only_for_a_terminal_outside_ci(monkeypatch):
    from pipelines.driver import progress_bars

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_bars()  # piped to a file / a job log
    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress_bars()
    monkeypatch.setenv("CI", "true")
    assert not progress_bars()
