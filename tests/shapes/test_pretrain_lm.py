"""shapes.pretrain on a tiny config: the training functions learn, the data is train-only and
formatted exactly as the judge reads it at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.janus import DESCRIBE_QUESTION
from models.tiny import TinySpec
from shapes.pretrain import PretrainConfig, build_model, trainable_parameters, train_step, understanding_rows
from shapes.pretrain_vq import VQSettings, build_vq, save_vq
from shapes.world import heldout_prompts

TINY = TinySpec(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, vision_hidden=32, vision_layers=1,
                codebook=32, vq_embed_dim=8, vq_base_channels=32, vq_channel_multiplier=[1, 1, 2],
                vq_res_blocks=1, vq_latent_channels=32, vision_patch=8, vq_patch=4, max_position=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    vq_dir = tmp_path_factory.mktemp("vq")
    save_vq(build_vq(VQSettings(base_channels=32, codebook=32, embed_dim=8, latent_channels=32,
                                projection_dim=32)), vq_dir)
    cfg = PretrainConfig(spec=TINY, und_images=3, mix_images=2, gen_rows=4, lr=3e-3, gen_lr=3e-3, warmup=1)
    m = build_model(cfg, vq_dir, seed=0)
    return m, cfg


def test_vq_is_loaded_frozen_and_seeds_generation_embeddings(tiny):
    m, _ = tiny
    params = trainable_parameters(m)
    vq_ids = {id(p) for p in m.janus.model.vqmodel.parameters()}
    assert params and not any(id(p) in vq_ids for p in params)
    code = torch.nn.functional.normalize(m.janus.model.vqmodel.quantize.embedding.weight, dim=-1)
    assert torch.allclose(m.janus.model.generation_embeddings.weight, code)


@pytest.mark.parametrize("stage,key", [("understanding", "und_loss"), ("generation", "gen_loss")])
def test_a_few_steps_reduce_the_loss(tiny, stage, key):
    m, cfg = tiny
    opt = torch.optim.AdamW(trainable_parameters(m), lr=3e-3)
    # The same step index gives the same batch: repeated steps must fit it.
    losses = [train_step(m, opt, stage, 1, 0, cfg, m.janus.model.vqmodel.eval())[key] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_rows_are_balanced_train_only_and_match_the_inference_text(tiny):
    m, cfg = tiny
    groups = understanding_rows(12, np.random.default_rng(0), m.janus.model.vqmodel.eval(), cfg)
    held = {s.text for s in heldout_prompts()}
    questions = [q for _, qs, _ in groups.values() for q in qs]
    targets = [t for _, _, ts in groups.values() for t in ts]
    asked = [q.split("describe ", 1)[1].split("?")[0] for q in questions if q.startswith("Does this image")]
    assert asked and not held & set(asked)
    yes = sum(t.endswith(("Yes", "score is 1<|end_of_sentence|>")) for t in targets)
    no = sum(t.endswith(("No", "score is 0<|end_of_sentence|>")) for t in targets)
    assert abs(yes - no) <= len(asked) // 3 + 1  # 2 fixed + 1 coin flip per image
    # describe_prob: training text == judge(mode="describe_prob") text up to the answer
    i = next(k for k, q in enumerate(groups[None][1]) if q.startswith(DESCRIBE_QUESTION[:20]))
    q, t = groups[None][1][i], groups[None][2][i]
    description = t.rsplit(" . Answer :", 1)[0].strip()
    train = m.understanding_batch([groups[None][0][i]], [q], [t])["input_ids"][0]
    infer = m._understanding_inputs([groups[None][0][i]], [q], None, [f" {description} . Answer :"])["input_ids"][0]
    assert torch.equal(train[: len(infer)], infer)
    assert m.tokenizer.unk_token_id not in train.tolist()


def test_main_resumes_into_extra_generation_phases(tmp_path):
    """The CLI end to end at the shipped sizes, seconds per stage: an extra generation phase
    continues the step counter (new data) on its own clock, and a second one stacks on the first."""
    import json

    from shapes.pretrain import main

    vq = tmp_path / "vq"
    save_vq(build_vq(VQSettings(projection_dim=128)), vq)  # random VQ with the shipped sizes
    out = tmp_path / "run"
    base = ["--out", str(out), "--vq", str(vq), "--understanding-minutes", "0.01", "--generation-minutes", "0.01",
            "--threads", "1", "--probe-minutes", "100"]
    main(base)
    first = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert first["done"] and "extra_phases" not in first
    main([*base, "--resume", "--extend-generation", "0.01", "--gen-rows", "4", "--mix-images", "1"])
    second = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert second["extra_phases"] == 1 and second["extra_start_step"] == first["generation_steps"]
    assert second["generation_steps"] > first["generation_steps"] and second["extra_s"] >= 0.6
    assert second["understanding_steps"] == first["understanding_steps"]  # finished stages are not redone
    main([*base, "--resume", "--extend-generation", "0.01", "--gen-rows", "4", "--mix-images", "1"])
    third = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert third["extra_phases"] == 2 and third["extra_start_step"] == second["generation_steps"]
    history = json.loads((out / "run.json").read_text())["history"]
    assert len(history) == 3 and "--extend-generation" in history[-1]["command"]
    assert history[-1]["config"]["gen_rows"] == 4
