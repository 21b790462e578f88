"""Training: losses (pure torch, no Ray) and, later, the Ray Train loop in ``trainers/train.py``."""

from trainers.losses import DPO_LOSS_TYPES, DPOOutput, dpo_loss, sft_loss

__all__ = ["DPO_LOSS_TYPES", "DPOOutput", "dpo_loss", "sft_loss"]
