"""Pools, SFT set, DPO pairs, discard pool, Nonunified score, corrupted judge, Wilson CIs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipelines.pools import (as_frame, assign_pools, corrupt_scores, discard_pool, dpo_pairs,
                             nonunified_score, oracle_scores, sft_set)
from pipelines.schemas import check_table
from pipelines.stats import diff_ci, paired_bootstrap, rate, wilson_ci


def judged(pid, scores, category="single", valid=None, round_=1):
    valid = valid or [True] * len(scores)
    return [dict(prompt_id=pid, prompt=f"prompt {pid}", category=category, round=round_, sample_index=i,
                 seed=100 + i, image_tokens=[i, i + 1], png=b"png", score=s, valid=v,
                 answer="" if v else "garbled") for i, (s, v) in enumerate(zip(scores, valid))]


@pytest.fixture
def pooled():
    rows = (judged("a", [0.9, 0.7, 0.2, 0.1])            # 2 accepted, 2 rejected
            + judged("b", [0.5, 0.3, float("nan")], valid=[True, True, False], category="counting")
            + judged("c", [0.65, 0.55]))                  # 1 accepted, 0 rejected
    return assign_pools(rows, accept_threshold=0.6, reject_threshold=0.4)


def test_assign_pools(pooled):
    assert list(pooled["pool"]) == ["accepted", "accepted", "rejected", "rejected",
                                    "uncertain", "rejected", "uncertain",   # invalid -> uncertain
                                    "accepted", "uncertain"]
    assert set(pooled["label_source"]) == {"judge"}
    check_table(pooled, "pooled", "pool")


def test_assign_pools_boundaries_and_binary():
    rows = judged("a", [0.6, 0.4, 1.0, 0.0])
    assert list(assign_pools(rows, 0.6, 0.4)["pool"]) == ["accepted", "rejected", "accepted", "rejected"]
    assert list(assign_pools(rows, 0.5, 0.5)["pool"]) == ["accepted", "rejected", "accepted", "rejected"]
    assert list(assign_pools(judged("a", [0.5]), 0.5, 0.5)["pool"]) == ["accepted"]  # accept first
    with pytest.raises(ValueError):
        assign_pools(rows, 0.3, 0.6)


def test_inputs_are_not_modified(pooled):
    before = pooled.copy()
    dpo_pairs(pooled, "all", 0.0, 10, seed=0)
    sft_set(pooled)
    corrupt_scores(pooled, "inverted", seed=0)
    pd.testing.assert_frame_equal(pooled, before)


def test_discard_pool(pooled):
    out = discard_pool(pooled)
    assert list(out["prompt_id"]) == ["b"]
    assert out.iloc[0]["num_samples"] == 3 and out.iloc[0]["best_score"] == 0.5


def test_sft_set(pooled):
    out = sft_set(pooled)
    assert list(zip(out["prompt_id"], out["sample_index"])) == [("a", 0), ("a", 1), ("c", 0)]
    check_table(out, "sft", "pool")


def test_sft_best_of_n_keeps_the_top_sample_per_prompt_and_any_above_the_bar():
    rows = judged("a", [0.7, 0.95, 0.8, 0.92]) + judged("b", [0.65, 0.65, 0.2]) + judged("c", [0.1])
    pooled = assign_pools(rows, accept_threshold=0.6, reject_threshold=0.4)
    out = sft_set(pooled, "best_of_n", keep_above=0.9)
    # a: the best (0.95) plus 0.92 > 0.9; b: one of two tied tops (the first); c: nothing accepted
    assert list(zip(out["prompt_id"], out["sample_index"])) == [("a", 1), ("a", 3), ("b", 0)]
    assert len(sft_set(pooled, "all")) == 6
    check_table(out, "sft", "pool")
    with pytest.raises(ValueError):
        sft_set(pooled, "top3")


def test_oracle_scores_replace_the_judge_and_keep_its_score(pooled):
    verdicts = [i % 2 == 0 for i in range(len(pooled))]
    out = oracle_scores(pooled, verdicts)
    assert out["score"].tolist() == [float(v) for v in verdicts] and out["valid"].all()
    assert out["uncorrupted_score"].tolist()[:2] == [0.9, 0.7]
    with pytest.raises(ValueError, match="verdicts"):
        oracle_scores(pooled, verdicts[:-1])


def test_paired_bootstrap_is_tighter_than_independent_intervals():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, 200)  # per-prompt accuracy varies a lot between prompts
    a, b = np.clip(difficulty + 0.02, 0, 1), difficulty  # a is (almost) uniformly 2 points better
    d, lo, hi = paired_bootstrap(a, b, seed=1)
    assert d == pytest.approx(np.mean(a - b)) and lo > 0.0 and hi - lo < 0.01
    _, ilo, ihi = diff_ci(int(a.sum() * 16), 3200, int(b.sum() * 16), 3200)
    assert ilo < 0.0 < ihi  # two independent intervals cannot resolve it
    same = paired_bootstrap(b, b)
    assert same == (0.0, 0.0, 0.0)
    assert math.isnan(paired_bootstrap([], [])[0])


def test_best_worst_pairs(pooled):
    pairs = dpo_pairs(pooled, "best_worst", margin=0.0, max_pairs_per_prompt=4, seed=0)
    # a: best accepted 0.9 (index 0) vs worst rejected 0.1 (index 3); b: no accepted; c: no rejected
    assert pairs[["prompt_id", "chosen_index", "rejected_index"]].values.tolist() == [["a", 0, 3]]
    assert pairs.iloc[0]["chosen_score"] == 0.9 and pairs.iloc[0]["rejected_score"] == 0.1
    assert list(pairs.iloc[0]["chosen_tokens"]) == [0, 1] and list(pairs.iloc[0]["rejected_tokens"]) == [3, 4]
    check_table(pairs, "pair", "pool")
    assert dpo_pairs(pooled, "best_worst", margin=0.81, max_pairs_per_prompt=1, seed=0).empty
    assert len(dpo_pairs(pooled, "best_worst", margin=0.8, max_pairs_per_prompt=1, seed=0)) == 1
    assert dpo_pairs(pooled, "best_worst", margin=0.0, max_pairs_per_prompt=0, seed=0).empty


def test_all_pairs_margin_and_cap(pooled):
    pairs = dpo_pairs(pooled, "all", margin=0.0, max_pairs_per_prompt=10, seed=0)
    assert sorted(map(tuple, pairs[["chosen_index", "rejected_index"]].values.tolist())) == [
        (0, 2), (0, 3), (1, 2), (1, 3)]
    gaps = dpo_pairs(pooled, "all", margin=0.65, max_pairs_per_prompt=10, seed=0)
    # gaps: (0,2) 0.7, (0,3) 0.8, (1,2) 0.5, (1,3) 0.6 -> only the first two reach 0.65
    assert gaps[["chosen_index", "rejected_index"]].values.tolist() == [[0, 3], [0, 2]]  # widest first
    capped = dpo_pairs(pooled, "all", margin=0.0, max_pairs_per_prompt=2, seed=3)
    assert len(capped) == 2
    again = dpo_pairs(pooled.iloc[::-1], "all", margin=0.0, max_pairs_per_prompt=2, seed=3)
    assert capped.drop(columns=["chosen_tokens", "rejected_tokens"]).equals(
        again.drop(columns=["chosen_tokens", "rejected_tokens"]))  # row order does not matter
    seeds = {tuple(map(tuple, dpo_pairs(pooled, "all", 0.0, 2, seed=s)[["chosen_index", "rejected_index"]]
                   .values.tolist())) for s in range(20)}
    assert len(seeds) > 1  # the seed does choose


def test_human_labels_count_as_hard_scores():
    rows = assign_pools(judged("a", [0.55, 0.45]), 0.6, 0.4)  # both uncertain
    rows.loc[0, ["pool", "label_source"]] = ["accepted", "human"]
    rows.loc[1, ["pool", "label_source"]] = ["rejected", "human"]
    pairs = dpo_pairs(rows, "best_worst", margin=0.5, max_pairs_per_prompt=1, seed=0)
    assert pairs[["chosen_score", "rejected_score"]].values.tolist() == [[1.0, 0.0]]


def test_nonunified_score_hand_computed():
    rows = (judged("a", [1.0, 0.0, 0.0, 1.0], category="single")
            + judged("b", [0.2, 0.7, float("nan")], valid=[True, True, False], category="counting"))
    score = nonunified_score(rows)
    assert (score.overall.k, score.overall.n, score.invalid) == (3, 6, 1)
    assert score.overall.rate == 0.5
    assert (score.overall.low, score.overall.high) == pytest.approx(wilson_ci(3, 6))
    assert score.per_category["single"].k == 2 and score.per_category["single"].n == 4
    assert score.per_category["counting"].k == 1 and score.per_category["counting"].n == 2
    assert score.invalid_per_category == {"counting": 1, "single": 0}
    metrics = score.to_metrics()
    assert metrics["nonunified/rate"] == 0.5 and metrics["nonunified/counting/n"] == 2
    assert math.isnan(nonunified_score([]).overall.rate)


def test_corrupt_scores():
    rows = judged("a", [0.9, 0.2, float("nan")], valid=[True, True, False])
    inv = corrupt_scores(rows, "inverted", seed=0)
    assert inv["score"].tolist()[:2] == pytest.approx([0.1, 0.8]) and math.isnan(inv["score"][2])
    assert inv["uncorrupted_score"].tolist()[:2] == [0.9, 0.2]
    r1, r2 = corrupt_scores(rows, "random", seed=1), corrupt_scores(rows[::-1], "random", seed=1)
    assert r1["score"][:2].tolist() == r2["score"].tolist()[::-1][:2]  # deterministic, order-free
    assert corrupt_scores(rows, "random", seed=2)["score"][:2].tolist() != r1["score"][:2].tolist()
    assert math.isnan(r1["score"][2])
    binary = corrupt_scores(judged("b", [1.0, 0.0] * 20), "random", seed=0)["score"]
    assert set(binary) == {0.0, 1.0}  # binary judge -> binary random scores
    assert corrupt_scores(rows, "none", seed=0)["score"].tolist()[:2] == [0.9, 0.2]
    with pytest.raises(ValueError):
        corrupt_scores(rows, "flipped", seed=0)


def test_list_and_frame_inputs_agree():
    rows = judged("a", [0.9, 0.1])
    a = assign_pools(rows, 0.6, 0.4)
    b = assign_pools(as_frame(rows), 0.6, 0.4)
    assert a["pool"].tolist() == b["pool"].tolist()


def test_wilson_hand_computed():
    assert wilson_ci(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_ci(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    assert rate(1, 4).rate == 0.25
    with pytest.raises(ValueError):
        wilson_ci(3, 2)


def test_diff_ci_newcombe():
    # Newcombe (1998) Table II example: 56/70 vs 48/80 -> 0.2, 95% CI (0.0524, 0.3339)
    d, lo, hi = diff_ci(56, 70, 48, 80)
    assert d == pytest.approx(0.2) and (lo, hi) == pytest.approx((0.0524, 0.3339), abs=1e-3)
    d, lo, hi = diff_ci(5, 10, 5, 10)
    assert d == 0 and lo < 0 < hi
    assert np.isnan(diff_ci(1, 0, 1, 2)[0])


def test_category_cap_keeps_the_top_scored_rows_of_an_over_represented_category():
    from pipelines.pools import cap_categories

    rows = pd.DataFrame({"category": ["spatial"] * 10 + ["counting"] * 3 + ["single"] * 2,
                         "score": [0.95 - 0.01 * i for i in range(10)] + [0.7, 0.8, 0.9, 0.61, 0.99],
                         "pool": "accepted", "label_source": "judge"})
    out = cap_categories(rows, 0.4)
    share = out["category"].value_counts(normalize=True)
    assert share.max() <= 0.4 + 1e-9 and len(out) == 8  # 3 spatial + 3 counting + 2 single
    assert sorted(out.loc[out["category"] == "spatial", "score"], reverse=True) == pytest.approx([0.95, 0.94, 0.93])
    assert list(out.index) == sorted(out.index)  # row order kept
    only_two = rows[rows["category"] != "single"]
    assert cap_categories(only_two, 0.4)["category"].value_counts().to_dict() == {"spatial": 3, "counting": 3}
    assert cap_categories(rows, 1.0).equals(rows)


def test_graded_scores_bin_p_yes_and_keep_binary_and_invalid_scores():
    from pipelines.pools import grade_scores

    rows = [dict(score=s, valid=v) for s, v in ((0.349, True), (0.351, True), (1.0, True), (0.0, True),
                                                 (float("nan"), False))]
    graded = grade_scores(rows, 10)["score"].tolist()
    assert graded[:4] == [0.3, 0.4, 1.0, 0.0] and graded[4] != graded[4]  # NaN stays NaN
    assert grade_scores(rows, 1)["score"].tolist()[:4] == [0.0, 0.0, 1.0, 0.0]  # one bin edge: a yes/no verdict
    assert grade_scores(rows, 0)["score"].tolist()[:4] == [0.349, 0.351, 1.0, 0.0]
    with pytest.raises(ValueError):
        grade_scores(rows, -1)


def reference_pairs(pooled, strategy, margin, max_pairs_per_prompt, seed):
    """dpo_pairs' docstring, one prompt at a time, as plain loops (the spec the vectorised one meets)."""
    from pipelines.pools import _effective_score, _hash32

    df = as_frame(pooled).sort_values(["prompt_id", "round", "sample_index"], kind="stable")
    df["_eff"] = _effective_score(df)
    out = []
    for pid, g in df.groupby("prompt_id", sort=True):
        chosen = g[g["pool"] == "accepted"].sort_values("_eff", ascending=False, kind="stable")
        rejected = g[g["pool"] == "rejected"].sort_values("_eff", kind="stable")
        cand = [(c, r) for _, c in chosen.iterrows() for _, r in rejected.iterrows()]
        if strategy == "best_worst":
            cand = cand[:1] and [(chosen.iloc[0], rejected.iloc[0])]
        cand = [(c, r) for c, r in cand if c["_eff"] - r["_eff"] >= margin]
        if len(cand) > max_pairs_per_prompt:
            rng = np.random.default_rng([seed, _hash32(str(pid))])
            cand = [cand[i] for i in sorted(rng.choice(len(cand), size=max_pairs_per_prompt, replace=False))]
        out += [(pid, int(c["sample_index"]), int(r["sample_index"]), float(c["_eff"]), float(r["_eff"]))
                for c, r in cand]
    return out


