"""Shapes-world checks on held-out evaluation rows: a second verdict, and the UniCycle metric.

Where it fits: `pipelines.improve` runs them in each evaluation shard when the external judge is the
shapes oracle (`audit.backend: oracle`), on the generation rows of `evaluate.generation_rows`;
their `*_metrics` functions read the added columns back after the shards are joined. Rows are
independent, so any split of the generations gives the same columns.

Second verdict (`second_verdict`): `shapes.mask_verdict`, built differently from the oracle (cells +
template IoU), and the share of accepted generations lying near an oracle shape threshold.

UniCycle (text -> image -> text, UniCorn's cycle; our exact definition for the shapes world): the
model generates an image from a held-out prompt, then describes its own image ("Describe the
image.", the caption grammar of `shapes.world.caption`); the cycle closes when the description,
parsed, satisfies the prompt (`shapes.world.matches`, closed world: exactly the prompted objects,
any named relation holding by cell). Because the oracle knows what the image really shows, every
image falls in one of four cases:
  cycle_ok and oracle_ok        closed, and right;
  cycle_ok, not oracle_ok       "false pass": the description claims the prompt, the image is wrong;
  not cycle_ok, not oracle_ok   "generated wrong" (the image is wrong; the description may be right);
  not cycle_ok, oracle_ok       "understood wrong" (a right image, misdescribed).
`caption_faithful`: the description lists exactly the objects the oracle parses (colour, shape,
cell). The description is the own judge's (`own_answer`) in describe_prob mode, else one
`model.describe` call per image.

Example:
    >>> import numpy as np, pandas as pd
    >>> from PIL import Image
    >>> from shapes.world import parse_prompt, render, sample_scene, caption
    >>> scene = sample_scene(parse_prompt("a red circle"), np.random.default_rng(0))
    >>> rows = pd.DataFrame({"kind": ["generation"] * 2, "prompt": ["a red circle"] * 2,
    ...                      "category": ["single"] * 2, "external_verdict": [True, True],
    ...                      "own_answer": [caption(scene), "blue square top left"]})
    >>> out = unicycle(rows, [Image.fromarray(render(scene))] * 2)
    >>> list(out["cycle_ok"]), list(out["cycle_failure"]), list(out["caption_faithful"])
    ([1.0, 0.0], ['', 'understood_wrong'], [1.0, 0.0])
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import pandas as pd

from pipelines.evaluate import add_by_category, add_rate
from pipelines.stages import _unpng
from pipelines.stats import rate

DESCRIBE_BATCH = 32


# ----------------------------------------------------------------------------- second verdict
def second_verdict(samples: pd.DataFrame, images: Optional[list] = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Adds the columns `second_verdict` (1.0 / 0.0; NaN on understanding rows) and `near_threshold`
    (1.0 when the external judge accepted the generation and an object lies within a margin of an
    oracle shape threshold: a verdict a small change could flip; 0.0 when accepted and not; NaN
    otherwise), and returns `second_verdict_metrics`. `images`: the generation rows' images when at
    hand (else decoded from the PNGs)."""
    from shapes.mask_verdict import mask_check_many, near_threshold

    gen = (samples["kind"] == "generation").to_numpy()
    images = images if images is not None else [_unpng(b) for b in samples.loc[gen, "png"]]
    second = np.asarray(mask_check_many(images, list(samples.loc[gen, "prompt"])), dtype=bool)
    external = samples.loc[gen, "external_verdict"].astype(bool).to_numpy()
    out = samples.copy()
    out["second_verdict"], out["near_threshold"] = np.nan, np.nan
    out.loc[gen, "second_verdict"] = second.astype(float)
    out.loc[gen, "near_threshold"] = [float(near_threshold(im)) if ok else np.nan
                                      for im, ok in zip(images, external)]
    return out, second_verdict_metrics(out)


