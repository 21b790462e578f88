"""Held-out evaluation of one round's model: generation accuracy, Nonunified, understanding, win rate.

Where it fits: the driver's `evaluate` stage calls `evaluate_round` with the round's model (base
model at round 0, the round's adapter after) and an external judge (`pipelines.audit`); the
metrics feed the audit, W&B (`pipelines.tracking`) and the report (`pipelines.report`). No Ray: one
process, batched model calls. The shapes-world helpers are shared with `shapes/evaluate.py`.

What is measured (every rate with k, n and a 95% Wilson interval, overall and per category):
  * gen_accuracy: `eval_cfg.num_images` images per held-out prompt, sample n of prompt p seeded by
    `sample_seed(eval_cfg.seed, 0, p)` -- the SAME seeds every round, so rounds differ only by
    the model -- judged by the external judge. More prompts than `eval_cfg.num_prompts`: a subset
    fixed by (eval seed, prompt id), the same every round and whatever the input order.
  * nonunified: share of those generations the model's own judge rejects (`pools.nonunified_score`,
    threshold 0.5; unparseable answers excluded from n and counted in `/invalid`).
  * own_external_agreement: own verdict (score >= 0.5) == external verdict on the generations.
  * und_accuracy: the own judge on `eval_cfg.understanding_pairs` held-out (image, prompt) pairs
    with known labels, own verdict = score >= 0.5 (NaN counts as "no", as in shapes/evaluate.py).
    Shapes world (every prompt parses as a shapes prompt): balanced pairs from
    `shapes.evaluate.heldout_pairs` (the model card's pairs: matched renders, hard-negative
    mismatches), exact symbolic labels, images VQ-reconstructed by the model's own VQ (what the
    judge sees on generations; the VQ is frozen, so they are the same every round) -- clean renders
    when the model's image size is not the world's. Elsewhere: the round's own generations
    labelled by the external judge, subsampled to balance yes / no (as balanced as the labels allow).
  * und_win_rate (the paper's Und. metric): on the understanding pairs, among pairs where the base
    model's and this model's own verdicts differ, the share where this model agrees with the label.
    Generations change every round, so it is defined on the pairs, which are identical every round:
    pass round 0's samples as `base_verdicts` and the pairs (images, prompts, labels) are taken from
    it. NaN with n = 0 at round 0 (or when no verdict changed).

Returns `EvalResult(metrics, samples)` (a NamedTuple: unpacks as a pair; `.pairs` = the
understanding rows of `samples`, enough to pass back as `base_verdicts` / `base_pairs`):
  metrics: flat {name: float}: `eval/gen_accuracy`, `eval/gen_accuracy/{ci_low,ci_high,n,k}`,
    `eval/gen_accuracy/<category>` (+ the same suffixes), likewise `eval/nonunified` (+
    `/invalid`), `eval/own_external_agreement`, `eval/und_accuracy`, `eval/und_win_rate`; plus
    `eval/num_prompts`, `eval/num_images`, `eval/understanding_pairs`.
  samples: one DataFrame, both kinds of rows, told apart by `kind`:
    kind="generation": one row per generated image (sample_index 0..N-1 per prompt);
    kind="understanding": one row per pair (sample_index = pair index; external_verdict = label).
    Columns: kind, prompt_id, prompt, category, sample_index, seed, png, own_score, own_valid,
    own_verdict, external_verdict, label_source, judge_mode. Store it as the stage's table; pass
    round 0's table back as `base_verdicts` every later round.

Example:
    >>> from models.loading import load_model
    >>> from pipelines.audit import OracleJudge
    >>> from pipelines.config import EvalSection
    >>> from pipelines.prompts import load_prompts
    >>> rows, _ = load_prompts("shapes", split="heldout")
    >>> cfg = EvalSection(num_prompts=4, num_images=2, understanding_pairs=8, seed=0)
    >>> m0, s0 = evaluate_round(load_model("tiny"), OracleJudge(), rows, cfg)
    >>> m1, _ = evaluate_round(load_model("tiny:1"), OracleJudge(), rows, cfg, base_verdicts=s0)
    >>> m0["eval/gen_accuracy/n"], m0["eval/und_accuracy/n"], m1["eval/und_win_rate/n"] >= 0
    (8.0, 8.0, True)
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from models.seeds import stable_bits
from pipelines.pools import nonunified_score
from pipelines.stages import _png, _unpng, judge_batched, sample_seed
from pipelines.stats import Rate, paired_bootstrap, rate

JUDGE_BATCH = 64  # images per own-judge forward: the tiny/shapes models fit 64 at 32 px easily
IMAGES_PER_FORWARD = 64  # generation: prompts per forward = this // num_images
VERDICT_THRESHOLD = 0.5
COLUMNS = ["kind", "prompt_id", "prompt", "category", "sample_index", "seed", "png", "own_score",
           "own_valid", "own_verdict", "external_verdict", "label_source", "judge_mode"]


class EvalResult(NamedTuple):
    """`metrics, samples = evaluate_round(...)` unpacks; `.pairs` is the understanding rows alone."""

    metrics: dict[str, float]
    samples: pd.DataFrame

    @property
    def pairs(self) -> pd.DataFrame:
        """Understanding rows only: what a later round needs as `base_verdicts` / `base_pairs`."""
        return self.samples[self.samples["kind"] == "understanding"].reset_index(drop=True)


def evaluate_round(model, judge, prompts: Sequence[dict], eval_cfg, judge_mode: Optional[str] = None,
                   base_verdicts: Optional[pd.DataFrame] = None, *, generate_cfg=None,
                   base_pairs: Optional[pd.DataFrame] = None,
                   generations: Optional[pd.DataFrame] = None) -> EvalResult:
    """Metrics and per-sample rows of `model` on held-out `prompts` (see the module docstring).

    base_verdicts / base_pairs (the same thing; give either): round 0's samples or its `.pairs`.
    generate_cfg: a `GenerateSection` whose cfg_weight / temperature / top_k the eval samples with
    (None = cfg 5.0, temperature 1.0, as shapes/evaluate.py), so eval matches training sampling.
    generations: the generation rows, already made by `generation_rows` (e.g. in parallel shards);
    None = make them here.
    """
    if base_verdicts is not None and base_pairs is not None:
        raise ValueError("give base_verdicts or base_pairs, not both")
    base_verdicts = base_pairs if base_verdicts is None else base_verdicts
    prompts = select_prompts(prompts, eval_cfg.num_prompts, eval_cfg.seed)
    mode = judge_mode or model.default_judge_mode
    if generations is None:
        gen, gen_images = generation_rows(model, judge, prompts, eval_cfg, mode, generate_cfg)
    else:  # computed in shards (`generation_rows` on parts of `prompts`): the same rows, any shard count
        gen = generations.sort_values(["prompt_id", "sample_index"], kind="stable").reset_index(drop=True)
        if set(gen["prompt_id"]) != {r["prompt_id"] for r in prompts}:
            raise ValueError("generations: not the held-out prompts selected by eval_cfg")
        gen_images = _LazyImages(gen["png"])
    base_und = _understanding_rows(base_verdicts)
    und, und_images = understanding_pairs(model, eval_cfg, gen, gen_images, base_und, _is_shapes(prompts))
    und = _own_judge(model, und, und_images, mode)
    extra = [c for c in gen.columns if c not in COLUMNS]  # e.g. second_verdict from the shards (NaN on und rows)
    samples = pd.concat([gen, und], ignore_index=True)[COLUMNS + extra]
    return EvalResult(round_metrics(samples, base_und, num_images=eval_cfg.num_images), samples)


def generation_rows(model, judge, prompts: Sequence[dict], eval_cfg, mode: str, generate_cfg=None
                    ) -> tuple[pd.DataFrame, list]:
    """The held-out generation rows of `prompts` (own and external verdicts) and their images. Each
    row depends on its prompt alone (fixed seeds), so parts of the prompts can run in parallel."""
    gen, images = generate_samples(model, list(prompts), eval_cfg, generate_cfg)
    gen = _own_judge(model, gen, images, mode)
    gen["external_verdict"] = judge.verdicts(images, list(gen["prompt"]))
    gen["label_source"] = judge.name
    return gen, images


class _LazyImages:
    """PIL images of a PNG column, decoded on access (only non-shapes prompts need them again)."""

    def __init__(self, pngs):
        self.pngs = list(pngs)

    def __getitem__(self, i):
        return _unpng(self.pngs[i])


def validation_rows(model, judge, prompts: Sequence[dict], eval_cfg, generate_cfg=None) -> pd.DataFrame:
    """The validation slice (training-distribution prompts never trained on): `validation_images`
    generations per prompt with the fixed eval seeds, judged externally. Rows as the held-out
    generation rows without PNGs (small); any part of the prompts gives the same rows."""
    cfg = eval_cfg.model_copy(update={"num_images": eval_cfg.validation_images})
    gen, images = generate_samples(model, list(prompts), cfg, generate_cfg)
    gen["external_verdict"] = judge.verdicts(images, list(gen["prompt"]))
    return gen.drop(columns=["png"])


def validation_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """`eval/val_accuracy` (+ per category, Wilson CIs) of `validation_rows`."""
    metrics: dict[str, float] = {}
    add_by_category(metrics, "eval/val_accuracy", list(rows["category"]), rows["external_verdict"].astype(bool))
    return metrics


def select_prompts(prompts: Sequence[dict], num_prompts: int, seed: int) -> list[dict]:
    """At most `num_prompts` prompts, the same subset every round and whatever the input order."""
    rows = sorted(prompts, key=lambda r: str(r["prompt_id"]))
    keep = select_ids([r["prompt_id"] for r in rows], num_prompts, seed)
    return [r for r in rows if r["prompt_id"] in keep]


def select_ids(ids: Sequence[str], num_prompts: int, seed: int) -> set[str]:
    """The ids `select_prompts` keeps: the first `num_prompts` by a seeded digest of the id."""
    if num_prompts >= len(ids):
        return set(ids)
    key = lambda i: stable_bits(f"{seed}/{i}", 32, "big")  # noqa: E731 (the full digest's order)
    return set(sorted(sorted(ids, key=str), key=key)[:num_prompts])


def generate_samples(model, prompts: list[dict], eval_cfg, generate_cfg=None) -> tuple[pd.DataFrame, list]:
    """N images per prompt with the fixed eval seeds: (generation rows, flat PIL images)."""
    n = eval_cfg.num_images
    seeds = [sample_seed(eval_cfg.seed, 0, r["prompt_id"]) for r in prompts]
    g = generate_cfg
    out = model.generate_images([r["prompt"] for r in prompts], num_images=n, seed=seeds,
                                cfg_weight=g.cfg_weight if g else 5.0, temperature=g.temperature if g else 1.0,
                                top_k=g.top_k if g else None, batch_size=max(1, IMAGES_PER_FORWARD // n))
    images = [im for row in out.images for im in row]
    frame = pd.DataFrame({
        "kind": "generation",
        "prompt_id": [r["prompt_id"] for r in prompts for _ in range(n)],
        "prompt": [r["prompt"] for r in prompts for _ in range(n)],
        "category": [r.get("category") or "uncategorized" for r in prompts for _ in range(n)],
        "sample_index": np.tile(np.arange(n), len(prompts)),
        "seed": out.seeds.reshape(-1).numpy().astype(np.int64),
        "png": [_png(im) for im in images],
    })
    return frame, images


def _own_judge(model, frame: pd.DataFrame, images: list, mode: str) -> pd.DataFrame:
    """Add own_score / own_valid / own_answer / own_verdict / judge_mode; batched, JUDGE_BATCH images."""
    scores, valid, answers = judge_batched(model, images, list(frame["prompt"]), mode, JUDGE_BATCH)
    frame = frame.copy()
    frame["own_score"] = np.array(scores, dtype=np.float64)
    frame["own_valid"] = [bool(v) for v in valid]
    frame["own_answer"] = [str(a) for a in answers]  # the description in describe_prob mode (UniCycle reads it)
    frame["own_verdict"] = frame["own_score"].fillna(0.0) >= VERDICT_THRESHOLD  # NaN -> "no"
    frame["judge_mode"] = mode
    return frame


def _is_shapes(prompts: list[dict]) -> bool:
    """Exact labels are possible only when every prompt is in the shapes world's grammar."""
    try:
        from shapes.world import parse_prompt
    except ImportError:
        return False
    try:
        for r in prompts:
            parse_prompt(r["prompt"])
    except ValueError:
        return False
    return bool(prompts)


