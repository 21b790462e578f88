"""CPR (UniCorn's Cognitive Pattern Reconstruction, arXiv 2601.03193): caption, judgement and
reflection rows built from a round's pools, trained in the same Ray Train job as its image rows.

Where it fits: the pool stage calls `cpr_rows` when a `cpr.*` share is > 0 and stores the rows as its
`cpr` table (the `kind` column names each row's kind); the train stage hands them to
`trainers.train.train_adapter(..., aux=...)`, which adds their loss to every micro-batch
(trainers/cpr.py: understanding loss for caption and judgement rows, image-conditioned generation
for reflection rows).

Kinds (UniCorn's mix: 5k text-to-image : 5k caption : 3k judgement : 1k reflection):
- caption: an accepted own image (scoring >= min_score) -> its prompt, asked CAPTION_QUESTION. Not
  "Describe the image.": in the shapes world that question has a fixed cell-by-cell answer, which the
  describe_prob judge and UniCycle parse, and a prompt is not in that form.
- judgement: an accepted or rejected own image + the judge question of the mode it was judged in ->
  the pool's verdict (accepted: yes, rejected: no), in the exact text the judge reads
  (`models.base.judge_row`; describe_prob rows keep the judge's own description). Drawn balanced
  between yes and no where both exist. Uncertain samples give none; yes rows, like captions, only
  come from accepted samples scoring >= min_score. Why: on the shapes model with the prob judge only
  about half the accepted samples (score >= 0.6) are right by the oracle, against ~94 % of those
  scoring >= 0.99 and ~99 % of the rejected ones being wrong (README, Experiment 6).
- reflection: per prompt, its lowest-scored image -> its highest-scored one, kept where
  best >= reflection_best and best - worst >= reflection_gap (UniCorn: best >= 9, gap >= 3 of 10).
Counts: each kind's share x the round's generation rows (SFT rows or DPO pairs), drawn without
replacement, seeded (all candidates when there are fewer).

Example:
    >>> import pandas as pd
    >>> pooled = pd.DataFrame({"prompt_id": ["p", "p"], "prompt": ["a red circle"] * 2, "sample_index": [0, 1],
    ...     "image_tokens": [[1, 2], [3, 4]], "score": [0.95, 0.1], "valid": [True, True], "answer": ["", ""],
    ...     "judge_mode": ["prob", "prob"], "pool": ["accepted", "rejected"]})
    >>> rows = cpr_rows(pooled, 2, CprSection(caption=0.5, judgement=1.0, reflection=0.5), seed=0)
    >>> rows[["kind", "sample_index"]].values.tolist()
    [['caption', 0], ['judgement', 0], ['judgement', 1], ['reflection', 0]]
    >>> rows["target"].tolist()[:3]
    [' a red circle<|end_of_sentence|>', ' Yes', ' No']
    >>> rows.loc[rows["kind"] == "reflection", "source_tokens"].tolist()
    [[3, 4]]
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.typed_config import Section
from pipelines.typed_config import doc_field as _f

CAPTION_QUESTION = "Which prompt was this image drawn from?"
COLUMNS = ["kind", "prompt_id", "prompt", "sample_index", "question", "target", "system", "image_tokens",
           "source_tokens"]


class CprSection(Section):
    caption: float = _f(0.0, "Caption rows per image-training row (UniCorn: 1.0): an accepted own image -> "
                        "its prompt.", ge=0, le=10)
    judgement: float = _f(0.0, "Judgement rows per image-training row (UniCorn: 0.6): own image + judge "
                          "question -> its pool's verdict.", ge=0, le=10)
    reflection: float = _f(0.0, "Reflection rows per image-training row (UniCorn: 0.2): a prompt's worst "
                           "image -> its best.", ge=0, le=10)
    reflection_best: float = _f(0.9, "A reflection pair needs best score >= this.", ge=0, le=1)
    reflection_gap: float = _f(0.3, "... and best - worst score >= this.", ge=0, le=1)
    weight: float = _f(1.0, "Weight of the CPR rows' loss beside the image loss.", gt=0)
    min_score: float = _f(0.0, "Caption and yes-judgement rows only from accepted samples scoring >= this (0: "
                          "every accepted sample).", ge=0, le=1)

    def enabled(self) -> bool:
        return self.caption > 0 or self.judgement > 0 or self.reflection > 0


def _draw(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(rows) <= n:
        return rows
    return rows.iloc[np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))]


def _confident(pooled: pd.DataFrame, min_score: float) -> pd.DataFrame:
    """Accepted samples scoring >= min_score: the ones caption and yes-judgement rows come from."""
    return pooled[(pooled["pool"] == "accepted") & (pooled["score"].astype(float) >= min_score)]


def _caption(pooled: pd.DataFrame, n: int, seed: int, min_score: float) -> list[dict]:
    acc = _draw(_confident(pooled, min_score), n, seed)
    return [dict(kind="caption", prompt_id=r.prompt_id, prompt=r.prompt, sample_index=int(r.sample_index),
                 question=CAPTION_QUESTION, target=f" {r.prompt}<|end_of_sentence|>", system="",
                 image_tokens=list(r.image_tokens), source_tokens=[]) for r in acc.itertuples()]


def _judgement(pooled: pd.DataFrame, n: int, seed: int, min_score: float) -> list[dict]:
    from models.base import judge_row  # torch: not at config-import time

    yes, no = _confident(pooled, min_score), pooled[pooled["pool"] == "rejected"]
    n_yes = min(len(yes), max(n // 2, n - len(no)))
    picked = pd.concat([_draw(yes, n_yes, seed), _draw(no, n - n_yes, seed + 1)])
    out = []
    for r in picked.itertuples():
        mode = getattr(r, "judge_mode", None) or "prob"
        q, t, system = judge_row(mode, r.prompt, str(getattr(r, "answer", "") or ""), r.pool == "accepted")
        out.append(dict(kind="judgement", prompt_id=r.prompt_id, prompt=r.prompt, sample_index=int(r.sample_index),
                        question=q, target=t, system=system or "", image_tokens=list(r.image_tokens),
                        source_tokens=[]))
    return out


def reflection_pairs(pooled: pd.DataFrame, best_at_least: float, gap: float) -> pd.DataFrame:
    """One (worst -> best) pair per prompt whose valid scores qualify: prompt_id, prompt, best_index,
    worst_index, best_score, worst_score, image_tokens (best), source_tokens (worst)."""
    df = pooled[pooled["valid"].astype(bool) & pooled["score"].notna()]
    out = []
    for pid, g in df.sort_values(["prompt_id", "sample_index"]).groupby("prompt_id", sort=True):
        best, worst = g.loc[g["score"].idxmax()], g.loc[g["score"].idxmin()]
        if best["score"] >= best_at_least and best["score"] - worst["score"] >= gap:
            out.append(dict(prompt_id=pid, prompt=best["prompt"], best_index=int(best["sample_index"]),
                            worst_index=int(worst["sample_index"]), best_score=float(best["score"]),
                            worst_score=float(worst["score"]), image_tokens=list(best["image_tokens"]),
                            source_tokens=list(worst["image_tokens"])))
    return pd.DataFrame(out)


def _reflection(pooled: pd.DataFrame, n: int, seed: int, best_at_least: float, gap: float) -> list[dict]:
    pairs = _draw(reflection_pairs(pooled, best_at_least, gap), n, seed)
    return [dict(kind="reflection", prompt_id=r.prompt_id, prompt=r.prompt, sample_index=r.best_index, question="",
                 target="", system="", image_tokens=r.image_tokens, source_tokens=r.source_tokens)
            for r in pairs.itertuples()]


def cpr_rows(pooled: pd.DataFrame, num_generation_rows: int, cpr: CprSection, seed: int) -> pd.DataFrame:
    """The round's CPR rows (COLUMNS), kind by kind, in (prompt_id, sample_index) order within a kind."""
    want = {k: int(round(getattr(cpr, k) * num_generation_rows)) for k in ("caption", "judgement", "reflection")}
    rows = (_caption(pooled, want["caption"], seed, cpr.min_score) if want["caption"] else [])
    rows += _judgement(pooled, want["judgement"], seed + 10, cpr.min_score) if want["judgement"] else []
    rows += (_reflection(pooled, want["reflection"], seed + 20, cpr.reflection_best, cpr.reflection_gap)
             if want["reflection"] else [])
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.sort_values(["kind", "prompt_id", "sample_index"], kind="stable").reset_index(drop=True)
