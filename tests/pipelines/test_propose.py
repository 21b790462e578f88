"""The proposer's validation (pipelines/propose.py): what a caption may become, and what never gets in.

The model part (unconditional draws + captions) runs on the shipped shapes model in
`test_the_shapes_model_proposes_valid_prompts`; the stage through `unigap run` is in tests/e2e.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.propose import STATUSES, admitted, reject_shares, select, shapes_candidates, targets
from shapes.world import all_prompts, caption, heldout_prompts, parse_prompt, sample_scene, satisfies, train_prompts


def test_targets_split_n_by_weight_and_sum_to_n():
    for n in (0, 1, 7, 100):
        t = targets(n, ["a", "b", "c"], {"a": 0.5, "b": 0.25, "c": 0.25})
        assert sum(t.values()) == n
    assert targets(8, ["a", "b", "c"], {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 4, "b": 2, "c": 2}
    assert targets(4, ["a", "b"], {"a": 0.0, "b": 0.0}) == {"a": 2, "b": 2}  # no signal: uniform
    assert targets(3, ["a", "b"], {"b": 1.0}) == {"a": 0, "b": 3}


def test_candidates_of_a_caption_are_exactly_the_prompts_its_scene_satisfies():
    rng = np.random.default_rng(0)
    specs = train_prompts()
    for i in rng.choice(len(specs), 150, replace=False):
        scene = sample_scene(specs[i], rng)
        status, found = shapes_candidates(caption(scene))
        assert status == "ok"
        assert specs[i] in found  # the prompt the scene was drawn for is among them
        assert all(satisfies(scene, s) for s in found)  # and every candidate is true of the scene
        others = [s for s in all_prompts() if len(s.objects()) == len(scene.objects) and s not in found]
        assert not any(satisfies(scene, s) for s in others[:200])


def test_bad_captions_are_named_not_admitted():
    assert shapes_candidates("a cat on a mat")[0] == "unparsed"
    assert shapes_candidates("red circle top left and blue square top left")[0] == "unparsed"  # one cell, two
    assert shapes_candidates("nothing")[0] == "empty"
    # two red circles and a blue square: no prompt of the grammar says exactly that
    assert shapes_candidates("red circle top left and red circle top right and blue square bottom left")[0] \
        == "no_prompt"


def test_heldout_and_validation_prompts_are_never_admitted_and_are_counted():
    rng = np.random.default_rng(1)
    held = heldout_prompts()
    validation = [s.text for s in train_prompts()[:40]]
    scenes = [sample_scene(held[i], rng) for i in rng.choice(len(held), 60)]
    scenes += [sample_scene(parse_prompt(t), rng) for t in validation]
    caps = [caption(s) for s in scenes]
    quota = {c: 1000 for c in ("shape", "single", "two_objects", "counting", "spatial")}
    rows, info = select(caps, range(len(caps)), quota, grammar=True, heldout=[s.text for s in held],
                        validation=validation)
    got = {r["prompt"] for r in rows if r["status"] == "admitted"}
    assert got and not got & {s.text for s in held} and not got & set(validation)
    assert info["heldout_candidates"] >= 60 and info["validation_candidates"] >= 40
    assert {r["status"] for r in rows} <= set(STATUSES)
    # a caption whose only candidates are held out is named so
    cap = "red circle top left and blue square bottom right"
    everything = [s.text for s in shapes_candidates(cap)[1]]
    assert select([cap], [0], quota, grammar=True, heldout=everything)[0][0]["status"] == "heldout"
    rows, _ = select([cap], [0], quota, grammar=True, heldout=everything[1:], validation=everything[:1])
    assert rows[0]["status"] == "validation"  # the check that removed the last candidate


def test_quota_duplicates_and_category_choice():
    cap = "red circle top left"  # candidates: a circle (shape), a red circle (single), one red circle (counting)
    rows, info = select([cap] * 5, range(5), {"shape": 1, "single": 1, "counting": 1, "spatial": 9}, grammar=True)
    assert [r["status"] for r in rows] == ["admitted"] * 3 + ["duplicate"] * 2
    assert sorted(r["category"] for r in rows[:3]) == ["counting", "shape", "single"]
    assert info["admitted"] == 3 and info["n_duplicate"] == 2 and info["valid_rate"] == 1.0
    rows, _ = select([cap, "green circle top left"], [0, 1], {"shape": 1}, grammar=True)
    assert [r["status"] for r in rows] == ["admitted", "over_target"]
    # the seeded choice is reproducible
    quota = {"shape": 2, "single": 2, "counting": 2}
    assert select([cap] * 3, range(3), quota, True, seed=3)[0] == select([cap] * 3, range(3), quota, True, seed=3)[0]


def test_free_text_proposals():
    rows, info = select(["A dog  on a beach", "a dog on a beach", "", "a cat", "one two three four five six"],
                        range(5), {"proposed": 10}, grammar=False, heldout=["A CAT"], max_words=5)
    assert [r["status"] for r in rows] == ["admitted", "duplicate", "empty", "heldout", "too_long"]
    assert rows[0]["prompt"] == "a dog on a beach" and rows[0]["category"] == "proposed"
    assert admitted(None) == [] and info["valid_rate"] == 0.6


def test_reject_shares_by_category():
    import pandas as pd

    pooled = pd.DataFrame({"category": ["a", "a", "a", "b", "b"], "score": [0.1, 0.9, 0.2, 0.9, float("nan")],
                           "valid": [True, True, True, True, False]})
    assert reject_shares(pooled) == pytest.approx({"a": 2 / 3, "b": 0.0})


@pytest.mark.slow
def test_the_shapes_model_proposes_valid_prompts():
    """The shipped model imagines (cfg 0) and describes: a measurable share of its captions parse
    into prompts of the world."""
    import torch

    from models.loading import load_model
    from pipelines.propose import describe_unconditional

    torch.manual_seed(0)
    model = load_model("shapes")
    seeds = list(range(48))
    caps = describe_unconditional(model, seeds, batch_size=16)
    quota = {c: 100 for c in ("shape", "single", "two_objects", "counting", "spatial")}
    rows, info = select(caps, seeds, quota, grammar=True, heldout=[s.text for s in heldout_prompts()])
    assert info["valid_rate"] >= 0.5, (info, caps[:8])
    assert info["admitted"] >= 10, info


def test_round_quota_follows_the_last_rounds_nonunified_by_category(tmp_path):
    import pandas as pd

    from pipelines.config import load_config
    from pipelines.propose import round_quota
    from pipelines.store import RunStore

    prompts = [{"prompt_id": f"p{i}", "prompt": "x", "category": c} for i, c in enumerate(["single", "spatial"] * 5)]
    cfg = load_config(None, ["prompts.proposer=describe", "prompts.per_round=10", "prompts.proposal_share=0.8",
                             "prompts.proposal_target=nonunified", "audit.backend=oracle"])
    store = RunStore(str(tmp_path), "q")
    store.init(cfg)
    assert round_quota(cfg, prompts, store, 1) == {"single": 4, "spatial": 4}  # no earlier round: uniform
    pooled = pd.DataFrame({"category": ["single"] * 4 + ["spatial"] * 4, "score": [0.9, 0.9, 0.9, 0.1] + [0.1] * 4,
                           "valid": [True] * 8})
    store.write_table(1, "pool", pooled)
    store.mark_done(1, "pool", {})
    assert round_quota(cfg, prompts, store, 2) == {"single": 2, "spatial": 6}  # rejects 1/4 vs 4/4
    uniform = load_config(None, ["prompts.per_round=10", "prompts.proposal_share=0.8", "audit.backend=oracle"])
    assert round_quota(uniform, prompts, store, 2) == {"single": 4, "spatial": 4}
    free = load_config(None, ["prompts.per_round=10", "prompts.proposal_share=0.5", "audit.backend=vlm",
                                "audit.vlm_path=/some/vlm"])
    assert round_quota(free, prompts, store, 2) == {"proposed": 5}