def _understanding_rows(base: Optional[pd.DataFrame]) -> Optional[pd.DataFrame]:
    if base is None:
        return None
    base = base if isinstance(base, pd.DataFrame) else base.to_pandas()
    rows = base[base["kind"] == "understanding"] if "kind" in base else base
    return rows.sort_values("sample_index", kind="stable").reset_index(drop=True) if len(rows) else None


def understanding_pairs(model, eval_cfg, gen: pd.DataFrame, gen_images: list,
                        base_und: Optional[pd.DataFrame], shapes_world: bool) -> tuple[pd.DataFrame, list]:
    """The labelled (image, prompt) pairs: round 0's when given, else built (module docstring)."""
    cols = ["kind", "prompt_id", "prompt", "category", "sample_index", "seed", "png",
            "external_verdict", "label_source"]
    if base_und is not None:  # identical pairs every round: the win rate compares like with like
        rows = base_und[cols].copy()
        return rows, [_unpng(b) for b in rows["png"]]
    if eval_cfg.understanding_pairs == 0:
        return pd.DataFrame(columns=cols), []
    if shapes_world:
        return _shapes_pairs(model, eval_cfg)
    return _judged_pairs(gen, gen_images, eval_cfg)


def _shapes_pairs(model, eval_cfg) -> tuple[pd.DataFrame, list]:
    """Balanced held-out pairs with exact labels (shared with shapes/evaluate.py)."""
    from PIL import Image

    from pipelines.prompts import prompt_id
    from shapes.evaluate import heldout_pairs
    from shapes.world import IMAGE_SIZE

    pairs = heldout_pairs(eval_cfg.understanding_pairs, eval_cfg.seed)
    renders = np.stack([p[0] for p in pairs])  # (P, 32, 32, 3) uint8
    if model.image_size == IMAGE_SIZE:
        renders, source = _vq_reconstruct(model, renders), "exact/vq"
    else:
        source = "exact/clean"
    images = [Image.fromarray(a) for a in renders]
    frame = pd.DataFrame({
        "kind": "understanding", "prompt_id": [prompt_id(p[1].text) for p in pairs],
        "prompt": [p[1].text for p in pairs], "category": [p[1].category for p in pairs],
        "sample_index": np.arange(len(pairs)), "seed": -1, "png": [_png(im) for im in images],
        "external_verdict": [bool(p[2]) for p in pairs], "label_source": source})
    return frame, images


