"""Tests for trainers/losses.py: hand-computed values, gradient signs, validation, and TRL's own code.

The TRL cross-checks call TRL 1.16's real loss code on the same log-probs (never a copy of its formula):
- ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py) called unbound with a ``SimpleNamespace``
  as ``self`` (the attributes it reads), a stub model that returns per-token log-probs whose sum is
  our sequence log-prob, and ``precompute_ref_logps=True`` so reference log-probs come from inputs.
- ``CPOTrainer.cpo_loss`` (trl/experimental/cpo/cpo_trainer.py) for cDPO: fed the log-ratios
  (policy - ref) its ``logits = chosen - rejected`` is exactly the DPO logit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trainers.losses import DPO_LOSS_TYPES, DPOOutput, dpo_loss, sft_loss

LN2 = math.log(2.0)


def _logps(batch: int, seed: int) -> list[torch.Tensor]:
    """Four (B,) sequence log-probs in a realistic range (hundreds of image tokens summed)."""
    generator = torch.Generator().manual_seed(seed)
    return [-(torch.rand(batch, generator=generator, dtype=torch.float64) * 50 + 100) for _ in range(4)]


# ---------------------------------------------------------------- sft_loss


def test_sft_loss_uniform_half_is_ln2():
    per_token = torch.log(torch.full((3, 5), 0.5))  # (B, T)
    torch.testing.assert_close(sft_loss(per_token), torch.tensor(LN2))


def test_sft_loss_is_per_token_mean_over_mask():
    per_token = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])  # (B, T)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # 3 tokens count
    # Per token: (1 + 2 + 3) / 3 = 2. Per sequence would be (1.5 + 3) / 2 = 2.25.
    torch.testing.assert_close(sft_loss(per_token, mask), torch.tensor(2.0))


def test_sft_loss_gradient_raises_likelihood():
    per_token = torch.full((2, 4), -2.0, requires_grad=True)
    sft_loss(per_token).backward()
    assert (per_token.grad < 0).all()  # gradient descent increases every log-prob


def test_sft_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="per_token_logp"):
        sft_loss(torch.zeros(4))
    with pytest.raises(ValueError, match="mask shape"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="no tokens"):
        sft_loss(torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------- dpo_loss: hand-computed values


def test_dpo_zero_logits_is_ln2_and_zero_rewards():
    logp = torch.tensor([-10.0, -20.0])
    out = dpo_loss(logp, logp, logp, logp)
    assert isinstance(out, DPOOutput)
    torch.testing.assert_close(out.loss, torch.tensor(LN2))
    torch.testing.assert_close(out.losses, torch.full((2,), LN2))
    torch.testing.assert_close(out.reward_margin, torch.tensor(0.0))
    torch.testing.assert_close(out.reward_accuracy, torch.tensor(0.0))  # ties are not "correct", as in TRL


def test_dpo_chosen_favoured_pair_by_hand():
    beta = 0.5
    # chosen log-ratio = -5 - (-7) = 2, rejected log-ratio = -9 - (-8) = -1, logits = 3
    out = dpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-7.0]), torch.tensor([-8.0]), beta=beta)
    expected = -math.log(1 / (1 + math.exp(-beta * 3)))  # -log sigmoid(1.5)
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([beta * 2]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([beta * -1]))
    torch.testing.assert_close(out.reward_margin, torch.tensor(beta * 3))
    torch.testing.assert_close(out.reward_accuracy, torch.tensor(1.0))


def test_cdpo_label_smoothing_by_hand():
    beta, eps = 0.5, 0.2
    out = dpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-7.0]), torch.tensor([-8.0]),
                   beta=beta, label_smoothing=eps)
    log_sig = lambda x: -math.log(1 + math.exp(-x))  # noqa: E731
    expected = -(1 - eps) * log_sig(beta * 3) - eps * log_sig(-beta * 3)
    torch.testing.assert_close(out.loss, torch.tensor(expected))


def test_ipo_by_hand_and_minimum_at_half_over_beta():
    beta = 0.25
    out = dpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-7.0]), torch.tensor([-8.0]),
                   beta=beta, loss_type="ipo")
    torch.testing.assert_close(out.loss, torch.tensor((3 - 1 / (2 * beta)) ** 2))  # (3 - 2)^2 = 1
    zero = torch.zeros(1)
    at_target = dpo_loss(torch.tensor([2.0]), zero, zero, zero, beta=beta, loss_type="ipo")  # logits = 1/(2β)
    torch.testing.assert_close(at_target.loss, torch.tensor(0.0))


def test_reward_accuracy_and_margin_over_batch():
    beta = 0.1
    zero = torch.zeros(4)
    chosen = torch.tensor([1.0, 2.0, -1.0, 0.0])  # chosen log-ratios; rejected log-ratios all 0
    out = dpo_loss(chosen, zero, zero, zero, beta=beta)
    torch.testing.assert_close(out.reward_accuracy, torch.tensor(0.5))  # 2 of 4 strictly ahead
    torch.testing.assert_close(out.reward_margin, torch.tensor(beta * 2.0 / 4))


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0)])
def test_dpo_gradient_signs(loss_type, label_smoothing):
    policy_chosen = torch.tensor([-10.0, -12.0], requires_grad=True)
    policy_rejected = torch.tensor([-11.0, -12.0], requires_grad=True)
    ref = torch.tensor([-11.0, -12.0], requires_grad=True)
    out = dpo_loss(policy_chosen, policy_rejected, ref, ref.clone(), beta=0.1,
                   loss_type=loss_type, label_smoothing=label_smoothing)
    out.loss.backward()
    # Below the IPO target and on the sigmoid's slope: raising chosen lowers the loss, raising rejected raises it.
    assert (policy_chosen.grad < 0).all()
    assert (policy_rejected.grad > 0).all()
    assert ref.grad is None  # the reference is a constant
    assert not out.chosen_rewards.requires_grad and not out.reward_margin.requires_grad


def test_dpo_loss_decreases_when_chosen_logp_increases():
    base = [torch.tensor([-10.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), torch.tensor([-10.0])]
    higher = [torch.tensor([-9.0])] + base[1:]
    assert dpo_loss(*higher).loss < dpo_loss(*base).loss


# ---------------------------------------------------------------- dpo_loss: validation


def test_dpo_rejects_mismatched_batch_naming_argument():
    a, b = torch.zeros(3), torch.zeros(2)
    with pytest.raises(ValueError, match="ref_rejected_logp"):
        dpo_loss(a, a, a, b)
    with pytest.raises(ValueError, match="policy_rejected_logp"):
        dpo_loss(a, b, a, a)
    with pytest.raises(ValueError, match="policy_chosen_logp"):
        dpo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1))


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_dpo_rejects_non_positive_beta(beta):
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=beta)


def test_dpo_rejects_unknown_loss_type_listing_allowed():
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="hinge") as info:
        dpo_loss(a, a, a, a, loss_type="hinge")
    assert all(name in str(info.value) for name in DPO_LOSS_TYPES)


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.5, 0.7])
def test_dpo_rejects_label_smoothing_outside_range(label_smoothing):
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, label_smoothing=label_smoothing)


def test_ipo_rejects_label_smoothing():
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, loss_type="ipo", label_smoothing=0.1)


# ---------------------------------------------------------------- cross-check against TRL's own code


def _trl_dpo_trainer_loss(logps, num_tokens, beta, loss_type, label_smoothing=0.0):
    """Run TRL 1.16 ``DPOTrainer._compute_loss`` on given sequence log-probs; return (loss, metrics).

    ``num_tokens`` (2B,) gives each sequence's completion length (chosen rows, then rejected rows):
    TRL's IPO divides by it; the sum over per-token log-probs is the sequence log-prob either way.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
    policy = torch.cat([policy_chosen, policy_rejected])  # (2B,) TRL's batch is [chosen, rejected]
    max_tokens = int(num_tokens.max())
    positions = torch.arange(max_tokens + 1)  # position 0 is the prompt, 1..n the completion
    completion_mask = ((positions >= 1) & (positions <= num_tokens[:, None])).long()  # (2B, T)
    rest = torch.zeros(policy.shape[0], max_tokens - 1, dtype=policy.dtype)  # (2B, T-2)
    per_token = torch.cat([policy[:, None], rest], dim=1)  # (2B, T-1) whole logp on the first token
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_sigmoid_matches_trl_dpo_trainer(beta):
    logps = _logps(batch=6, seed=int(beta * 100))
    num_tokens = torch.full((12,), 16)
    trl_loss, trl_metrics = _trl_dpo_trainer_loss(logps, num_tokens, beta, "sigmoid")
    ours = dpo_loss(*logps, beta=beta, loss_type="sigmoid")
    torch.testing.assert_close(ours.loss, trl_loss)
    torch.testing.assert_close(ours.chosen_rewards.mean().item(), trl_metrics["rewards/chosen"][0])
    torch.testing.assert_close(ours.rejected_rewards.mean().item(), trl_metrics["rewards/rejected"][0])
    torch.testing.assert_close(ours.reward_accuracy.item(), trl_metrics["rewards/accuracies"][0])
    torch.testing.assert_close(ours.reward_margin.item(), trl_metrics["rewards/margins"][0])


