"""The shapes world: prompt grammar, the fixed split, scenes, captions, hard negatives."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from shapes.world import (
    CATEGORIES,
    IMAGE_SIZE,
    VOCABULARY,
    PromptSpec,
    all_prompts,
    attribute_diff,
    caption,
    hard_negative,
    heldout_prompts,
    parse_caption,
    parse_prompt,
    random_scene,
    render,
    sample_scene,
    satisfies,
    train_prompts,
)

# Pins the split: any change to the universe or the hash rule changes this digest.
HELDOUT_DIGEST = "25fdc190fcd0ffbb8930efbf076161bbd194a9492128bcdd016f929ef6075586"


def test_prompt_text_round_trips_for_every_prompt():
    prompts = all_prompts()
    assert len({p.text for p in prompts}) == len(prompts)
    for spec in prompts:
        assert parse_prompt(spec.text) == spec
        assert spec.text == spec.text.lower() and spec.text.strip() == spec.text


@pytest.mark.parametrize("text", [
    "a red circle", "a triangle", "one green triangle", "three green triangles",
    "a red circle and a blue square", "a red circle left of a blue square", "a purple square below a yellow circle",
])
def test_examples_parse(text):
    assert parse_prompt(text).text == text


@pytest.mark.parametrize("bad", [
    "", "a", "a red", "two green triangle", "one green triangles", "five red circles", "a pink circle",
    "a blue square and a red circle",  # not in palette order: one text per meaning
    "a red circle left of a red square", "a red circle near a blue square", "a red circle.",
])
def test_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse_prompt(bad)


def test_vocabulary_covers_every_prompt_and_caption_word():
    words = {w for p in all_prompts() for w in p.text.split()}
    rng = np.random.default_rng(0)
    words |= {w for _ in range(300) for w in caption(random_scene(rng)).split()}
    words |= set(caption([]).split())
    assert words == set(VOCABULARY)


def test_split_is_fixed_disjoint_and_covers_every_category():
    train, held = train_prompts(), heldout_prompts()
    assert set(train).isdisjoint(held)
    assert set(train) | set(held) == set(all_prompts())
    assert hashlib.sha256("\n".join(p.text for p in held).encode()).hexdigest() == HELDOUT_DIGEST
    assert 0.15 < len(held) / len(all_prompts()) < 0.25
    assert set(Counter(p.category for p in train)) == set(CATEGORIES)
    assert set(Counter(p.category for p in held)) == set(CATEGORIES)


def test_sampled_scenes_satisfy_their_prompt_and_render():
    rng = np.random.default_rng(1)
    for spec in all_prompts():
        scene = sample_scene(spec, rng)
        assert satisfies(scene, spec)
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        image = render(scene)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8


def test_everything_is_deterministic_by_seed():
    spec = parse_prompt("three red squares")
    a = sample_scene(spec, np.random.default_rng(7))
    b = sample_scene(spec, np.random.default_rng(7))
    assert a == b and np.array_equal(render(a), render(b))
    assert random_scene(np.random.default_rng(3)) == random_scene(np.random.default_rng(3))
    assert hard_negative(spec, np.random.default_rng(5)) == hard_negative(spec, np.random.default_rng(5))
    scenes = {sample_scene(spec, np.random.default_rng(s)) for s in range(20)}
    assert len(scenes) > 10  # seeds do vary the scene


def test_caption_lists_objects_by_cell_and_round_trips():
    rng = np.random.default_rng(2)
    for _ in range(200):
        scene = random_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == [(o.colour, o.shape, o.cell) for o in scene.objects]
    spec = parse_prompt("a red circle left of a blue square")
    scene = sample_scene(spec, np.random.default_rng(0))
    assert "red circle" in caption(scene) and "blue square" in caption(scene)
    assert caption([]) == "nothing"


def test_satisfies_is_closed_world():
    scene = sample_scene(parse_prompt("two blue circles"), np.random.default_rng(0))
    assert satisfies(scene, parse_prompt("two blue circles"))
    assert not satisfies(scene, parse_prompt("one blue circle"))
    assert not satisfies(scene, parse_prompt("a blue circle"))  # an extra object is a mismatch


def test_hard_negative_changes_exactly_one_attribute_and_is_unsatisfied():
    rng = np.random.default_rng(4)
    changed = Counter()
    for spec in all_prompts():
        for _ in range(3):
            scene = sample_scene(spec, rng)
            for neg in (hard_negative(spec, rng), hard_negative(spec, rng, scene=scene)):
                diff = attribute_diff(spec, neg)
                assert len(diff) == 1, (spec.text, neg.text)
                assert neg.is_valid() and parse_prompt(neg.text) == neg
                assert not satisfies(scene, neg), (spec.text, neg.text, caption(scene))
                changed[diff[0].rstrip("2")] += 1
    assert set(changed) == {"colour", "shape", "count", "relation"}


def test_hard_negative_can_stay_inside_the_training_prompts():
    allowed = set(train_prompts())
    rng = np.random.default_rng(6)
    for spec in train_prompts():
        assert hard_negative(spec, rng, allowed=allowed) in allowed


def test_prompt_spec_is_hashable_and_frozen():
    spec = PromptSpec("single", "circle", "red")
    assert {spec: 1}[parse_prompt("a red circle")] == 1
    with pytest.raises(AttributeError):
        spec.colour = "blue"  # type: ignore[misc]