@pytest.mark.parametrize("strategy,margin,cap", [("best_worst", 0.0, 1), ("best_worst", 0.5, 3), ("all", 0.0, 100),
                                                 ("all", 0.2, 3)])
def test_pairs_match_the_per_prompt_spec_on_random_pools(strategy, margin, cap):
    rng = np.random.default_rng(7)
    rows = [dict(prompt_id=f"p{rng.integers(0, 40):02d}", prompt="x", category="c", round=1, sample_index=i,
                 image_tokens=[i], score=float(rng.choice([0.1, 0.3, 0.3, 0.7, 0.9, 0.9])), valid=True)
            for i in range(400)]
    pooled = assign_pools(pd.DataFrame(rows).sample(frac=1, random_state=1), 0.6, 0.4)
    pooled.loc[pooled.index[:20], "label_source"] = "human"  # labels count as 1.0 / 0.0
    got = dpo_pairs(pooled, strategy, margin, cap, seed=3)
    want = reference_pairs(pooled, strategy, margin, cap, seed=3)
    assert len(want) >= 20
    assert list(zip(got["prompt_id"], got["chosen_index"], got["rejected_index"], got["chosen_score"],
                    got["rejected_score"])) == want
    assert got["chosen_tokens"].map(list).tolist() == [[c] for _, c, _, _, _ in want]