def second_verdict_metrics(samples: pd.DataFrame) -> dict[str, float]:
    """`eval/gen_accuracy_second` (+ per category), `eval/verdict_agreement` (second vs external
    verdict) and `eval/near_threshold` (share of externally accepted generations near an oracle
    threshold) from the columns `second_verdict` adds."""
    gen = samples[samples["kind"] == "generation"]
    second = gen["second_verdict"].astype(bool).to_numpy()
    external = gen["external_verdict"].astype(bool).to_numpy()
    near = gen["near_threshold"].dropna()
    metrics: dict[str, float] = {}
    add_by_category(metrics, "eval/gen_accuracy_second", list(gen["category"]), second)
    add_rate(metrics, "eval/verdict_agreement", rate(int((second == external).sum()), len(second)))
    add_rate(metrics, "eval/near_threshold", rate(int(near.sum()), len(near)))
    return metrics


# ----------------------------------------------------------------------------- UniCycle
class _Said(NamedTuple):
    colour: str
    shape: str
    cell: int


def described_objects(text: str) -> Optional[list[_Said]]:
    """The objects a description names, or None when it is not in the caption grammar."""
    from shapes.world import parse_caption

    try:
        return [_Said(*t) for t in parse_caption(str(text).strip())]
    except (ValueError, TypeError):
        return None


def unicycle(samples: pd.DataFrame, images: Optional[list] = None, model=None) -> pd.DataFrame:
    """Adds `cycle_ok`, `cycle_failure` ('' | 'generated_wrong' | 'understood_wrong') and
    `caption_faithful` to the generation rows (NaN / '' on understanding rows); see the module doc.
    The description: `own_answer` when the rows were judged in describe_prob mode, else `model.describe`."""
    from shapes.oracle import parse
    from shapes.world import matches, parse_prompt

    gen = (samples["kind"] == "generation").to_numpy()
    rows = samples[gen]
    images = images if images is not None else [_unpng(b) for b in rows["png"]]
    described = "judge_mode" not in rows or (rows["judge_mode"] == "describe_prob").all()
    if "own_answer" in rows and described:
        texts = list(rows["own_answer"])
    elif model is not None:
        texts = [t for lo in range(0, len(images), DESCRIBE_BATCH)
                 for t in model.describe(images[lo:lo + DESCRIBE_BATCH])]
    else:
        raise ValueError("unicycle: no descriptions (own_answer in describe_prob mode) and no model to ask")
    said = [described_objects(t) for t in texts]
    cycle = np.array([s is not None and matches(s, parse_prompt(p)) for s, p in zip(said, rows["prompt"])])
    truth = rows["external_verdict"].astype(bool).to_numpy()  # the oracle's verdict
    seen = [sorted((o.colour, o.shape, o.cell) for o in parse(im)) for im in images]
    faithful = np.array([s is not None and sorted(s) == o for s, o in zip(said, seen)])
    out = samples.copy()
    out["cycle_ok"], out["caption_faithful"], out["cycle_failure"] = np.nan, np.nan, ""
    out.loc[gen, "cycle_ok"] = cycle.astype(float)
    out.loc[gen, "caption_faithful"] = faithful.astype(float)
    out.loc[gen, "cycle_failure"] = np.where(cycle, "", np.where(truth, "understood_wrong", "generated_wrong"))
    return out


def unicycle_metrics(samples: pd.DataFrame) -> dict[str, float]:
    """`eval/unicycle` (+ per category), the shares of all generations in each failure case
    (`eval/unicycle/generated_wrong`, `/understood_wrong`, `/false_pass`) and `eval/caption_faithful`,
    each a rate with a Wilson CI, from the columns `unicycle` adds."""
    gen = samples[samples["kind"] == "generation"]
    cycle = gen["cycle_ok"].astype(bool).to_numpy()
    truth = gen["external_verdict"].astype(bool).to_numpy()
    n = len(gen)
    metrics: dict[str, float] = {}
    add_by_category(metrics, "eval/unicycle", list(gen["category"]), cycle)
    for case in ("generated_wrong", "understood_wrong"):
        add_rate(metrics, f"eval/unicycle/{case}", rate(int((gen["cycle_failure"] == case).sum()), n))
    add_rate(metrics, "eval/unicycle/false_pass", rate(int((cycle & ~truth).sum()), n))
    add_rate(metrics, "eval/caption_faithful", rate(int(gen["caption_faithful"].astype(bool).sum()), n))
    return metrics
