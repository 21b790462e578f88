"""Training losses for self-improvement on image tokens: SFT on accepted images, DPO on judged pairs.

Where it fits: ``trainers/train.py`` gets teacher-forced per-token log-probs of image tokens from
``models`` (``image_logprobs``: prompt embeddings -> language model -> ``generation_head``) and
calls these functions. TRL's ``DPOTrainer`` cannot be used for image-token DPO on Janus (it scores
through the text ``lm_head``; STACK-NOTES.md §7), so the DPO loss lives here, with TRL's names and
conventions: ``beta``, ``loss_type`` ("sigmoid" | "ipo"), ``label_smoothing``, rewards
``beta * (policy - ref)`` detached, ``rewards/accuracies`` and ``rewards/margins``.

Inputs
    sft_loss: per-token log-probs ``(B, T)`` of the accepted images' tokens and an optional mask.
    dpo_loss: per-sequence log-probs ``(B,)`` of chosen (judged 1) and rejected (judged 0) images of
        the same prompt, under the policy and under the frozen reference (precomputed is fine).
        For ``loss_type="sigmoid"`` pass log-probs *summed* over image tokens (TRL's default).
        For ``loss_type="ipo"`` pass log-probs *averaged* over image tokens, policy and reference
        alike: TRL 1.16 ``DPOTrainer`` divides the token-summed log-ratios by the number of
        completion tokens for IPO (see ``dpo_loss``).
Outputs
    scalar losses (mean over the batch) and, for DPO, the per-pair terms and reward metrics.

Example (runs as is)::

    import torch
    from trainers.losses import dpo_loss, sft_loss

    per_token = torch.log(torch.full((2, 4), 0.5))          # (B, T) image-token log-probs
    print(sft_loss(per_token))                               # tensor(0.6931) = ln 2
    policy_chosen = per_token.sum(dim=1)                     # (B,) summed for sigmoid DPO
    out = dpo_loss(policy_chosen, policy_chosen - 1.0,       # rejected is less likely ...
                   ref_chosen_logp=policy_chosen, ref_rejected_logp=policy_chosen)  # ... than under ref
    print(out.loss, out.reward_accuracy, out.reward_margin)  # 0.6444 = ln(1+e^-0.1), 1.0, 0.1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")


class DPOOutput(NamedTuple):
    """What ``dpo_loss`` returns; reward fields are detached (metrics only, TRL's names in comments)."""

    loss: torch.Tensor  # () mean of ``losses``, the value to backpropagate
    losses: torch.Tensor  # (B,) per-pair loss
    chosen_rewards: torch.Tensor  # (B,) beta * (policy - ref) of chosen          -> rewards/chosen
    rejected_rewards: torch.Tensor  # (B,) beta * (policy - ref) of rejected      -> rewards/rejected
    reward_accuracy: torch.Tensor  # () share of pairs with chosen reward > rejected -> rewards/accuracies
    reward_margin: torch.Tensor  # () mean of chosen - rejected reward           -> rewards/margins


def sft_loss(per_token_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of accepted image tokens (self-improvement SFT).

    Han et al. 2025, arXiv 2507.16663, Algorithm 1: fine-tune the generation branch on every
    (prompt, image) the model's own understanding judged 1, i.e. maximise log p(image | prompt).

    Normalisation is **per token**: sum of masked token NLLs / number of masked tokens in the batch
    (as HF/TRL SFT do), so every image token weighs the same. A per-sequence mean (mean over images
    of each image's token mean) differs only when sequences have different lengths; Janus images all
    have ``num_image_tokens`` tokens, so with no padding the two coincide.

    Args:
        per_token_logp: log p(token_t | prompt, tokens_<t), ``(B, T)``.
        mask: 1/True for tokens that count, ``(B, T)``; ``None`` counts every token.
    """
    if per_token_logp.dim() != 2:
        raise ValueError(f"per_token_logp must be (B, T), got shape {tuple(per_token_logp.shape)}")
    if mask is None:
        return -per_token_logp.mean()  # ()
    if mask.shape != per_token_logp.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != per_token_logp shape {tuple(per_token_logp.shape)}"
        )
    mask = mask.to(per_token_logp.dtype)  # (B, T)
    num_tokens = mask.sum()  # ()
    if num_tokens.item() == 0:
        raise ValueError("mask selects no tokens: the SFT loss would be 0/0")
    return -(per_token_logp * mask).sum() / num_tokens  # ()


def _check_dpo_args(logps: dict[str, torch.Tensor], beta: float, loss_type: str, label_smoothing: float) -> None:
    """Fail loudly on shapes and hyper-parameters before any math (DESIGN.md §4)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        # TRL's CPO silently ignores it for IPO; a silently ignored knob is a bug waiting to happen.
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only (cDPO); IPO has none")
    reference_name, reference = next(iter(logps.items()))
    if reference.dim() != 1 or reference.numel() == 0:
        raise ValueError(f"{reference_name} must be a non-empty (B,) tensor, got shape {tuple(reference.shape)}")
    for name, logp in logps.items():
        if logp.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(logp.shape)}, expected {tuple(reference.shape)} like {reference_name}"
            )


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Direct Preference Optimisation on (chosen, rejected) pairs of the same prompt.

    logits h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))   (TRL: ``delta_score``)

    - ``"sigmoid"``: DPO, Rafailov et al. 2023, arXiv 2305.18290, Eq. 7: -log sigmoid(beta * h).
      With ``label_smoothing = eps > 0`` it is conservative DPO (cDPO, Mitchell 2023): the label is
      assumed flipped with probability eps,
      -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h).
      This is the formula of TRL's ``CPOTrainer.cpo_loss`` (sigmoid) and of ``DPOTrainer``'s "aot"
      loss; note TRL 1.16 ``DPOTrainer`` itself ignores ``label_smoothing`` for "sigmoid".
    - ``"ipo"``: IPO, Azar et al. 2023, arXiv 2310.12036, Eq. 17 (beta is their tau):
      (h - 1 / (2 beta))**2. TRL 1.16 ``DPOTrainer`` computes h from log-probs **averaged over
      completion tokens**, so pass token-averaged log-probs here to match it (for Janus: sum over
      image tokens / ``num_image_tokens``, for policy and reference alike). Rewards are then per
      token too, whereas TRL logs IPO rewards from the summed log-probs (a factor ``num_image_tokens``).

    Args:
        policy_chosen_logp, policy_rejected_logp: log pi(image | prompt) under the trained model, ``(B,)``.
        ref_chosen_logp, ref_rejected_logp: the same under the frozen reference, ``(B,)``; no gradient.
        beta: strength of the pull toward the reference (> 0); TRL default 0.1.
        loss_type: "sigmoid" or "ipo".
        label_smoothing: cDPO flip probability in [0, 0.5); "sigmoid" only.
    """
    logps = {"policy_chosen_logp": policy_chosen_logp, "policy_rejected_logp": policy_rejected_logp,
             "ref_chosen_logp": ref_chosen_logp, "ref_rejected_logp": ref_rejected_logp}  # fmt: skip
    _check_dpo_args(logps, beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logp - ref_chosen_logp.detach()  # (B,)
    rejected_logratios = policy_rejected_logp - ref_rejected_logp.detach()  # (B,)
    logits = chosen_logratios - rejected_logratios  # (B,)

    if loss_type == "sigmoid":
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * logits)  # (B,) preference as labelled
            - label_smoothing * F.logsigmoid(-beta * logits)  # (B,) preference flipped (cDPO)
        )
    else:  # "ipo"
        losses = (logits - 1 / (2 * beta)) ** 2  # (B,) regress the log-ratio gap to 1/(2 beta)

    chosen_rewards = beta * chosen_logratios.detach()  # (B,)
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    return DPOOutput(
        loss=losses.mean(),  # ()
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),  # ()
        reward_margin=(chosen_rewards - rejected_rewards).mean(),  # ()
    )
