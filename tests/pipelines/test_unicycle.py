"""UniCycle on hand-built scenes whose answers are known: each of the four cases, relations, the
metrics' shares, and where the descriptions come from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.shapes_checks import described_objects, unicycle, unicycle_metrics
from shapes.oracle import check
from shapes.world import caption, parse_prompt, render, sample_scene

SPATIAL = "a red circle left of a blue square"


def scene_image(prompt: str, seed: int = 0):
    scene = sample_scene(parse_prompt(prompt), np.random.default_rng(seed))
    return scene, Image.fromarray(render(scene))


def rows(prompt: str, images: list, answers: list, mode: str = "describe_prob") -> pd.DataFrame:
    return pd.DataFrame({"kind": "generation", "prompt": prompt, "category": "spatial",
                         "external_verdict": [check(im, prompt) for im in images],
                         "own_answer": answers, "judge_mode": mode})


def test_the_four_cases_and_faithfulness():
    right_scene, right = scene_image(SPATIAL)
    wrong_scene, wrong = scene_image("a green triangle")  # another prompt's image
    mirrored = caption(right_scene).replace("left", "LEFT").replace("right", "left").replace("LEFT", "right")
    frame = rows(SPATIAL, [right, right, wrong, wrong, right],
                 [caption(right_scene),  # closed and right
                  mirrored,  # a right image described mirrored: the relation no longer holds
                  caption(wrong_scene),  # a wrong image, described as it is
                  caption(right_scene),  # a wrong image described as the prompt: a false pass
                  "a picture of shapes"])  # not in the caption grammar
    out = unicycle(frame, [right, right, wrong, wrong, right])
    assert list(out["external_verdict"]) == [True, True, False, False, True]
    assert list(out["cycle_ok"]) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert list(out["cycle_failure"]) == ["", "understood_wrong", "generated_wrong", "", "understood_wrong"]
    assert list(out["caption_faithful"]) == [1.0, 0.0, 1.0, 0.0, 0.0]
    m = unicycle_metrics(out)
    assert m["eval/unicycle"] == pytest.approx(2 / 5) and m["eval/unicycle/n"] == 5
    assert m["eval/unicycle/generated_wrong"] == pytest.approx(1 / 5)
    assert m["eval/unicycle/understood_wrong"] == pytest.approx(2 / 5)
    assert m["eval/unicycle/false_pass"] == pytest.approx(1 / 5)
    assert m["eval/caption_faithful"] == pytest.approx(2 / 5)
    assert m["eval/unicycle"] + m["eval/unicycle/generated_wrong"] + m["eval/unicycle/understood_wrong"] == 1
    assert m["eval/unicycle/spatial/n"] == 5 and m["eval/unicycle/ci_low"] < 0.4 < m["eval/unicycle/ci_high"]


def test_understanding_rows_are_left_alone_and_descriptions_need_a_source():
    scene, image = scene_image("two yellow triangles")
    frame = pd.concat([rows("two yellow triangles", [image], [caption(scene)]),
                       rows("two yellow triangles", [image], ["n/a"]).assign(kind="understanding")],
                      ignore_index=True)
    out = unicycle(frame, [image])
    assert out.loc[0, "cycle_ok"] == 1.0 and np.isnan(out.loc[1, "cycle_ok"]) and out.loc[1, "cycle_failure"] == ""
    with pytest.raises(ValueError, match="no descriptions"):
        unicycle(rows("two yellow triangles", [image], [""], mode="prob"), [image])


def test_other_judge_modes_ask_the_model_to_describe():
    from models.loading import load_model

    images = [scene_image(SPATIAL, seed)[1] for seed in range(3)]
    frame = rows(SPATIAL, images, ["", "", ""], mode="prob")  # prob mode writes no description
    out = unicycle(frame, images, load_model("shapes"))  # the shipped model describes clean renders right
    assert list(out["cycle_ok"]) == [1.0, 1.0, 1.0] and list(out["caption_faithful"]) == [1.0, 1.0, 1.0]


def test_described_objects_parses_only_the_caption_grammar():
    assert described_objects("red circle top left and blue square bottom right") == [
        ("red", "circle", 0), ("blue", "square", 3)]
    assert described_objects("nothing") == []
    assert described_objects("red blob top left") is None and described_objects(None) is None
