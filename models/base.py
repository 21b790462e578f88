"""The unified-model contract: what every stage of unigap may ask of a model.

Where it fits: Ray Data stages (generate, judge), Ray Train (image_logprobs), Ray Serve and the
shapes world talk to a model only through `UnifiedModel`. The Janus implementation lives in
`models/janus.py`; a tiny random one for tests comes from `models/tiny.py`.

Inputs and outputs are plain tensors, numpy arrays and PIL images, so rows can cross process
boundaries (Ray object store, Parquet) without the model.

Example:
    >>> from models.tiny import build_tiny
    >>> m = build_tiny()
    >>> out = m.generate_images(["a red circle"], num_images=2, seed=0)
    >>> out.tokens.shape[:2]
    torch.Size([1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

JudgeMode = Literal["binary", "prob", "describe_prob"]
JUDGE_MODES: tuple[str, ...] = ("binary", "prob", "describe_prob")

# The paper's judge prompt (Han et al. 2025, Fig. "find2"; shared DESIGN.md section 1).
JUDGE_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
JUDGE_QUESTION = (
    "Does this image describe {prompt}? If it describes the scene, score 1; if it does not fully "
    "describe, score 0. Please answer in the following format: The score is {{your score}}."
)
# One-forward-pass form of the same question: read P(Yes) vs P(No) at the answer position.
PROB_QUESTION = "Does this image describe {prompt}? Answer Yes or No."
# describe_prob: the model describes the image first, then answers (P(Yes) read after the description).
DESCRIBE_QUESTION = "Does this image describe {prompt}? Describe the image, then answer Yes or No."


def judge_row(mode: str, prompt: str, description: str, yes: bool) -> tuple[str, str, str | None]:
    """(question, target, system) that teaches the judge mode `mode` the verdict `yes` on (image, prompt):
    the exact text `JanusUnified.judge` asks and reads (pretraining and CPR judgement rows use it).

        >>> judge_row("prob", "a red circle", "", True)
        ('Does this image describe a red circle? Answer Yes or No.', ' Yes', None)
    """
    if mode == "describe_prob":  # the description is part of the target: the model learns to write it
        return DESCRIBE_QUESTION.format(prompt=prompt), f" {description} . Answer : {'Yes' if yes else 'No'}", None
    if mode == "prob":
        return PROB_QUESTION.format(prompt=prompt), " Yes" if yes else " No", None
    if mode == "binary":
        return JUDGE_QUESTION.format(prompt=prompt), f" The score is {int(yes)}<|end_of_sentence|>", JUDGE_SYSTEM
    raise ValueError(f"judge mode must be one of {', '.join(JUDGE_MODES)}; got {mode!r}")


@dataclass
class GenerationOutput:
    """Images drawn by the generation branch.

    tokens: (B, N, T) int64 codebook ids, prompt b, sample n.
    images: B lists of N PIL images (decoded from `tokens`).
    seeds:  (B, N) the per-sample seeds actually used (reproducible regardless of batch size).
    """

    tokens: torch.Tensor
    images: list[list[Image.Image]]
    seeds: torch.Tensor


@dataclass
class JudgeResult:
    """The model's own verdict on (image, prompt) pairs, one entry per pair.

    score:  float in [0, 1] (binary: 0.0 / 1.0; prob: P(Yes) / (P(Yes) + P(No))); NaN when invalid.
    valid:  False when a binary answer could not be parsed (never silently scored 0).
    answer: the raw text the model wrote ("" in prob mode; the description in describe_prob mode).
    """

    score: list[float]
    valid: list[bool]
    answer: list[str] = field(default_factory=list)


@dataclass
class ImageLogprobs:
    """Teacher-forced log-probs of given image tokens under the generation branch.

    per_token: (B, T) log p(token_t | prompt, tokens_<t) -- the same distribution generation samples
               from (with cfg_weight, when given, applied to the logits before log-softmax).
    total:     (B,) per_token summed over T.
    """

    per_token: torch.Tensor
    total: torch.Tensor


@runtime_checkable
class UnifiedModel(Protocol):
    """A model with a generation branch and an understanding branch that share one backbone."""

    num_image_tokens: int
    image_size: int

    def generate_images(
        self,
        prompts: Sequence[str],
        num_images: int = 1,
        seed: int | Sequence[int] = 0,
        cfg_weight: float = 5.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        batch_size: int | None = None,
    ) -> GenerationOutput: ...

    def decode_tokens(self, tokens: torch.Tensor) -> list[Image.Image]: ...

    def judge(
        self, images: Sequence[Image.Image], prompts: Sequence[str], mode: JudgeMode = "prob"
    ) -> JudgeResult: ...

    def image_logprobs(
        self, prompts: Sequence[str], image_tokens: torch.Tensor, cfg_weight: float | None = None
    ) -> ImageLogprobs: ...

    def answer(
        self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 32
    ) -> list[str]: ...

    def describe(self, images: Sequence[Image.Image], max_new_tokens: int = 32) -> list[str]: ...
