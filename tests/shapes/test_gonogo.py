"""The go / no-go script end to end on the shipped model, at a toy dose (behaviour, not numbers)."""

from __future__ import annotations

import json

import pytest
import torch

from models.loading import shapes_checkpoint_dir

pytestmark = pytest.mark.skipif(not (shapes_checkpoint_dir() / "config.json").is_file(),
                                reason="no shipped shapes checkpoint")


def test_one_round_reports_every_arm_on_the_same_samples(tmp_path):
    from shapes.gonogo import main

    torch.set_num_threads(1)
    out = tmp_path / "gonogo.json"
    main(["--prompts", "6", "--samples", "4", "--steps", "2", "--batch", "4", "--heldout-images", "1",
          "--train-images", "1", "--cfg-weight", "2", "--loss-branch", "guided", "--out", str(out)])
    r = json.loads(out.read_text())
    rnd = r["round"]
    assert rnd["samples"] == 24 and 0 <= rnd["accepted_own"] <= 24 and 0 <= rnd["oracle_correct"] <= 24
    assert r["settings"]["cfg_weight"] == 2.0 and r["settings"]["loss_branch"] == "guided"
    assert r["base"]["heldout"]["overall"]["n"] == 130 and r["base"]["train"]["overall"]["n"] == 6
    for arm, rows in (("own_judge", rnd["accepted_own"]), ("random_judge", rnd["accepted_own"]),
                      ("oracle_judge", rnd["oracle_correct"])):
        if rows == 0:
            assert "skipped" in r[arm]
            continue
        assert r[arm]["train_rows"] == rows  # random arm: as many rows as the own judge accepted
        assert r[arm]["heldout"]["overall"]["n"] == 130 and r[arm]["loss_first"] > 0


def test_the_shipped_card_numbers_come_from_a_full_round():
    r = json.loads((shapes_checkpoint_dir() / "gonogo.json").read_text())
    assert r["settings"]["prompts"] >= 200 and r["settings"]["samples"] >= 8  # the minimum dose
    assert r["round"]["samples"] == r["settings"]["prompts"] * r["settings"]["samples"]
    for arm in ("base", "own_judge", "random_judge", "oracle_judge"):
        assert r[arm]["heldout"]["overall"]["n"] >= 1000, arm
