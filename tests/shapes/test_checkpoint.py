"""The shipped shapes model: loads through the standard interface, has the card's sizes, and a
quick held-out recomputation agrees with its metrics.json.

The recomputation uses a different seed and a small sample (64 understanding pairs, 64 generated
images), so it checks the card's numbers independently rather than replaying them: the card's
point estimate must fall inside the small sample's 99 % Wilson interval (z = 2.576; about +-0.15
at n = 64). Generation accuracy is low (0.1-0.3) and its per-image outcomes are noisy, so the same
interval is a looser check there than for understanding -- enough to catch a broken checkpoint,
a wrong VQ or a mis-recorded number, not a 3-point drift.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.loading import load_model, shapes_checkpoint_dir
from pipelines.stats import wilson_ci

CKPT = shapes_checkpoint_dir()
pytestmark = pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="no shipped shapes checkpoint")


def wilson99(k: int, n: int) -> tuple[float, float]:
    return wilson_ci(k, n, z=2.576)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model("shapes")


@pytest.fixture(scope="module")
def metrics():
    return json.loads((CKPT / "metrics.json").read_text())


def test_loads_with_expected_sizes(model):
    assert model.num_image_tokens == 64 and model.image_size == 32
    assert model.janus.config.vq_config.num_embeddings == 256
    assert model.janus.model.generation_head.vision_head.out_features == 256
    assert model.default_judge_mode == "describe_prob"
    size = sum(f.stat().st_size for f in CKPT.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


def test_card_files_present(metrics):
    assert (CKPT / "MODEL_CARD.md").is_file()
    for key in ("understanding", "generation", "nonunified", "weak_generation"):
        assert {"acc", "n", "ci95"} <= set(metrics[key]["overall"])


def test_understanding_recomputes(model, metrics):
    from shapes.evaluate import understanding_accuracy

    r = understanding_accuracy(model, 64, seed=101)["overall"]
    lo, hi = wilson99(r["k"], r["n"])
    assert lo <= metrics["understanding"]["overall"]["acc"] <= hi, (r, metrics["understanding"]["overall"])


def test_generation_recomputes(model, metrics):
    from shapes.evaluate import generation_accuracy

    r = generation_accuracy(model, 32, 2, seed=101)["overall"]
    lo, hi = wilson99(r["k"], r["n"])
    assert lo <= metrics["generation"]["overall"]["acc"] <= hi, (r, metrics["generation"]["overall"])


def test_category_mean_weights_every_category_the_same():
    from shapes.evaluate import by_category, category_mean

    # 90 spatial images all wrong, 10 single images all right: overall 0.10, category mean 0.50.
    rates = by_category(["spatial"] * 90 + ["single"] * 10, [False] * 90 + [True] * 10)
    m = category_mean(rates)
    assert rates["overall"]["acc"] == pytest.approx(0.10) and m["acc"] == pytest.approx(0.50)
    assert m["categories"] == 2 and m["n"] == 100
    lo, hi = m["ci95"]
    assert 0.0 < lo < 0.5 < hi < 1.0  # a 0/90 and a 10/10 category are still uncertain
    wide = category_mean(by_category(["a"] * 9 + ["b"], [False] * 9 + [True]))["ci95"]
    assert wide[1] - wide[0] > hi - lo  # fewer images, wider interval