def _vq_reconstruct(model, renders: np.ndarray) -> np.ndarray:
    """The model's own VQ round trip (shared with shapes/evaluate.py), on a CPU float32 copy when
    the model sits on a GPU or in bf16: `reconstruct` feeds CPU float32 pixels."""
    import copy

    import torch

    from shapes.pretrain_vq import reconstruct

    vq = model.janus.model.vqmodel
    if model.device.type != "cpu" or next(vq.parameters()).dtype != torch.float32:
        vq = copy.deepcopy(vq).to("cpu", torch.float32)  # the shapes VQ is ~1 MB
    return reconstruct(vq.eval(), renders)


def _judged_pairs(gen: pd.DataFrame, gen_images: list, eval_cfg) -> tuple[pd.DataFrame, list]:
    """Own generations labelled by the external judge, a seeded yes/no-balanced subsample."""
    rng = np.random.default_rng([eval_cfg.seed, 13])
    want = eval_cfg.understanding_pairs
    yes = np.flatnonzero(gen["external_verdict"].to_numpy(bool))
    no = np.flatnonzero(~gen["external_verdict"].to_numpy(bool))
    k_yes = min(len(yes), max(want // 2, want - len(no)))  # fill from the other class when short
    k_no = min(len(no), want - k_yes)
    pick = np.sort(np.concatenate([rng.choice(yes, k_yes, replace=False),
                                   rng.choice(no, k_no, replace=False)])).astype(int)
    frame = gen.iloc[pick][["prompt_id", "prompt", "category", "seed", "png", "external_verdict",
                            "label_source"]].reset_index(drop=True)
    frame.insert(0, "kind", "understanding")
    frame.insert(4, "sample_index", np.arange(len(pick)))
    return frame, [gen_images[i] for i in pick]


# ---------------------------------------------------------------------------------- metrics


def add_rate(metrics: dict, name: str, r: Rate) -> None:
    """name -> rate, name/ci_low, name/ci_high, name/n, name/k (floats, for W&B)."""
    # Wilson bounds at k = 0 or k = n carry float rounding (2.8e-17 > 0.0): clamp so the CI
    # always brackets the estimate, as plots and the audit's noise check assume.
    low, high = (r.low, r.high) if r.n == 0 else (min(r.low, r.rate), max(r.high, r.rate))
    metrics.update({name: float(r.rate), f"{name}/ci_low": float(low), f"{name}/ci_high": float(high),
                    f"{name}/n": float(r.n), f"{name}/k": float(r.k)})


def add_by_category(metrics: dict, name: str, categories: Sequence[str], ok: Sequence[bool]) -> None:
    """Overall and per-category rates of the boolean `ok`."""
    cats, ok = np.asarray(categories, dtype=object), np.asarray(ok, dtype=bool)
    add_rate(metrics, name, rate(int(ok.sum()), len(ok)))
    for cat in sorted(set(cats.tolist())):
        mask = cats == cat
        add_rate(metrics, f"{name}/{cat}", rate(int(ok[mask].sum()), int(mask.sum())))


def und_win_rate(current: pd.DataFrame, base: Optional[pd.DataFrame]) -> tuple[Rate, dict[str, Rate]]:
    """Han et al.'s Und. win rate on the understanding pairs (module docstring), overall and per category.

    current / base: understanding rows with sample_index, prompt, category, own_verdict,
    external_verdict. Pairs are matched by sample_index; a pair set that differs is an error.
    """
    if base is None or current.empty:
        return rate(0, 0), {}
    cur = current.set_index("sample_index").sort_index()
    ref = base.set_index("sample_index").sort_index()
    if not cur.index.equals(ref.index) or not (cur["prompt"] == ref["prompt"]).all():
        raise ValueError("und_win_rate: base and current understanding pairs differ; pass round 0's samples")
    differ = cur["own_verdict"].astype(bool) != ref["own_verdict"].astype(bool)
    win = differ & (cur["own_verdict"].astype(bool) == cur["external_verdict"].astype(bool))
    per_cat = {str(c): rate(int(win[cur["category"] == c].sum()), int(differ[cur["category"] == c].sum()))
               for c in sorted(cur["category"].unique())}
    return rate(int(win.sum()), int(differ.sum())), per_cat


def round_metrics(samples: pd.DataFrame, base_und: Optional[pd.DataFrame], num_images: int) -> dict[str, float]:
    """All `eval/...` metrics from the samples table (pure: no model calls)."""
    gen = samples[samples["kind"] == "generation"]
    und = samples[samples["kind"] == "understanding"]
    m: dict[str, float] = {"eval/num_prompts": float(gen["prompt_id"].nunique()),
                           "eval/num_images": float(num_images), "eval/understanding_pairs": float(len(und))}
    add_by_category(m, "eval/gen_accuracy", list(gen["category"]), gen["external_verdict"].astype(bool))
    nonu = nonunified_score(gen.rename(columns={"own_score": "score", "own_valid": "valid"}))
    add_rate(m, "eval/nonunified", nonu.overall)
    m["eval/nonunified/invalid"] = float(nonu.invalid)
    for cat, r in nonu.per_category.items():
        add_rate(m, f"eval/nonunified/{cat}", r)
    agree = gen["own_verdict"].astype(bool) == gen["external_verdict"].astype(bool)
    add_by_category(m, "eval/own_external_agreement", list(gen["category"]), agree)
    und_ok = und["own_verdict"].astype(bool) == und["external_verdict"].astype(bool)
    add_by_category(m, "eval/und_accuracy", list(und["category"]), und_ok)
    overall, per_cat = und_win_rate(und.reset_index(drop=True), base_und)
    add_rate(m, "eval/und_win_rate", overall)
    for cat, r in per_cat.items():
        add_rate(m, f"eval/und_win_rate/{cat}", r)
    return m


def paired_gain(samples: pd.DataFrame, reference: pd.DataFrame, name: str, seed: int = 0,
                verdict: str = "external_verdict") -> dict[str, float]:
    """Generation accuracy of `samples` minus `reference` (two evaluations, e.g. round k and round 0),
    paired over the held-out prompts both evaluated with the same sampling seeds.

    Metrics: `eval/<name>` (prompt-uniform: equal images per prompt, so it equals the difference of
    the two gen_accuracy values), `/ci_low`, `/ci_high` (paired bootstrap over prompts,
    `stats.paired_bootstrap`), `/n` (prompts), `/category_mean` (the mean of per-category gains: every
    category weighs the same, as the understanding pairs do). Unpaired inputs (other seeds) are refused.
    `verdict`: the column judged (`second_verdict`: the shapes world's second verdict, `pipelines.shapes_checks`).
    """
    cols = ["prompt_id", "sample_index", "seed", "category", verdict]
    a, b = (df.loc[df["kind"] == "generation", cols] for df in (samples, reference))
    both = a.merge(b, on=["prompt_id", "sample_index"], suffixes=("", "_ref"))
    if both.empty:
        raise ValueError(f"{name}: no held-out prompt in common: not a paired comparison")
    if not (both["seed"] == both["seed_ref"]).all():
        raise ValueError(f"{name}: the two evaluations sampled with different seeds: not a paired comparison")
    both[[verdict, verdict + "_ref"]] = both[[verdict, verdict + "_ref"]].astype(float)
    per_prompt = both.groupby("prompt_id").agg(a=(verdict, "mean"), b=(verdict + "_ref", "mean"),
                                               category=("category", "first"))
    d, lo, hi = paired_bootstrap(per_prompt["a"], per_prompt["b"], seed=seed)
    by_cat = (per_prompt["a"] - per_prompt["b"]).groupby(per_prompt["category"]).mean()
    return {f"eval/{name}": d, f"eval/{name}/ci_low": lo, f"eval/{name}/ci_high": hi,
            f"eval/{name}/n": float(len(per_prompt)),
            f"eval/{name}/category_mean": float(by_cat.mean()) if len(by_cat) else float("nan")}
