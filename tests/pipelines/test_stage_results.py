"""Typed stage results (pipelines.results) through the real run store: saved and resumed unchanged."""

import pandas as pd
import pytest

from pipelines.audit import AuditDecision
from pipelines.config import config_from_dict
from pipelines.improve import promote
from pipelines.results import Evaluated, PoolRows, Promoted, StageRows, Trained
from pipelines.rounds import RESULT_KEY, TABLES_KEY, load_stage, run_stage, save_stage
from pipelines.store import RunStore


@pytest.fixture
def store(tmp_path):
    s = RunStore(str(tmp_path), "r")
    s.init(config_from_dict({}))
    return s


def frame(n=2, **extra):
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "score": [0.25 * i for i in range(n)], **extra})


def assert_same(a, b):
    assert type(a) is type(b)
    for name, va in vars(a).items():
        vb = getattr(b, name)
        if isinstance(va, pd.DataFrame):
            pd.testing.assert_frame_equal(va.reset_index(drop=True), vb.reset_index(drop=True))
        else:
            assert va == vb, name


@pytest.mark.parametrize("stage,result", [
    ("pool", PoolRows(2, {"samples": 8, "accepted": 3, "sft": 3}, {"nonunified/rate": 0.5})),
    ("train", Trained(4, {"train/loss": 0.5, "train/step": 12.0})),
    ("train", Trained(None)),
    ("evaluate", Evaluated({"eval/gen_accuracy": 0.25}, 2, frame(4), frame(2), frame(3))),
    ("evaluate", Evaluated({"eval/gen_accuracy": 0.25}, 0, frame(4), frame(2))),
    ("audit", AuditDecision(True, False, "better", 1, "gen_accuracy", 0.3, 0.2, 0.1, round=2, tolerance=0.02)),
    ("promote", Promoted(best=2, head=2)),
    ("judge", StageRows(1, "generate", 1600)),  # a fused judge stage pointing at the generate stage's rows
])
def test_each_result_comes_back_from_the_store_unchanged(store, stage, result):
    save_stage(store, 1, stage, result, {"rows": 1})
    assert_same(load_stage(store, 1, stage), result)
    resumed = run_stage(store, 1, stage, lambda: pytest.fail("a finished stage must not recompute"))
    assert_same(resumed, result)


def test_tables_hold_the_frames_and_the_manifest_the_rest(store):
    save_stage(store, 1, "evaluate", Evaluated({"eval/gen_accuracy": 0.5}, 1, frame(4), frame(2)), {})
    info = store.stage_info(1, "evaluate")
    assert info[TABLES_KEY] == ["pairs", "samples"]  # no validation table when there was no validation slice
    assert info[RESULT_KEY] == {"metrics": {"eval/gen_accuracy": 0.5}, "model_round": 1}
    # a row stage as the driver wrote it before the workers streamed rows to storage: read as a handle
    save_stage(store, 2, "generate", frame(3), {"rows": 3})
    rows = load_stage(store, 2, "generate")
    assert rows == StageRows(2, "generate", 3)
    pd.testing.assert_frame_equal(rows.frame(store), frame(3))


def test_run_dirs_written_with_dict_results_still_load(store):
    # what the audit stage stored for a round that trained nothing, before the results were typed
    store.mark_done(3, "audit", {TABLES_KEY: [], RESULT_KEY: {"promote": False, "degraded": False,
                                                             "reason": "no new adapter", "best_round": 1}})
    decision = load_stage(store, 3, "audit")
    assert decision == AuditDecision(False, False, "no new adapter", 1)
    assert decision.round != 3  # so promote() will not move `head` to a round that made no model


def test_a_pool_stage_the_driver_wrote_whole_loads_as_a_pool_handle(store):
    # before the pool stage wrote chunks: <table>.parquet files and the accepted ids in the manifest
    data = frame(3, category=["x", "x", "y"], valid=True, pool=["accepted", "rejected", "rejected"])
    for name, df in (("data", data), ("sft", frame(1)), ("pairs", frame(1)), ("discard", frame(2)),
                     ("cpr", frame(2, kind="caption"))):
        store.write_table(1, "pool", df, name=name)
    store.mark_done(1, "pool", {"accepted": 1, "rejected": 2, "uncertain": 0, "pairs": 1, "sft_rows": 1,
                                TABLES_KEY: ["cpr", "data", "discard", "pairs", "sft"],
                                RESULT_KEY: {"accepted_prompt_ids": ["p0"]}})
    pooled = load_stage(store, 1, "pool")
    assert pooled.counts == {"accepted": 1, "rejected": 2, "uncertain": 0, "pairs": 1, "samples": 3, "sft": 1,
                             "cpr": 2}
    assert pooled.nonunified["nonunified/rate"] == pytest.approx(2 / 3)  # scores 0, 0.25 of 3 judged < 0.5
    pd.testing.assert_frame_equal(pooled.table(store, "sft"), frame(1))
    from pipelines.rounds import accepted_ids

    assert accepted_ids(store, 1) == ["p0"]


def test_a_plain_dict_is_not_a_stage_result(store):
    with pytest.raises(TypeError, match="result dataclass"):
        save_stage(store, 1, "train", {"adapter_round": 1}, {})
    assert not store.is_done(1, "train")


def test_promote_moves_head_only_to_a_new_model_that_was_not_degraded(store):
    for name in ("best", "latest", "head"):
        store.set_pointer(name, 0)
    skipped = AuditDecision(False, False, "no new adapter (training skipped)", 0, round=0)
    assert promote(store, 1, skipped)[0] == Promoted(best=0, head=0)
    kept = AuditDecision(False, False, "within tolerance", 0, "gen_accuracy", 0.1, 0.11, -0.01, round=2)
    assert promote(store, 2, kept)[0] == Promoted(best=0, head=2)
    degraded = AuditDecision(False, True, "worse", 0, "gen_accuracy", 0.05, 0.11, -0.06, round=3)
    assert promote(store, 3, degraded)[0] == Promoted(best=0, head=2)
    better = AuditDecision(True, False, "better", 0, "gen_accuracy", 0.2, 0.11, 0.09, round=4)
    assert promote(store, 4, better)[0] == Promoted(best=4, head=4)
    assert store.pointer("latest") == 4
