"""External judges, the audit decision rule and the held-out evaluation (tiny random model, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.audit import (AuditDecision, InvertedJudge, OracleJudge, RandomJudge, VLMJudge, audit,
                             audit_vs_best, flat_record, make_external_judge)
from pipelines.config import EvalSection, load_config
from pipelines.evaluate import evaluate_round, und_win_rate
from pipelines.prompts import load_prompts
from shapes.world import heldout_prompts, render, sample_scene

HEADLINE = ("gen_accuracy", "nonunified", "own_external_agreement", "und_accuracy", "und_win_rate")


def _cfg(**audit):
    return load_config(None, [f"audit.{k}={v}" for k, v in audit.items()]).audit


def _rec(round_, value, promote=None, metric="gen_accuracy", **extra):
    r = {"round": round_, f"eval/{metric}": value, **extra}
    if promote is not None:
        r["audit/promote"] = promote
    return r


# ------------------------------------------------------------------------------- audit decisions

def test_base_round_is_the_initial_best():
    d = audit([], _rec(0, 0.1), _cfg())
    assert isinstance(d, AuditDecision) and d.promote and not d.degraded and d.best_round == 0


@pytest.mark.parametrize("value, promote, degraded, word", [
    (0.55, True, False, "better"),
    (0.50, True, False, "tie"),
    (0.49, False, False, "hold"),
    (0.48, False, False, "hold"),  # a drop of exactly the tolerance is allowed (float slack)
    (0.4799, False, True, "DEGRADED"),
    (0.30, False, True, "DEGRADED"),
])
def test_decision_edges(value, promote, degraded, word):
    history = [_rec(0, 0.50, True)]
    d = audit(history, _rec(1, value), _cfg(tolerance=0.02))
    assert (d.promote, d.degraded) == (promote, degraded)
    assert word in d.reason and d.best_round == 0
    assert d.delta == pytest.approx(value - 0.50)


def test_a_round_significantly_below_the_base_is_degraded_even_within_tolerance():
    history = [_rec(0, 0.132, True)]
    paired = {"eval/gen_gain_vs_base": -0.019, "eval/gen_gain_vs_base/ci_low": -0.037,
              "eval/gen_gain_vs_base/ci_high": -0.002}  # the inverted-judge arm's round 2
    d = audit(history, _rec(2, 0.113, **paired), _cfg(tolerance=0.02))
    assert d.degraded and not d.promote and "significantly below the base" in d.reason
    off = audit(history, _rec(2, 0.113, **paired), _cfg(tolerance=0.02, paired_rollback="false"))
    assert not off.degraded and "hold" in off.reason
    noisy = {**paired, "eval/gen_gain_vs_base/ci_high": 0.001}  # the CI reaches 0: noise, held
    assert not audit(history, _rec(2, 0.113, **noisy), _cfg(tolerance=0.02)).degraded
    better = {"eval/gen_gain_vs_base": 0.02, "eval/gen_gain_vs_base/ci_high": 0.04}
    assert audit(history, _rec(2, 0.152, **better), _cfg(tolerance=0.02)).promote


def test_a_round_that_loses_understanding_is_degraded_even_when_generation_improves():
    history = [_rec(0, 0.132, True, **{"eval/und_accuracy": 0.910}), _rec(1, 0.140, True, **{"eval/und_accuracy": 0.9})]
    cpr_like = _rec(2, 0.150, **{"eval/und_accuracy": 0.775})  # better generation, understanding lost
    d = audit(history, cpr_like, _cfg())
    assert d.degraded and not d.promote and "understanding accuracy 13.5 points below the base" in d.reason
    assert audit(history, cpr_like, _cfg(max_und_drop="null")).promote  # the check switched off
    assert audit(history, _rec(2, 0.150, **{"eval/und_accuracy": 0.86}), _cfg()).promote  # 5 points: allowed
    assert audit(history, _rec(2, 0.150, **{"eval/und_accuracy": 0.859}), _cfg()).degraded
    best = {"round": 1, "eval/gen_accuracy": 0.140}
    assert audit_vs_best(1, best, 2, cpr_like, _cfg()).promote  # no base metrics given: not checked
    assert audit_vs_best(1, best, 2, cpr_like, _cfg(), base_metrics=history[0]).degraded


def test_the_audit_can_select_on_the_validation_slice_and_leave_held_out_alone():
    cfg = load_config(None, ["audit.metric=val_accuracy", "eval.validation_prompts=100"]).audit
    held_out_worse = {"eval/gen_accuracy": 0.10, "eval/gen_gain_vs_base": -0.03, "eval/gen_gain_vs_base/ci_high": -0.01}
    history = [_rec(0, 0.13, True, metric="val_accuracy", **{"eval/gen_accuracy": 0.13})]
    d = audit(history, _rec(1, 0.16, metric="val_accuracy", **held_out_worse), cfg)
    assert d.promote and d.metric == "val_accuracy" and d.delta == pytest.approx(0.03)  # held-out not read
    below = {"eval/val_gain_vs_base": -0.015, "eval/val_gain_vs_base/ci_high": -0.002}
    d = audit(history, _rec(2, 0.115, metric="val_accuracy", **below), cfg)  # within tolerance, but
    assert d.degraded and "significantly below the base" in d.reason and "-1.5 points" in d.reason


def test_best_is_the_best_promoted_round_not_the_latest():
    history = [_rec(0, 0.30, True), _rec(1, 0.40, True), _rec(2, 0.39, False)]
    d = audit(history, _rec(3, 0.395), _cfg(tolerance=0.02))
    assert d.best_round == 1 and d.best_value == pytest.approx(0.40) and not d.promote and not d.degraded
    # an unpromoted round never becomes the bar, even with a higher value
    history = [_rec(0, 0.30, True), _rec(1, 0.90, False)]
    assert audit(history, _rec(2, 0.31), _cfg()).promote


def test_co_degradation_needs_the_internal_gap_to_shrink():
    history = [_rec(0, 0.50, True, **{"eval/nonunified": 0.40})]
    co = audit(history, _rec(1, 0.40, **{"eval/nonunified": 0.20}), _cfg())
    plain = audit(history, _rec(1, 0.40, **{"eval/nonunified": 0.45}), _cfg())
    assert co.degraded and co.co_degraded and "CO-DEGRADATION" in co.reason
    assert plain.degraded and not plain.co_degraded
    assert flat_record({"audit": co})["audit/co_degraded"] is True and co.as_dict()["reason"] == co.reason


def test_win_rate_metric_base_is_neutral_and_no_disagreement_ties():
    cfg = _cfg(metric="und_win_rate", tolerance=0.05)
    base = _rec(0, float("nan"), True, metric="und_win_rate")
    assert audit([base], _rec(1, 0.6, metric="und_win_rate"), cfg).best_value == 0.5
    nan = audit([base], _rec(1, float("nan"), metric="und_win_rate"), cfg)
    assert nan.promote and nan.value == 0.5  # verdicts identical to the base: a tie
    assert audit([base], _rec(1, 0.40, metric="und_win_rate"), cfg).degraded


def test_nested_records_and_missing_metric():
    history = [{"round": 0, "metrics": {"eval/gen_accuracy": 0.2}, "audit": {"promote": True}}]
    assert audit(history, {"round": 1, "metrics": {"eval/gen_accuracy": 0.25}}, _cfg()).promote
    with pytest.raises(ValueError, match="eval/gen_accuracy"):
        audit(history, {"round": 1}, _cfg())


def test_audit_vs_best_matches_audit_on_history():
    history = [_rec(0, 0.30, True), _rec(1, 0.40, True), _rec(2, 0.35, False)]
    via_history = audit(history, _rec(3, 0.385), _cfg())
    direct = audit_vs_best(1, {"eval/gen_accuracy": 0.40}, 3, {"eval/gen_accuracy": 0.385}, _cfg())
    assert via_history == direct and not direct.promote and not direct.degraded
    assert audit_vs_best(None, None, 0, {"eval/gen_accuracy": 0.3}, _cfg()).promote
    # the driver's nested record shape: {"round", "decision", "metrics"}
    nested = [{"round": 0, "decision": {"promote": True}, "metrics": {"eval/gen_accuracy": 0.3}}]
    assert audit(nested, {"round": 1, "metrics": {"eval/gen_accuracy": 0.2}}, _cfg()).degraded


def test_reason_mentions_noise_when_best_is_inside_the_ci():
    cand = _rec(1, 0.52, **{"eval/gen_accuracy/ci_low": 0.45, "eval/gen_accuracy/ci_high": 0.58,
                            "eval/gen_accuracy/n": 200})
    d = audit([_rec(0, 0.50, True)], cand, _cfg())
    assert d.promote and "within noise" in d.reason and "n=200" in d.reason


# ------------------------------------------------------------------------------- external judges

@pytest.fixture(scope="module")
def clean_renders():
    specs = heldout_prompts()[:40]
    rng = np.random.default_rng(0)
    return [Image.fromarray(render(sample_scene(s, rng))) for s in specs], [s.text for s in specs]


def test_oracle_accepts_clean_renders_and_inverted_rejects_them(clean_renders):
    images, prompts = clean_renders
    assert OracleJudge().verdicts(images, prompts) == [True] * len(images)
    assert InvertedJudge(OracleJudge()).verdicts(images, prompts) == [False] * len(images)
    assert make_external_judge(_cfg(backend="oracle")).name == "oracle"


def test_random_judge_is_deterministic_and_mixed(clean_renders):
    images, prompts = clean_renders
    a, b = RandomJudge(3).verdicts(images, prompts), RandomJudge(3).verdicts(images, prompts)
    assert a == b and 0 < sum(a) < len(a)


def test_vlm_judge_janus_route_answers_the_prob_question(clean_renders):
    images, prompts = clean_renders
    judge = VLMJudge("tiny", device="cpu", batch_size=16)
    out = judge.verdicts(images[:20], prompts[:20])
    assert judge.janus and len(out) == 20 and all(isinstance(v, bool) for v in out)


def test_vlm_judge_generic_transformers_route_matches_the_janus_route(tmp_path, clean_renders):
    """A saved Janus dir through AutoProcessor + AutoModelForImageTextToText gives the same P(Yes)."""
    from models.loading import load_model, save_model

    save_model(load_model("tiny"), tmp_path)
    images, prompts = clean_renders[0][:6], clean_renders[1][:6]
    janus, generic = VLMJudge(str(tmp_path), device="cpu"), VLMJudge(str(tmp_path), device="cpu", use_janus=False)
    assert janus.janus and not generic.janus
    want = janus.model.judge(images, prompts, mode="prob").score
    assert generic._p_yes_hf(images, prompts) == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------------------- evaluation

EVAL = EvalSection(num_prompts=6, num_images=2, understanding_pairs=10, seed=5)


@pytest.fixture(scope="module")
def prompts():
    rows, _ = load_prompts("shapes", split="heldout")
    return rows


@pytest.fixture(scope="module")
def base_eval(prompts):
    from models.loading import load_model

    return evaluate_round(load_model("tiny"), OracleJudge(), prompts, EVAL, judge_mode="prob")


def test_evaluate_round_keys_n_and_cis(base_eval):
    metrics, samples = base_eval
    for name in HEADLINE:
        for suffix in ("", "/ci_low", "/ci_high", "/n", "/k"):
            assert f"eval/{name}{suffix}" in metrics, name + suffix
    assert metrics["eval/gen_accuracy/n"] == 12 and metrics["eval/und_accuracy/n"] == 10
    assert metrics["eval/nonunified/n"] + metrics["eval/nonunified/invalid"] == 12
    assert metrics["eval/und_win_rate/n"] == 0 and math.isnan(metrics["eval/und_win_rate"])
    for name, value in metrics.items():
        if f"{name}/ci_low" in metrics and not math.isnan(value):
            assert metrics[f"{name}/ci_low"] <= value <= metrics[f"{name}/ci_high"], name
    cats = set(samples.loc[samples["kind"] == "generation", "category"])
    assert all(f"eval/gen_accuracy/{c}" in metrics for c in cats)
    gen = samples[samples["kind"] == "generation"]
    assert len(gen) == 12 and gen["prompt_id"].nunique() == 6
    und = samples[samples["kind"] == "understanding"]
    assert len(und) == 10 and und["external_verdict"].sum() == 5  # balanced, exact labels
    assert set(und["label_source"]) == {"exact/vq"}


def test_evaluate_round_is_deterministic(base_eval, prompts):
    from models.loading import load_model

    metrics, samples = evaluate_round(load_model("tiny"), OracleJudge(), list(reversed(prompts)), EVAL,
                                      judge_mode="prob")
    pd.testing.assert_frame_equal(samples, base_eval[1])
    assert metrics.keys() == base_eval[0].keys()
    assert all(metrics[k] == base_eval[0][k] or (math.isnan(metrics[k]) and math.isnan(base_eval[0][k]))
               for k in metrics)


def test_inverted_external_judge_flips_generation_accuracy(base_eval, prompts):
    from models.loading import load_model

    metrics, _ = evaluate_round(load_model("tiny"), InvertedJudge(OracleJudge()), prompts, EVAL,
                                judge_mode="prob")
    assert metrics["eval/gen_accuracy"] == pytest.approx(1 - base_eval[0]["eval/gen_accuracy"])


def test_later_round_reuses_the_base_pairs_and_gets_a_win_rate(base_eval, prompts):
    from models.loading import load_model

    metrics, samples = evaluate_round(load_model("tiny:1"), OracleJudge(), prompts, EVAL,
                                      judge_mode="prob", base_verdicts=base_eval[1])
    again = evaluate_round(load_model("tiny:1"), OracleJudge(), prompts, EVAL, judge_mode="prob",
                           base_pairs=base_eval.pairs)  # only the pairs, as the driver stores them
    assert again.metrics["eval/und_win_rate/n"] == metrics["eval/und_win_rate/n"]
    assert set(base_eval.pairs["kind"]) == {"understanding"} and len(base_eval.pairs) == 10
    und, base_und = (s[s["kind"] == "understanding"].reset_index(drop=True) for s in (samples, base_eval[1]))
    assert list(und["png"]) == list(base_und["png"]) and list(und["prompt"]) == list(base_und["prompt"])
    differ = und["own_verdict"] != base_und["own_verdict"]
    assert metrics["eval/und_win_rate/n"] == differ.sum()
    wins = (differ & (und["own_verdict"] == und["external_verdict"])).sum()
    assert metrics["eval/und_win_rate/k"] == wins


def test_win_rate_by_hand():
    # 6 pairs; base and current differ on pairs 1, 2, 4, 5; current is right (== label) on 1, 2, 5
    frame = lambda verdicts: pd.DataFrame({  # noqa: E731
        "sample_index": range(6), "prompt": list("abcdef"), "category": ["x", "x", "x", "y", "y", "y"],
        "own_verdict": verdicts, "external_verdict": [True, True, False, False, True, True]})
    base = frame([True, False, True, False, False, False])
    cur = frame([True, True, False, False, True, True])
    cur.loc[4, "own_verdict"], cur.loc[4, "external_verdict"] = True, False  # differs, wrong
    overall, per_cat = und_win_rate(cur, base)
    assert (overall.k, overall.n) == (3, 4) and overall.rate == 0.75
    assert (per_cat["x"].k, per_cat["x"].n) == (2, 2) and (per_cat["y"].k, per_cat["y"].n) == (1, 2)
    assert overall.low < 0.75 < overall.high
    assert und_win_rate(base, base)[0].n == 0 and math.isnan(und_win_rate(base, base)[0].rate)
    with pytest.raises(ValueError, match="differ"):
        und_win_rate(cur, base.iloc[:5])


def test_paired_gain_of_an_evaluation_against_itself_and_an_inverted_judge(base_eval, prompts):
    from models.loading import load_model
    from pipelines.evaluate import paired_gain

    _, samples = base_eval
    same = paired_gain(samples, samples, "gain")
    assert (same["eval/gain"], same["eval/gain/ci_low"], same["eval/gain/ci_high"]) == (0.0, 0.0, 0.0)
    assert same["eval/gain/n"] == 6
    _, inverted = evaluate_round(load_model("tiny"), InvertedJudge(OracleJudge()), prompts, EVAL, judge_mode="prob")
    flipped = paired_gain(inverted, samples, "gain")
    acc = base_eval[0]["eval/gen_accuracy"]
    assert flipped["eval/gain"] == pytest.approx((1 - acc) - acc)  # = the accuracy difference
    assert flipped["eval/gain/ci_low"] <= flipped["eval/gain"] <= flipped["eval/gain/ci_high"]
    used = [r for r in prompts if r["prompt_id"] in set(samples["prompt_id"])]  # the same 6 prompts
    other_seeds = evaluate_round(load_model("tiny"), OracleJudge(), used,
                                 EvalSection(num_prompts=6, num_images=2, understanding_pairs=0, seed=6),
                                 judge_mode="prob").samples
    with pytest.raises(ValueError, match="different seeds"):
        paired_gain(other_seeds, samples, "gain")
    with pytest.raises(ValueError, match="no held-out prompt in common"):
        paired_gain(samples[samples["prompt_id"] == used[0]["prompt_id"]],
                    samples[samples["prompt_id"] != used[0]["prompt_id"]], "gain")


def test_second_verdict_column_and_metrics(base_eval):
    from pipelines.evaluate import paired_gain
    from pipelines.shapes_checks import second_verdict

    samples, metrics = second_verdict(base_eval[1])
    gen = samples["kind"] == "generation"
    assert (samples.loc[gen, "second_verdict"].isin([0.0, 1.0]).all()
            and samples.loc[~gen, "second_verdict"].isna().all())
    assert metrics["eval/gen_accuracy_second/n"] == 12 and metrics["eval/verdict_agreement/n"] == 12
    agree = (samples.loc[gen, "second_verdict"] == samples.loc[gen, "external_verdict"].astype(float)).mean()
    assert metrics["eval/verdict_agreement"] == pytest.approx(agree)
    assert paired_gain(samples, samples, "g", verdict="second_verdict")["eval/g"] == 0.0
