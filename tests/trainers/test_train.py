"""Ray Train LoRA training (trainers/train.py): validation, reference log-probs, SFT and DPO fits.

Two real fits on a local Ray (2 CPU workers, the tiny random Janus) are shared by module-scoped
fixtures, because each `fit()` costs ~15 s fixed:
  * `sft_run`: 8 fixed samples, 6 epochs, fresh LoRA.
  * `dpo_run`: 8 pairs, starting from the SFT adapter (init_adapter), reference log-probs
    precomputed under base + that adapter; a fault drill (trainers/faults.py) makes the last worker
    die hard in step 6 (checkpoint every 4 steps, max_failures=1), so the run must resume from step 4.
Everything else (validation, data plan, schedule, reference log-probs) runs without Ray.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from models.loading import load_model
from models.lora import AdapterError, LoraSpec, attach_lora, load_adapter, verify_adapter
from trainers import data as D
from trainers.faults import drill_path
from trainers.train import (PolicyLogprobs, TrainArgs, TrainDataError, lr_factor, precompute_ref_logprobs,
                            train_adapter, validate)

PROMPTS = ["a red circle", "two blue square", "a green triangle left of a yellow circle", "purple square above"]
T, V = 16, 64  # tiny model: image tokens per image, codebook size


def sft_rows(n: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, T), generator=g)  # (n, T)
    return [{"prompt_id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "image_tokens": t.tolist()}
            for i, t in enumerate(tokens)]


def dpo_pairs(n: int = 8, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = torch.randint(0, V, (2, n, T), generator=g)  # 2 x (n, T)
    return [{"prompt_id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "chosen_tokens": c.tolist(),
             "rejected_tokens": r.tolist()} for i, (c, r) in enumerate(zip(chosen, rejected))]


def base_args(tmp_path, **kw) -> TrainArgs:
    defaults = dict(objective="sft", model_path="tiny", num_workers=2, epochs=6, batch_size=2, lr=5e-3,
                    # no LoRA dropout: the DPO test checks that step 1 sits exactly at the reference
                    lora=LoraSpec(r=4, alpha=8, dropout=0.0), storage_path=str(tmp_path / "storage"),
                    run_name="run")
    return TrainArgs(**{**defaults, **kw})


def mean(xs) -> float:
    return sum(xs) / len(xs)


# ------------------------------------------------------------------------------------------ no Ray
def test_step_plan_is_deterministic_disjoint_and_balanced():
    plans = [D.step_plan(11, world=2, rank=r, batch_size=2, grad_accum=2, seed=3, epoch=0) for r in (0, 1)]
    assert plans[0][0][0].tolist() == D.step_plan(11, 2, 0, 2, 2, seed=3, epoch=0)[0][0].tolist()
    rows = [np.concatenate([mb for step in p for mb in step]) for p in plans]
    assert len(rows[0]) == len(rows[1]) == 5  # 11 // 2 on each rank: equal batch counts for DDP
    assert not set(rows[0]) & set(rows[1])
    assert [len(s) for s in plans[0]] == [2, 1] == [len(s) for s in plans[1]]  # micro-batches per step
    assert D.steps_per_epoch(11, 2, 2, 2) == 2
    other_epoch = np.concatenate([mb for s in D.step_plan(11, 2, 0, 2, 2, seed=3, epoch=1) for mb in s])
    assert other_epoch.tolist() != rows[0].tolist()


def test_lr_schedule_warmup_then_decay():
    assert lr_factor(0, warmup=3, total=10, schedule="linear") == pytest.approx(0.25)
    assert lr_factor(3, 3, 10, "linear") == 1.0 and lr_factor(3, 3, 10, "cosine") == 1.0
    assert lr_factor(9, 3, 10, "linear") == pytest.approx(1 / 7)
    assert lr_factor(9, 3, 10, "cosine") < lr_factor(6, 3, 10, "cosine") < 1.0
    assert lr_factor(9, 0, 10, "constant") == 1.0


def test_load_rows_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(sft_rows(4)), tmp_path / "sft.parquet")
    rows = D.load_rows(str(tmp_path / "sft.parquet"))
    D.check_rows(rows, "sft", T, V)
    assert D.pack_rows(rows, "sft").tokens["image_tokens"].shape == (4, T)


def _mutate(rows, i, **kw):
    rows = [dict(r) for r in rows]
    rows[i].update(kw)
    return [{k: v for k, v in r.items() if v is not _DROP} for r in rows]


_DROP = object()
_PAIRS_WITH_REF = [{**p, "ref_chosen_logp": -50.0, "ref_rejected_logp": -51.0} for p in dpo_pairs(4)]
INVALID = {
    "empty SFT set": ({}, [], TrainDataError, "is empty"),
    "missing column": ({}, _mutate(sft_rows(4), 1, image_tokens=_DROP), TrainDataError, "missing column"),
    "wrong token length": ({}, _mutate(sft_rows(4), 2, image_tokens=[1] * (T - 1)), TrainDataError, "15 tokens"),
    "token outside codebook": ({}, _mutate(sft_rows(4), 0, image_tokens=[V] * T), TrainDataError,
                               "outside the codebook"),
    "blank prompt": ({}, _mutate(sft_rows(4), 3, prompt=" "), TrainDataError, "non-empty string"),
    "DPO without ref": ({"objective": "dpo"}, dpo_pairs(4), TrainDataError, "precompute_ref_logprobs"),
    "DPO NaN ref": ({"objective": "dpo"}, _mutate(_PAIRS_WITH_REF, 0, ref_chosen_logp=math.nan), TrainDataError,
                    "finite"),
    "empty DPO set": ({"objective": "dpo"}, [], TrainDataError, "DPO pair set is empty"),
    "fewer rows than workers": ({"num_workers": 3}, sft_rows(2), TrainDataError, "every worker"),
    "LoRA target matches nothing": ({"lora": LoraSpec(target_modules=r".*no_such_proj")}, sft_rows(4), ValueError,
                                    "matches no module"),
    "lr zero": ({"lr": 0.0}, sft_rows(4), ValueError, "lr must be > 0"),
    "batch_size zero": ({"batch_size": 0}, sft_rows(4), ValueError, "batch_size"),
    "label smoothing with ipo": ({"loss_type": "ipo", "label_smoothing": 0.1}, sft_rows(4), ValueError, "sigmoid"),
    "unknown schedule": ({"lr_schedule": "step"}, sft_rows(4), ValueError, "lr_schedule"),
    "bf16 on CPU": ({"precision": "bf16"}, sft_rows(4), ValueError, "needs use_gpu"),
    "fsdp on CPU": ({"strategy": "fsdp"}, sft_rows(4), ValueError, "fsdp"),
    "relative storage": ({"storage_path": "rel/dir"}, sft_rows(4), ValueError, "absolute"),
    "missing init adapter": ({"init_adapter": "/nonexistent/adapter"}, sft_rows(4), AdapterError, "does not exist"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_validate_rejects(case, tmp_path):
    overrides, rows, error, message = INVALID[case]
    with pytest.raises(error, match=message):
        validate(base_args(tmp_path, **overrides), rows)


@pytest.mark.parametrize("text,message", [("{}", "fail_at_step"), ('{"fail_at_step": 0}', ">= 1"),
                                          ('{"fail_at_step": true}', ">= 1"), ("not json", "fail_at_step")])
def test_a_bad_fault_drill_file_is_refused_before_training(tmp_path, text, message):
    args = base_args(tmp_path)
    os.makedirs(args.storage_path)
    with open(drill_path(args.storage_path, args.run_name), "w") as fh:
        fh.write(text)
    with pytest.raises(ValueError, match=message) as e:
        validate(args, sft_rows(4))
    assert "run.fault.json" in str(e.value)


def test_validation_fires_before_any_ray_call(tmp_path, monkeypatch):
    import ray
    import ray.train.torch

    def forbidden(*a, **k):
        raise AssertionError("Ray was called before validation")
    monkeypatch.setattr(ray, "put", forbidden)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", forbidden)
    args = base_args(tmp_path)
    with pytest.raises(TrainDataError, match="outside the codebook"):
        train_adapter(args, _mutate(sft_rows(4), 1, image_tokens=[-1] * T), str(tmp_path / "out"))
    assert not os.path.exists(os.path.join(args.storage_path, args.run_name))
    assert not (tmp_path / "out").exists()


def test_precompute_ref_logprobs_matches_teacher_forcing():
    pairs = dpo_pairs(3)
    out = precompute_ref_logprobs("tiny", None, pairs, batch_size=2)
    m = load_model("tiny")
    with torch.no_grad():
        chosen = m.image_logprobs([p["prompt"] for p in pairs], [p["chosen_tokens"] for p in pairs]).total  # (3,)
    assert [o["ref_chosen_logp"] for o in out] == pytest.approx(chosen.tolist(), abs=1e-4)
    assert all(o["ref_rejected_logp"] < 0 and o["prompt_id"] == p["prompt_id"] for o, p in zip(out, pairs))


def test_policy_logprobs_are_the_samplers_guided_logprobs():
    m = load_model("tiny")
    out = m.generate_images(PROMPTS[:2], num_images=2, seed=3, cfg_weight=2.5, temperature=0.8, return_logprobs=True)
    prompts = [p for p in PROMPTS[:2] for _ in range(2)]
    ids, mask = m.encode_generation_prompts(prompts)
    with torch.no_grad():
        guided = PolicyLogprobs(m, cfg_weight=2.5, temperature=0.8)(ids, mask, out.tokens.reshape(4, T))  # (4, T)
        conditional = PolicyLogprobs(m)(ids, mask, out.tokens.reshape(4, T))  # (4, T)
    assert guided.numpy() == pytest.approx(out.logprobs.reshape(4, T).numpy(), abs=1e-4)
    assert not torch.allclose(guided, conditional, atol=1e-2)  # the branch choice matters


@pytest.mark.parametrize("cfg_weight", [1.0, 3.0])
def test_sft_on_a_branch_raises_the_likelihood_of_that_branch(cfg_weight):
    """A few SFT steps on the log-probs of one distribution (guided at 3, or conditional) raise them."""
    torch.manual_seed(0)
    m = attach_lora(load_model("tiny"), LoraSpec(r=4, alpha=8))
    rows = sft_rows(4)
    prompts, tokens = [r["prompt"] for r in rows], torch.tensor([r["image_tokens"] for r in rows])  # (4, T)
    ids, mask = m.encode_generation_prompts(prompts)
    policy = PolicyLogprobs(m, cfg_weight=cfg_weight)
    opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    with torch.no_grad():
        before = policy(ids, mask, tokens).mean().item()
    for _ in range(5):
        opt.zero_grad()
        loss = -policy(ids, mask, tokens).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = policy(ids, mask, tokens).mean().item()
    assert after > before + 0.05


# ------------------------------------------------------------------------------------------ Ray fits
@pytest.fixture(scope="module")
def sft_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    args = base_args(tmp, warmup_steps=2, lr_schedule="linear", run_name="sft")
    rows = sft_rows()
    result = train_adapter(args, rows, str(tmp / "adapter"))
    return args, rows, result


@pytest.fixture(scope="module")
def dpo_run(ray_session, sft_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    init = sft_run[2].adapter_dir
    # Guided (CFG 3) log-probs for reference and policy alike: step 1 must then sit exactly at the reference.
    pairs = precompute_ref_logprobs("tiny", init, dpo_pairs(), batch_size=4, cfg_weight=3.0)
    args = base_args(tmp, objective="dpo", init_adapter=init, beta=0.1, run_name="dpo", cfg_weight=3.0,
                     checkpoint_every=4, max_failures=1)
    os.makedirs(args.storage_path, exist_ok=True)
    with open(drill_path(args.storage_path, args.run_name), "w") as fh:  # the last rank dies in step 6
        json.dump({"fail_at_step": 6}, fh)
    return args, pairs, train_adapter(args, pairs, str(tmp / "adapter"))


@pytest.mark.ray
def test_sft_loss_falls_and_history_is_complete(sft_run):
    args, rows, result = sft_run
    steps = args.epochs * D.steps_per_epoch(len(rows), 2, args.batch_size, args.grad_accum)  # 6 * 2
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    losses = [h["loss"] for h in result.history]
    assert mean(losses[-3:]) < mean(losses[:3]) - 1.0, losses
    lrs = [h["lr"] for h in result.history]  # warm-up 2 steps, then linear decay
    assert lrs[0] == pytest.approx(args.lr / 3) and lrs[2] == pytest.approx(args.lr)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    for h in result.history:
        assert h["tokens_per_s"] > 0 and math.isfinite(h["grad_norm"]) and h["token_logp"] == pytest.approx(-h["loss"])
    record = json.loads(open(os.path.join(result.adapter_dir, "train_metrics.json")).read())
    assert record["metrics"]["step"] == steps and len(record["history"]) == steps


@pytest.mark.ray
def test_sft_replicas_hold_identical_weights(sft_run):
    metrics = sft_run[2].metrics
    assert metrics["world_size"] == 2
    assert metrics["replica_checksum_spread"] == 0.0


@pytest.mark.ray
def test_sft_trains_lora_and_head_only(sft_run):
    args, _, result = sft_run
    fresh = load_model("tiny")
    torch.manual_seed(args.seed)
    fresh = attach_lora(fresh, args.lora)
    frozen = sum(p.double().sum().item() for p in fresh.model.parameters() if not p.requires_grad)
    trainable = sum(p.double().sum().item() for p in fresh.model.parameters() if p.requires_grad)
    assert result.metrics["frozen_checksum"] == pytest.approx(frozen, rel=0, abs=1e-9)
    assert result.metrics["trainable_checksum"] != pytest.approx(trainable, abs=1e-3)
    trained = load_adapter(load_model("tiny"), result.adapter_dir)
    params = dict(trained.model.named_parameters())
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised to 0, so they moved
    base_head = load_model("tiny").janus.model.generation_head.state_dict()
    head = trained.janus.model.generation_head.modules_to_save["default"].state_dict()
    assert any(not torch.equal(head[k], base_head[k]) for k in base_head)


@pytest.mark.ray
def test_sft_adapter_round_trips_and_changes_outputs(sft_run):
    _, rows, result = sft_run
    verify_adapter(result.adapter_dir)
    prompts, tokens = [r["prompt"] for r in rows], [r["image_tokens"] for r in rows]
    base = load_model("tiny")
    trained = load_adapter(load_model("tiny"), result.adapter_dir)
    with torch.no_grad():
        before = base.image_logprobs(prompts, tokens).per_token.mean().item()
        after = trained.image_logprobs(prompts, tokens).per_token.mean().item()
    assert after > before + 1.0  # the trained adapter likes its training images much more
    assert after == pytest.approx(-result.history[-1]["loss"], abs=1.0)
    gen = {n: m.generate_images(PROMPTS[:2], num_images=2, seed=0, greedy=True).tokens for n, m in
           (("base", base), ("trained", trained))}
    assert not torch.equal(gen["base"], gen["trained"])


@pytest.mark.ray
def test_dpo_starts_at_reference_and_learns_preferences(dpo_run):
    _, _, result = dpo_run
    first, history = result.history[0], result.history
    # Policy == base + init_adapter == the precomputed reference at step 1: zero margin, loss ln 2.
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert mean([h["reward_accuracy"] for h in history[-3:]]) > mean([h["reward_accuracy"] for h in history[:3]])
    assert mean([h["loss"] for h in history[-3:]]) < mean([h["loss"] for h in history[:3]]) - 0.05
    assert history[-1]["chosen_logp"] - history[-1]["rejected_logp"] > first["chosen_logp"] - first["rejected_logp"]
    assert result.metrics["replica_checksum_spread"] == 0.0
    verify_adapter(result.adapter_dir)


@pytest.mark.ray
def test_dpo_survives_killed_worker_and_resumes_from_checkpoint(dpo_run):
    args, pairs, result = dpo_run
    assert os.path.exists(os.path.join(args.storage_path, f".{args.run_name}.failed_once"))  # it did die
    steps = args.epochs * D.steps_per_epoch(len(pairs), 2, args.batch_size, args.grad_accum)
    assert result.metrics["attempt"] == 1 and result.metrics["resumed_from_step"] == args.checkpoint_every
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    assert [h["attempt"] for h in result.history] == [0] * 4 + [1] * (steps - 4)
    # Weights and optimizer came back: a restart from scratch would sit at the reference again
    # (margin 0, loss ln 2) in its first step.
    resumed = result.history[4]
    assert abs(resumed["reward_margin"]) > 1e-3 and resumed["loss"] < math.log(2) - 1e-3
