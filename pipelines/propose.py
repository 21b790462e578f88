"""The proposer (UniCorn's first role): the model proposes its own training prompts.

Where it fits: with `prompts.proposer: describe` each round starts with a `propose` stage, before
generate; `rounds.round_prompts` puts its admitted prompts first and fills the rest of the round's
`prompts.per_round` from the rotating slice, so the budget is the same with or without it.

How the model proposes. UniCorn's proposer writes prompts from few-shot examples; our models were
never trained to write prompts (prompt text is only ever their input), but they can draw without a
prompt (the unconditional CFG branch, trained on ~15 % of the pretraining rows) and describe an
image (the caption task). So the model *imagines, then describes*: it draws M images at cfg weight 0
(the unconditional distribution), captions each ("Describe the image."), and each caption becomes a
proposal:
  * shapes world (audit.backend=oracle): the caption is parsed ("red circle top left and ..."); the
    candidates are the grammar's prompts that the described objects satisfy exactly (closed world);
    the proposal is the candidate in the category that most needs prompts (`targets`);
  * other models: the caption itself, in category "proposed".
Validation: held-out and validation prompts are never admitted (their candidates are counted), a
prompt already admitted this round is a duplicate, each category takes at most its target, and
M = ceil(n * prompts.proposal_inflation) (UniCorn inflates for parse failures). Targets per category
are `uniform` or `nonunified`: proportional to the last round's per-category share of own samples
the judge rejected (the categories where generation and understanding disagree most).

The stage's table has one row per drawn image (ProposalRow: seed, caption, status, prompt_id, prompt,
category): the provenance of every admitted prompt and the count of every failure.

Example (the pure selection; the model part is `describe_unconditional`):
    >>> rows, info = select(["blue square top right and blue square bottom left", "red circle top left",
    ...                      "a cat", "nothing", "green circle top left"], [1, 2, 3, 4, 5],
    ...                     {"shape": 1, "counting": 1}, grammar=True)
    >>> [(r["status"], r["prompt"]) for r in rows]
    [('admitted', 'two blue squares'), ('admitted', 'a circle'), ('unparsed', ''), ('empty', ''), ('over_target', '')]
    >>> info["admitted"], info["valid_rate"]
    (2, 0.6)
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

import pandas as pd
import pyarrow.compute as pc

from pipelines.prompts import prompt_id, prompt_table

STATUSES = ("admitted", "unparsed", "empty", "no_prompt", "heldout", "validation", "duplicate", "over_target",
            "too_long")
FREE_CATEGORY = "proposed"


# ------------------------------------------------------------------ pure core
def targets(n: int, categories: Sequence[str], weights: Optional[dict[str, float]] = None) -> dict[str, int]:
    """n prompts over `categories`, proportional to `weights` (uniform when None or all zero), by
    largest remainder; ties go to the earlier category.

    >>> targets(5, ["a", "b", "c"])
    {'a': 2, 'b': 2, 'c': 1}
    >>> targets(4, ["a", "b"], {"a": 0.3, "b": 0.1})
    {'a': 3, 'b': 1}
    """
    w = [max(0.0, float((weights or {}).get(c, 0.0))) for c in categories]
    if not sum(w):
        w = [1.0] * len(categories)
    exact = [n * x / sum(w) for x in w]
    out = [math.floor(e) for e in exact]
    order = sorted(range(len(categories)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return dict(zip(categories, out))


def shapes_candidates(text: str) -> tuple[str, list]:
    """(status, PromptSpecs) for one caption of the shapes world: every grammar prompt the described
    objects satisfy exactly; status 'unparsed' / 'empty' / 'no_prompt' when there is none."""
    from shapes.world import SceneObject, matches, parse_caption

    try:
        objs = parse_caption(text.strip())
    except ValueError:
        return "unparsed", []
    if not objs:
        return "empty", []
    if len({cell for _, _, cell in objs}) != len(objs):
        return "unparsed", []  # two objects in one cell: not a scene of this world
    scene = [SceneObject(shape, colour, cell, 0, 0, 0) for colour, shape, cell in objs]
    found = [s for s in _universe_by_size().get(len(scene), []) if matches(scene, s)]
    return ("no_prompt" if not found else "ok"), found


def _universe_by_size() -> dict[int, list]:
    from shapes.world import all_prompts

    if not _UNIVERSE:
        for s in all_prompts():
            _UNIVERSE.setdefault(len(s.objects()), []).append(s)
    return _UNIVERSE


_UNIVERSE: dict[int, list] = {}


def select(captions: Sequence[str], seeds: Sequence[int], quota: dict[str, int], grammar: bool,
           heldout: Iterable[str] = (), validation: Iterable[str] = (), max_words: Optional[int] = None,
           seed: int = 0) -> tuple[list[dict], dict]:
    """(one row per caption, counts): which captions become admitted prompts, in caption order.

    A caption's allowed candidates are those not held out, not in the validation slice and not
    admitted already; it is admitted in the allowed category with the most unmet quota (a seeded
    choice within it). Its status names the first reason it was not admitted otherwise."""
    heldout, validation = {_norm(t) for t in heldout}, {_norm(t) for t in validation}
    need, admitted, rng = dict(quota), set(), random.Random(seed)
    rows, blocked = [], Counter()
    for text, s in zip(captions, seeds):
        row = {"seed": int(s), "caption": str(text), "status": "", "prompt": "", "category": ""}
        if grammar:
            status, specs = shapes_candidates(str(text))
            cands = [(sp.text, sp.category) for sp in specs]
        else:
            t = _norm(str(text))
            status, cands = ("empty", []) if not t else ("ok", [(t, FREE_CATEGORY)])
            if cands and max_words and len(t.split()) > max_words:
                status, cands = "too_long", []
        for reason, bad in (("heldout", heldout), ("validation", validation), ("duplicate", admitted)):
            kept = [c for c in cands if _norm(c[0]) not in bad]
            if reason != "duplicate":
                blocked[reason] += len(cands) - len(kept)
            if cands and not kept and status == "ok":
                status = reason
            cands = kept
        open_ = [c for c in cands if need.get(c[1], 0) > 0]
        if cands and not open_ and status == "ok":
            status = "over_target"
        if open_:
            most = max(need[c] for _, c in open_)
            prompt, cat = rng.choice(sorted(c for c in open_ if need[c[1]] == most))
            need[cat] -= 1
            admitted.add(_norm(prompt))
            row.update(status="admitted", prompt=prompt, category=cat)
        else:
            row["status"] = status
        rows.append(row)
    counts = Counter(r["status"] for r in rows)
    valid = len(rows) - sum(counts[s] for s in ("unparsed", "empty", "no_prompt", "too_long"))
    info = {"drawn": len(rows), "admitted": counts["admitted"], "valid_rate": round(valid / max(1, len(rows)), 4),
            **{f"n_{s}": counts[s] for s in STATUSES if s != "admitted"},
            "heldout_candidates": blocked["heldout"], "validation_candidates": blocked["validation"]}
    return rows, info


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def reject_shares(pooled: pd.DataFrame) -> dict[str, float]:
    """Per category, the share of valid own samples the judge rejected: the round's Nonunified score
    by category (`pools.nonunified_score`)."""
    from pipelines.pools import nonunified_score

    return {c: r.rate for c, r in nonunified_score(pooled).per_category.items()}


def stored_reject_shares(store, k: int) -> dict[str, float]:
    """`reject_shares` of round k as its pool stage recorded them (`PoolRows.nonunified`); run dirs
    written before it did are read from the pool table."""
    metrics = store.stage_info(k, "pool").get("result", {}).get("nonunified")
    if not metrics:
        return reject_shares(store.read_table(k, "pool", "data", columns=["category", "score", "valid"]).to_pandas())
    return {key.split("/")[1]: v for key, v in metrics.items() if key.count("/") == 2 and key.endswith("/rate")}


def round_quota(cfg, prompts: Any, store, k: int) -> dict[str, int]:
    """Round k's wanted proposals per category: proposal_share of the round's prompts, split uniformly
    over the training prompts' categories or (proposal_target=nonunified) by round k-1's reject shares."""
    p = cfg.prompts
    n = round(p.proposal_share * (p.per_round or len(prompts)))
    if cfg.audit.backend != "oracle":
        return {FREE_CATEGORY: n}
    weights = None
    if p.proposal_target == "nonunified" and k > 1 and store.is_done(k - 1, "pool"):
        weights = stored_reject_shares(store, k - 1)
    return targets(n, sorted(pc.unique(prompt_table(prompts)["category"]).to_pylist()), weights)


# ------------------------------------------------------------------ the model part (a Ray task)
PLACEHOLDER_PROMPT = "an image"  # the conditional row a cfg-0 draw ignores (the model API needs a prompt)


def describe_unconditional(model, seeds: Sequence[int], batch_size: int = 16, temperature: float = 1.0) -> list[str]:
    """Captions of images drawn from the model's unconditional branch (cfg weight 0), one per seed."""
    out = model.generate_images([PLACEHOLDER_PROMPT] * len(seeds), num_images=1, seed=list(seeds),
                                cfg_weight=0.0, temperature=temperature, batch_size=batch_size)
    images = [imgs[0] for imgs in out.images]
    captions = []
    for lo in range(0, len(images), batch_size):
        captions += model.describe(images[lo:lo + batch_size])
    return captions