def test_sigmoid_gradient_matches_trl_dpo_trainer():
    logps = [t.requires_grad_(i < 2) for i, t in enumerate(_logps(batch=5, seed=7))]
    num_tokens = torch.full((10,), 8)
    trl_loss, _ = _trl_dpo_trainer_loss(logps, num_tokens, 0.3, "sigmoid")
    trl_grads = torch.autograd.grad(trl_loss, logps[:2])
    our_grads = torch.autograd.grad(dpo_loss(*logps, beta=0.3).loss, logps[:2])
    for ours, theirs in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 1.0])
def test_ipo_matches_trl_dpo_trainer_with_token_averaged_inputs(beta):
    logps = _logps(batch=6, seed=int(beta * 1000))
    # Different completion lengths per row: TRL averages each sequence's log-ratio over its own tokens.
    num_tokens = torch.tensor([16, 9, 12, 16, 5, 7, 16, 11, 3, 16, 8, 10])  # (2B,) chosen rows then rejected
    trl_loss, trl_metrics = _trl_dpo_trainer_loss(logps, num_tokens, beta, "ipo")
    n_chosen, n_rejected = num_tokens.to(torch.float64).chunk(2)  # (B,), (B,)
    averaged = [logps[0] / n_chosen, logps[1] / n_rejected, logps[2] / n_chosen, logps[3] / n_rejected]
    ours = dpo_loss(*averaged, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ours.loss, trl_loss)
    # TRL's reward metrics use the summed log-ratios even for IPO; ours see what they are given.
    torch.testing.assert_close(dpo_loss(*logps, beta=beta, loss_type="ipo").reward_margin.item(),
                               trl_metrics["rewards/margins"][0])


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.05, 0.2, 0.4])
def test_cdpo_matches_trl_dpo_trainer_aot_per_pair(beta, label_smoothing):
    # TRL 1.16 DPOTrainer applies the cDPO formula only in loss_type="aot", after sorting the batch's
    # log-ratios; with one pair per call the sort is the identity, so "aot" is exactly cDPO for that pair.
    logps = _logps(batch=4, seed=int(label_smoothing * 100))
    ours = dpo_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    for i in range(4):
        pair = [t[i : i + 1] for t in logps]
        trl_loss, _ = _trl_dpo_trainer_loss(pair, torch.full((2,), 4), beta, "aot", label_smoothing)
        torch.testing.assert_close(ours.losses[i], trl_loss)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_cdpo_matches_trl_cpo_loss_on_logratios(beta, label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logps = _logps(batch=8, seed=int(beta * 10 + label_smoothing * 100))
    cpo_self = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid",
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    chosen_logratios, rejected_logratios = logps[0] - logps[2], logps[1] - logps[3]  # (B,), (B,)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(
        cpo_self, chosen_logratios, rejected_logratios)
    ours = dpo_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.losses, trl_losses)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected_rewards)


def test_trl_dpo_trainer_sigmoid_ignores_label_smoothing():
    # Documents why cDPO is cross-checked against "aot"/CPO and not DPOTrainer's "sigmoid": if TRL ever starts
    # smoothing "sigmoid", this fails and the cross-check above should move back to "sigmoid".
    logps = _logps(batch=4, seed=3)
    num_tokens = torch.full((8,), 4)
    smoothed, _ = _trl_dpo_trainer_loss(logps, num_tokens, 0.1, "sigmoid", label_smoothing=0.3)
    torch.testing.assert_close(smoothed, dpo_loss(*logps, beta=0.1).loss)
    assert not torch.isclose(smoothed, dpo_loss(*logps, beta=0.1, label_smoothing=0.3).loss)
