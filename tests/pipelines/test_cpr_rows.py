"""CPR rows from a round's pools (pipelines/cpr.py): what each kind holds, how many, which samples."""

from __future__ import annotations

import pandas as pd
import pytest

from models.base import DESCRIBE_QUESTION, JUDGE_SYSTEM, PROB_QUESTION
from pipelines.config import load_config
from pipelines.cpr import CAPTION_QUESTION, CprSection, cpr_rows, reflection_pairs


def pooled(mode: str = "prob") -> pd.DataFrame:
    """3 prompts x 4 samples: p0 scores 0.95 / 0.8 / 0.3 / 0.1, p1 all low, p2 has an invalid sample."""
    scores = {"p0": [0.95, 0.8, 0.3, 0.1], "p1": [0.2, 0.1, 0.15, 0.05], "p2": [0.9, 0.85, 0.7, float("nan")]}
    rows = []
    for pid, ss in scores.items():
        for i, s in enumerate(ss):
            pool = "uncertain" if s != s else "accepted" if s >= 0.7 else "rejected" if s <= 0.3 else "uncertain"
            rows.append(dict(prompt_id=pid, prompt=f"prompt {pid}", sample_index=i, image_tokens=[i, len(rows)],
                             score=s, valid=s == s, answer=f"desc {pid} {i}", judge_mode=mode, pool=pool))
    return pd.DataFrame(rows)


def test_caption_rows_are_accepted_images_with_their_prompt():
    out = cpr_rows(pooled(), 10, CprSection(caption=1.0), seed=0)
    assert set(out["kind"]) == {"caption"}
    assert len(out) == 5  # all 5 accepted samples (10 wanted, 5 exist)
    df = pooled()
    accepted = set(map(tuple, df.loc[df["pool"] == "accepted", ["prompt_id", "sample_index"]].values))
    assert set(map(tuple, out[["prompt_id", "sample_index"]].values)) == accepted
    assert (out["question"] == CAPTION_QUESTION).all()
    assert (out["target"] == " " + out["prompt"] + "<|end_of_sentence|>").all()


@pytest.mark.parametrize("mode", ["prob", "binary", "describe_prob"])
def test_judgement_rows_teach_the_pools_verdict_in_the_judges_own_words(mode):
    df = pooled(mode)
    out = cpr_rows(df, 4, CprSection(judgement=1.0), seed=0)
    assert len(out) == 4 and set(out["kind"]) == {"judgement"}
    merged = out.merge(df, on=["prompt_id", "sample_index"], suffixes=("", "_pool"))
    assert set(merged["pool"]) == {"accepted", "rejected"}  # never uncertain
    assert (merged["pool"] == "accepted").sum() == 2  # balanced yes / no
    for r in merged.itertuples():
        yes = r.pool == "accepted"
        if mode == "prob":
            assert (r.question, r.target) == (PROB_QUESTION.format(prompt=r.prompt), " Yes" if yes else " No")
            assert r.system == ""
        elif mode == "binary":
            assert r.system == JUDGE_SYSTEM and r.target == f" The score is {int(yes)}<|end_of_sentence|>"
        else:  # the judge's own description, then the verdict
            assert r.question == DESCRIBE_QUESTION.format(prompt=r.prompt)
            assert r.target == f" {r.answer} . Answer : {'Yes' if yes else 'No'}"


def test_judgement_rows_fill_from_the_other_verdict_when_one_runs_short():
    df = pooled()
    out = cpr_rows(df, 9, CprSection(judgement=1.0), seed=0)  # 5 accepted, 6 rejected exist
    verdicts = out.merge(df, on=["prompt_id", "sample_index"])["pool"].value_counts().to_dict()
    assert verdicts == {"rejected": 5, "accepted": 4}
    assert len(cpr_rows(df, 20, CprSection(judgement=1.0), seed=0)) == 11  # every candidate, no repeats


def test_reflection_pairs_need_a_high_best_and_a_wide_gap():
    pairs = reflection_pairs(pooled(), best_at_least=0.9, gap=0.3)
    assert pairs[["prompt_id", "best_index", "worst_index"]].values.tolist() == [["p0", 0, 3]]  # p1 too low
    assert reflection_pairs(pooled(), 0.9, 0.9).empty  # p0's gap is 0.85
    loose = reflection_pairs(pooled(), 0.8, 0.1)  # p2 qualifies too; its NaN sample is never a source
    assert loose[["prompt_id", "best_index", "worst_index"]].values.tolist() == [["p0", 0, 3], ["p2", 0, 2]]
    out = cpr_rows(pooled(), 10, CprSection(reflection=1.0, reflection_best=0.9, reflection_gap=0.3), seed=0)
    df = pooled()
    assert out[["kind", "prompt_id"]].values.tolist() == [["reflection", "p0"]]
    assert list(out.iloc[0]["image_tokens"]) == list(df.iloc[0]["image_tokens"])  # the best is the target
    assert list(out.iloc[0]["source_tokens"]) == list(df.iloc[3]["image_tokens"])  # the worst is the input


def test_min_score_keeps_only_confident_positives():
    df = pooled()
    out = cpr_rows(df, 20, CprSection(caption=1.0, judgement=1.0, min_score=0.9), seed=0)
    merged = out.merge(df, on=["prompt_id", "sample_index"])
    judged = merged[merged["kind"] == "judgement"]
    captions, yes = merged[merged["kind"] == "caption"], judged[judged["pool"] == "accepted"]
    assert set(captions["score"]) == {0.95, 0.9} and set(yes["score"]) == {0.95, 0.9}  # p0#0 and p2#0 only
    assert (judged["pool"] == "rejected").sum() == 6  # no rows are not filtered


def test_counts_follow_the_shares_and_the_draw_is_seeded():
    cfg = CprSection(caption=0.3, judgement=0.5, reflection=0.2)
    out = cpr_rows(pooled(), 10, cfg, seed=1)
    assert out["kind"].value_counts().to_dict() == {"caption": 3, "judgement": 5, "reflection": 1}
    assert out.equals(cpr_rows(pooled(), 10, cfg, seed=1))
    assert any(not cpr_rows(pooled(), 10, cfg, seed=s).equals(out) for s in range(2, 6))
    assert cpr_rows(pooled(), 10, CprSection(), seed=0).empty and not CprSection().enabled()


def test_cpr_config_is_checked():
    cfg = load_config(None, ["cpr.caption=1.0", "cpr.judgement=0.6", "cpr.reflection=0.2"])
    assert cfg.cpr.enabled() and cfg.cpr.weight == 1.0
    for bad in ("cpr.caption=-1", "cpr.weight=0", "cpr.reflection_gap=2", "cpr.judgment=1"):
        with pytest.raises(ValueError, match="cpr"):
            load_config(None, [bad])