def _draw_task(cfg, adapter: Optional[str], seeds: list[int]) -> list[str]:
    from models.loading import load_model

    model = load_model(cfg.model.path, cfg.model.dtype, "cuda" if cfg.generate.num_gpus_per_actor else "cpu",
                       adapter=adapter, judge_mode=cfg.judge.mode, merge=True)
    return describe_unconditional(model, seeds, cfg.generate.batch_size, cfg.generate.temperature)


def propose(ctx, k: int, adapter: Optional[str]) -> tuple[pd.DataFrame, dict]:
    """The propose stage of round k: draw, describe, validate; (ProposalRows, info)."""
    from pipelines.config import derive_seed
    from pipelines.stages import run_model_task  # one Ray task with the generation actors' resources

    cfg, p = ctx.cfg, ctx.cfg.prompts
    grammar = cfg.audit.backend == "oracle"
    quota = round_quota(cfg, ctx.prompts, ctx.store, k)
    n = sum(quota.values())
    base = derive_seed(cfg.run.seed, k, "propose")
    seeds = [derive_seed(base, 0, "draw", i) for i in range(math.ceil(n * p.proposal_inflation))]
    captions = run_model_task(cfg, _draw_task, cfg, adapter, seeds) if seeds else []
    rows, info = select(captions, seeds, quota, grammar, [r["prompt"] for r in ctx.heldout],
                        [r["prompt"] for r in ctx.validation], p.max_prompt_tokens, base)
    known = training_ids(ctx.prompts, {_norm(r["prompt"]) for r in rows if r["status"] == "admitted"})
    for r in rows:  # a proposal that is a training prompt keeps its id (its history in the pools)
        hit = known.get(_norm(r["prompt"])) if r["status"] == "admitted" else None
        r["prompt_id"] = hit or (prompt_id(r["prompt"]) if r["prompt"] else "")
    info.update(quota={c: q for c, q in quota.items() if q}, target=p.proposal_target)
    cols = ["seed", "caption", "status", "prompt_id", "prompt", "category"]
    return pd.DataFrame(rows, columns=cols), info


def training_ids(prompts: Any, wanted: set[str]) -> dict[str, str]:
    """{normalised text: prompt_id} of the training prompts (a `prompt_table` or PromptRows) whose
    text is `wanted` (the last one of a repeated text), read a batch of the table at a time."""
    out: dict[str, str] = {}
    for batch in prompt_table(prompts).to_batches(max_chunksize=4096):
        for pid, text in zip(batch["prompt_id"].to_pylist(), batch["prompt"].to_pylist()):
            key = _norm(text)
            if key in wanted:
                out[key] = pid
    return out


def admitted(table: Optional[pd.DataFrame]) -> list[dict]:
    """The PromptRows the propose stage admitted, in draw order ([] without a propose stage)."""
    if table is None or not len(table):
        return []
    ok = table[table["status"] == "admitted"]
    return [{"prompt_id": r.prompt_id, "prompt": r.prompt, "category": r.category} for r in ok.itertuples()]
