"""CPR rows in the trainer (trainers/cpr.py): row checks, the per-micro-batch plan, the two losses on
the tiny random Janus, and one real Ray Train fit that learns its caption rows beside its image rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.base import judge_row
from models.loading import load_model
from models.lora import LoraSpec, attach_lora
from trainers import cpr as C
from trainers.train import TrainArgs, TrainDataError, train_adapter, validate

T, V = 16, 64  # tiny model: image tokens per image, codebook size


def image_rows(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_id": f"p{i}", "prompt": "a red circle", "image_tokens": t.tolist()}
            for i, t in enumerate(torch.randint(0, V, (n, T), generator=g))]


def cpr_rows(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, V, (2 * n, T), generator=g).tolist()
    out = []
    for i in range(n):
        kind = ("caption", "judgement", "reflection")[i % 3]
        q, t, system = (judge_row("binary", "a blue square", "", i % 2 == 0) if kind == "judgement" else
                        ("Which prompt was this image drawn from?", " a red circle<|end_of_sentence|>", ""))
        out.append({"kind": kind, "prompt_id": f"c{i}", "prompt": "a red circle", "image_tokens": toks[i],
                    "question": "" if kind == "reflection" else q, "target": "" if kind == "reflection" else t,
                    "system": system or "", "source_tokens": toks[n + i] if kind == "reflection" else []})
    return out


@pytest.mark.parametrize("change, message", [
    ({"kind": "poem"}, "kind 'poem' is not one of"),
    ({"image_tokens": [1] * (T - 1)}, f"CPR row 0: image_tokens has {T - 1} tokens, the model generates {T}"),
    ({"image_tokens": [0.5] * T}, "CPR row 0: image_tokens must be a list of ints"),
    ({"image_tokens": [V] * T}, "outside the codebook"),
    ({"question": "  "}, "question and target must be non-empty"),
    ({"prompt": None}, "missing column(s) prompt"),
])
def test_bad_cpr_rows_are_refused_before_training(tmp_path, change, message):
    rows = cpr_rows(3)
    rows[0].update(change)
    args = TrainArgs(model_path="tiny", num_workers=1, storage_path=str(tmp_path), lora=LoraSpec(r=4, alpha=8))
    with pytest.raises(TrainDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(args, image_rows(), aux=rows)
    bad_source = cpr_rows(3)
    bad_source[2]["source_tokens"] = []  # a reflection row needs its source image
    with pytest.raises(TrainDataError, match="source_tokens"):
        validate(args, image_rows(), aux=bad_source)


def test_every_cpr_row_is_seen_once_per_epoch_across_ranks_and_micro_batches():
    n, world, num_micro = 23, 2, 3
    for epoch in (0, 1):
        seen = np.concatenate([c for rank in range(world) for c in C.aux_plan(n, world, rank, 0, epoch, num_micro)])
        assert sorted(seen.tolist()) == list(range(n))
    assert C.aux_plan(n, 2, 0, 0, 0, 3)[0].tolist() != C.aux_plan(n, 2, 0, 0, 1, 3)[0].tolist()  # reshuffled
    plan = [[np.arange(2), np.arange(2)], [np.arange(2)]]  # steps -> micro-batches (grad_accum 2)
    chunks = C.aux_plan(n, world, 0, 0, 0, 3)
    steps = [C.step_aux(C.pack_aux(cpr_rows(n), T), plan, s, world, 0, 0, 0) for s in (0, 1)]
    assert [[c.tolist() for c in s] for s in steps] == [[chunks[0].tolist(), chunks[1].tolist()], [chunks[2].tolist()]]
    assert C.step_aux(None, plan, 0, world, 0, 0, 0) is None


def test_understanding_nll_is_the_models_own_loss_and_reflection_uses_its_source():
    m = load_model("tiny")
    rows = [r for r in cpr_rows(6) if r["kind"] != "reflection"]
    images = m.decode_tokens(torch.tensor([r["image_tokens"] for r in rows]))
    with torch.no_grad():
        for system in dict.fromkeys(r["system"] for r in rows):  # no system prompt, and the binary judge's
            sel = [r for r in rows if r["system"] == system]
            ims = [images[i] for i, r in enumerate(rows) if r["system"] == system]
            nll, count = C.understanding_nll(m, ims, [r["question"] for r in sel], [r["target"] for r in sel],
                                             [system] * len(sel))
            batch = m.understanding_batch(ims, [r["question"] for r in sel], [r["target"] for r in sel],
                                          system=system or None)
            assert count == int((batch["labels"][:, 1:] != -100).sum()) > 0
            assert math.isclose(nll.item() / count, m.janus(**batch).loss.item(), rel_tol=1e-4)
        g = torch.Generator().manual_seed(3)
        src_a, src_b, target = torch.randint(0, V, (3, 2, T), generator=g)
        a = C.reflection_logprobs(m, ["a red circle"] * 2, src_a, target)  # (2, T)
        b = C.reflection_logprobs(m, ["a red circle"] * 2, src_b, target)
    assert a.shape == (2, T) and (a <= 0).all()
    assert not torch.allclose(a, b)  # the source image conditions the target's log-probs
    lora = attach_lora(load_model("tiny"), LoraSpec(r=4, alpha=8, dropout=0.0))
    packed = C.pack_aux(cpr_rows(6), T)
    loss, stats = C.aux_loss(lora, packed, np.arange(6), {})
    loss.backward()
    grads = [p.grad for n, p in lora.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert stats["und_rows"] == 4 and stats["reflection_rows"] == 2
    expected = (stats["und_nll_rows"] + stats["reflection_nll_rows"]) / 6
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


@pytest.mark.ray
def test_a_fit_with_caption_rows_learns_them_beside_the_image_rows(ray_session, tmp_path):
    captions = [r for r in cpr_rows(12) if r["kind"] == "caption"]  # 4 fixed (image, prompt) rows
    args = TrainArgs(objective="sft", model_path="tiny", num_workers=2, epochs=6, batch_size=2, lr=1e-2,
                     lora=LoraSpec(r=4, alpha=8, dropout=0.0), storage_path=str(tmp_path / "s"), run_name="cpr")
    result = train_adapter(args, image_rows(8), str(tmp_path / "adapter"), aux=captions)
    h = result.history
    assert len(h) == 12  # the image rows alone decide the steps: 8 rows / 2 ranks / batch 2 x 6 epochs
    assert all(s["und_rows"] > 0 and math.isfinite(s["und_loss"]) for s in h)
    assert all(math.isnan(s["reflection_loss"]) for s in h)  # no reflection rows were given
    assert np.mean([s["und_loss"] for s in h[-2:]]) < 0.5 * np.mean([s["und_loss"] for s in h[:2]])
    assert all(math.isclose(s["loss"], s["gen_loss"] + s["und_loss"], rel_tol=0.05) for s in h)
