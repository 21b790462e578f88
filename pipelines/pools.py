"""Pools, training sets and the Nonunified score: pure functions over pandas DataFrames.

Where it fits: after the judge. `assign_pools` sorts judged samples into accepted / rejected /
uncertain; `sft_set` (Algorithm 1: keep every accepted image), `dpo_pairs` (chosen = accepted,
rejected = rejected, same prompt) and `discard_pool` (prompts with no accepted image, replayed by
the curriculum) feed training; `nonunified_score` is the paper's internal-gap metric;
`corrupt_scores` is the corrupted-judge control arm, `oracle_scores` the perfect-judge one;
`grade_scores` turns the own judge's P(Yes) into graded verdicts (judge.grades).

Convention: every function takes a DataFrame (a list of row dicts is converted) and returns a new
DataFrame; inputs are never modified. Rows follow `pipelines.schemas` (JudgedRow, PooledRow, ...).
Everything is deterministic: ties break on (round, sample_index) and random choices are seeded per
prompt, so results do not depend on row order or on the other prompts.

Example:
    >>> from pipelines.pools import assign_pools, dpo_pairs
    >>> rows = [dict(prompt_id="p", prompt="a red circle", category="single", round=1,
    ...              sample_index=i, seed=i, image_tokens=[i], png=b"", score=s, valid=True,
    ...              answer="") for i, s in enumerate([0.9, 0.1, 0.5])]
    >>> pooled = assign_pools(rows, accept_threshold=0.6, reject_threshold=0.4)
    >>> list(pooled["pool"])
    ['accepted', 'rejected', 'uncertain']
    >>> pairs = dpo_pairs(pooled, "best_worst", margin=0.0, max_pairs_per_prompt=1, seed=0)
    >>> pairs[["chosen_index", "rejected_index"]].values.tolist()
    [[0, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd

from models.seeds import stable_bits, stable_unit
from pipelines.stats import Rate, rate

NONUNIFIED_THRESHOLD = 0.5
SFT_COLUMNS = ["prompt_id", "prompt", "category", "round", "sample_index", "image_tokens", "score",
               "label_source"]
PAIR_COLUMNS = ["prompt_id", "prompt", "category", "round", "chosen_index", "rejected_index",
                "chosen_tokens", "rejected_tokens", "chosen_score", "rejected_score"]
_ORDER = ["prompt_id", "round", "sample_index"]


def as_frame(rows: Any) -> pd.DataFrame:
    """A DataFrame from a DataFrame (copied) or a list of row dicts."""
    if isinstance(rows, pd.DataFrame):
        return rows.copy()
    return pd.DataFrame(list(rows))


def assign_pools(judged: Any, accept_threshold: float, reject_threshold: float) -> pd.DataFrame:
    """Add `pool` and `label_source="judge"`: score >= accept -> accepted, <= reject -> rejected.

    Accepted is tested first, so with equal thresholds a score on the boundary is accepted.
    Invalid samples (valid=False or NaN score) go to "uncertain": the judge said nothing usable,
    so neither training set may use them, but a reviewer may.
    """
    if accept_threshold < reject_threshold:
        raise ValueError(f"accept_threshold {accept_threshold} < reject_threshold {reject_threshold}")
    df = as_frame(judged)
    score = df["score"].astype(float)
    usable = df["valid"].astype(bool) & score.notna()
    df["pool"] = np.where(usable & (score >= accept_threshold), "accepted",
                          np.where(usable & (score <= reject_threshold), "rejected", "uncertain"))
    df["label_source"] = "judge"
    return df


def discard_pool(pooled: Any) -> pd.DataFrame:
    """Prompts with no accepted sample (Algorithm 2's discard pool): prompt_id, prompt, category,
    num_samples, best_score (NaN when no valid score)."""
    df = as_frame(pooled)
    if df.empty:
        return pd.DataFrame(columns=["prompt_id", "prompt", "category", "num_samples", "best_score"])
    df["_accepted"] = df["pool"] == "accepted"
    grouped = df.groupby("prompt_id", sort=True)
    out = grouped.agg(prompt=("prompt", "first"), category=("category", "first"),
                      num_samples=("prompt_id", "size"), best_score=("score", "max"),
                      any_accepted=("_accepted", "any")).reset_index()
    return out[~out["any_accepted"]].drop(columns="any_accepted").reset_index(drop=True)


def sft_set(pooled: Any, select: Literal["all", "best_of_n"] = "all", keep_above: float = 0.9,
            category_cap: Optional[float] = None) -> pd.DataFrame:
    """Accepted samples as SFTRow columns.

    all: every accepted sample (Algorithm 1 keeps all images judged 1).
    best_of_n: per prompt the highest-scored accepted sample, plus any accepted sample scoring
    above `keep_above` -- fewer, more precise rows when the judge is noisy (SHAPES-NOTES: row
    precision 0.45 -> 0.60 on the shapes model). Human labels count as score 1.0.
    category_cap: then no category keeps more than this share of the rows (`cap_categories`).
    """
    if select not in ("all", "best_of_n"):
        raise ValueError(f"unknown SFT selection {select!r}")
    df = as_frame(pooled)
    if df.empty:
        return pd.DataFrame(columns=SFT_COLUMNS)
    kept = df[df["pool"] == "accepted"].sort_values(_ORDER, kind="stable")
    if select == "best_of_n" and not kept.empty:
        eff = _effective_score(kept)
        best = eff.groupby(kept["prompt_id"]).idxmax()  # first of the top-scored rows, per prompt
        kept = kept[kept.index.isin(best.values) | (eff > keep_above)]
    if category_cap is not None:
        kept = cap_categories(kept, category_cap)
    return kept[SFT_COLUMNS].reset_index(drop=True)


def cap_categories(rows: pd.DataFrame, cap: float) -> pd.DataFrame:
    """`rows` with no category over `cap` of the total: an over-represented category keeps its
    top-scored rows (ties: row order). The total shrinks with the cut, so the cap is solved as a
    fixed point (largest T with sum_c min(n_c, floor(cap * T)) = T). A cap no split can meet (fewer
    than 1/cap categories) becomes equal shares. Row order is kept.

    >>> df = pd.DataFrame({"category": ["a"] * 6 + ["b", "c"], "score": [.9, .8, .7, .6, .5, .4, .9, .9],
    ...                    "label_source": "judge", "pool": "accepted"})
    >>> list(cap_categories(df, 0.5)["score"])
    [0.9, 0.8, 0.9, 0.9]
    """
    if rows.empty:
        return rows
    counts = rows["category"].value_counts()
    cap = max(cap, 1.0 / len(counts))
    total = len(rows)
    while True:
        limit = max(1, int(cap * total + 1e-9))
        new = int(np.minimum(counts.values, limit).sum())
        if new == total:
            break
        total = new
    eff = _effective_score(rows)
    rank = eff.groupby(rows["category"]).rank(method="first", ascending=False)
    return rows[rank <= limit]


def oracle_scores(judged: Any, verdicts: Sequence[bool]) -> pd.DataFrame:
    """The oracle-judge control (the upper bound of any judge): each score replaced by the external
    verdict of its image (1.0 / 0.0), in row order; the model's own score kept in `uncorrupted_score`."""
    df = as_frame(judged)
    if len(verdicts) != len(df):
        raise ValueError(f"{len(verdicts)} oracle verdicts for {len(df)} judged rows")
    df["uncorrupted_score"] = df["score"].astype(float)
    df["score"] = np.asarray(verdicts, dtype=float)
    df["valid"] = True
    return df


def dpo_pairs(pooled: Any, strategy: Literal["best_worst", "all"], margin: float,
              max_pairs_per_prompt: int, seed: int) -> pd.DataFrame:
    """Chosen (accepted) vs rejected (rejected) samples of the same prompt, as PairRow columns.

    best_worst: the highest-scored accepted vs the lowest-scored rejected, if the gap >= margin.
    all: every accepted x rejected pair with gap >= margin; over `max_pairs_per_prompt`, a seeded
    sample (seed mixed with the prompt id, so a prompt's pairs do not depend on other prompts).
    Human labels count as score 1.0 (accepted) / 0.0 (rejected) for gaps and the recorded scores.
    Order: by prompt_id, then chosen score descending, then rejected score ascending.
    """
    if strategy not in ("best_worst", "all"):
        raise ValueError(f"unknown pair strategy {strategy!r}")
    df = as_frame(pooled)
    if df.empty or max_pairs_per_prompt <= 0:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    df = df.sort_values(_ORDER, kind="stable").reset_index(drop=True)
    df["_eff"], df["_pos"] = _effective_score(df).to_numpy(), np.arange(len(df))  # _pos: ties keep row order
    df["_neg"] = -df["_eff"]
    chosen = df[df["pool"] == "accepted"].sort_values(["prompt_id", "_neg", "_pos"])
    rejected = df[df["pool"] == "rejected"].sort_values(["prompt_id", "_eff", "_pos"])
    if strategy == "best_worst":  # the top chosen and the bottom rejected of each prompt
        chosen, rejected = chosen.groupby("prompt_id").head(1), rejected.groupby("prompt_id").head(1)
    chosen = chosen.assign(_c=np.arange(len(chosen)))
    rejected = rejected.assign(_r=np.arange(len(rejected)))
    both = chosen.merge(rejected, on="prompt_id", suffixes=("", "_rej")).sort_values(["_c", "_r"])
    both = both[both["_eff"] - both["_eff_rej"] >= margin]  # chosen-major order within each prompt
    if len(both) and both["prompt_id"].value_counts().max() > max_pairs_per_prompt:
        keep = []
        for pid, idx in both.groupby("prompt_id", sort=False).indices.items():
            if len(idx) > max_pairs_per_prompt:  # a seeded sample, seeded per prompt
                rng = np.random.default_rng([seed, _hash32(str(pid))])
                idx = idx[np.sort(rng.choice(len(idx), size=max_pairs_per_prompt, replace=False))]
            keep.extend(idx)
        both = both.iloc[np.sort(np.asarray(keep))]
    out = pd.DataFrame({"prompt_id": both["prompt_id"], "prompt": both["prompt"], "category": both["category"],
                        "round": both["round"].astype(np.int64), "chosen_index": both["sample_index"].astype(np.int64),
                        "rejected_index": both["sample_index_rej"].astype(np.int64),
                        "chosen_tokens": both["image_tokens"], "rejected_tokens": both["image_tokens_rej"],
                        "chosen_score": both["_eff"].astype(float), "rejected_score": both["_eff_rej"].astype(float)})
    return out[PAIR_COLUMNS].reset_index(drop=True)


def _effective_score(df: pd.DataFrame) -> pd.Series:
    """The judge's score, or the reviewer's label (1.0 / 0.0) where a human overrode it."""
    score = df["score"].astype(float)
    if "label_source" not in df:
        return score
    human = df["label_source"] == "human"
    return score.where(~human, (df["pool"] == "accepted").astype(float))


@dataclass(frozen=True)
class NonunifiedScore:
    """Share of valid own generations that the model's own judge rejects, with 95% Wilson CIs."""

    overall: Rate
    per_category: dict[str, Rate]
    invalid: int  # unparseable judge answers: excluded from n, reported so they are not hidden
    invalid_per_category: dict[str, int]

    def to_metrics(self, prefix: str = "nonunified") -> dict[str, float]:
        """Flat metric names for W&B: nonunified/rate, nonunified/counting/rate, ..."""
        out = {f"{prefix}/{k}": v for k, v in self.overall.as_dict().items()}
        out[f"{prefix}/invalid"] = self.invalid
        for cat, r in self.per_category.items():
            out.update({f"{prefix}/{cat}/{k}": v for k, v in r.as_dict().items()})
        return out


def nonunified_score(judged: Any, threshold: float = NONUNIFIED_THRESHOLD) -> NonunifiedScore:
    """Han et al.'s Nonunified score: among valid samples, the share judged 0 (score < threshold).

    The threshold is fixed at 0.5, not the pool reject threshold: binary scores are 0/1 either way,
    and for P(Yes) 0.5 is where the answer flips to "No". Keeping it independent of the pool
    settings keeps the metric comparable across runs that pool differently.
    """
    return nonunified_from_counts(nonunified_counts(judged, threshold))


def nonunified_counts(judged: Any, threshold: float = NONUNIFIED_THRESHOLD) -> pd.DataFrame:
    """Per category: samples judged 0 (`zero`), `valid` and `invalid` ones -- what `nonunified_score`
    needs, as counts that add up over chunks of rows (`pipelines.chunks`)."""
    df = as_frame(judged)
    if df.empty:
        return pd.DataFrame({"zero": [], "valid": [], "invalid": []}, index=pd.Index([], name="category"))
    score = df["score"].astype(float)
    valid = df["valid"].astype(bool) & score.notna()
    parts = pd.DataFrame({"category": df["category"].astype(str), "zero": valid & (score < threshold),
                          "valid": valid, "invalid": ~valid})
    return parts.groupby("category", sort=True).sum().astype(int)


def nonunified_from_counts(counts: Optional[pd.DataFrame]) -> NonunifiedScore:
    """The Nonunified score from `nonunified_counts`, summed over chunks with `add_counts` (None: none)."""
    counts = nonunified_counts([]) if counts is None else counts.sort_index()
    per_cat = {str(c): rate(int(r.zero), int(r.valid)) for c, r in counts.iterrows()}
    invalid_cat = {str(c): int(r.invalid) for c, r in counts.iterrows()}
    return NonunifiedScore(rate(int(counts["zero"].sum()), int(counts["valid"].sum())), per_cat,
                           int(counts["invalid"].sum()), invalid_cat)


def add_counts(total: Any, part: Any) -> Any:
    """Counts indexed by category (a Series or DataFrame) summed over chunks; `total` None = no chunk yet."""
    return part if total is None else total.add(part, fill_value=0).astype(int)


def grade_scores(judged: Any, grades: int) -> pd.DataFrame:
    """The own judge's scores as graded verdicts (UniCorn's judge scores 0-10): each valid score in
    [0, 1] becomes round(score * grades) / grades, the P(Yes) of the prob modes in `grades` + 1 bins
    (0/1 binary scores stay 0/1); grades=0 leaves the scores as they are, NaN stays NaN.

    >>> rows = [dict(score=s, valid=True) for s in (0.04, 0.66, 0.94)] + [dict(score=float("nan"), valid=False)]
    >>> grade_scores(rows, 10)["score"].tolist()[:3], grade_scores(rows, 0)["score"].tolist()[:3]
    ([0.0, 0.7, 0.9], [0.04, 0.66, 0.94])
    """
    if grades < 0:
        raise ValueError(f"grades must be >= 0, got {grades}")
    df = as_frame(judged)
    if grades and not df.empty:
        df["score"] = np.round(df["score"].astype(float) * grades) / grades
    return df


def corrupt_scores(judged: Any, kind: Literal["none", "random", "inverted"], seed: int,
                   binary: Optional[bool] = None) -> pd.DataFrame:
    """The corrupted-judge control: scores replaced on purpose (original kept in `uncorrupted_score`).

    random: an independent uniform score per sample, from a hash of (seed, prompt_id, round,
    sample_index) so it does not depend on row order; when the judge's scores are 0/1 (`binary`;
    None: every valid score here is 0 or 1) the random score is 0/1 too, so the control keeps the
    judge's output format.
    inverted: 1 - score. Invalid samples stay NaN / invalid in both.
    """
    if kind not in ("none", "random", "inverted"):
        raise ValueError(f"unknown corruption {kind!r}")
    df = as_frame(judged)
    score = df["score"].astype(float)
    df["uncorrupted_score"] = score
    if kind == "none" or df.empty:
        return df
    valid = df["valid"].astype(bool) & score.notna()
    if kind == "inverted":
        new = 1.0 - score
    else:
        u = np.array([_unit(seed, r.prompt_id, r.round, r.sample_index)
                      for r in df[["prompt_id", "round", "sample_index"]].itertuples()])
        if binary is None:
            binary = bool(valid.any()) and bool(score[valid].isin([0.0, 1.0]).all())
        new = pd.Series(np.floor(u * 2.0) if binary else u, index=df.index)
    df["score"] = new.where(valid, np.nan)
    return df


def _hash32(text: str) -> int:
    return stable_bits(text, 4)


def _unit(seed: int, prompt_id: Any, round_: Any, sample_index: Any) -> float:
    """A uniform number in [0, 1) fixed by its arguments."""
    return stable_unit(f"{seed}/{prompt_id}/{round_}/{sample_index}")
