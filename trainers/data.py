"""Inputs of `trainers/train.py`: rows (load, check, pack), argument checks, the per-rank step plan and
the learning-rate schedule (`lr_factor`).

Where it fits: the pools stage writes the round's SFT set or DPO pairs (Parquet); the driver hands
them to `trainers.train.train_adapter`, which checks them and its arguments (`check_args`; the LoRA spec
by `models.lora.check_lora_spec`) *before* any compute or Ray call, packs them into
columnar numpy arrays (one `ray.put`, shared by every worker), and each worker asks `step_plan` which
rows form its micro-batches at a given step. No Ray; `model_facts` reads only the model's config
(module names from a meta-device build), so checks cost no weights.

Inputs
    SFT rows:  prompt_id: str, prompt: str, image_tokens: list[int] (T,)
    DPO rows:  prompt_id, prompt, chosen_tokens, rejected_tokens: list[int] (T,),
               ref_chosen_logp, ref_rejected_logp: float (summed over tokens; required to train,
               filled by `trainers.train.precompute_ref_logprobs`)
    Accepted containers: a list of dicts, a pyarrow Table, or a Parquet file / directory path.
Outputs
    `PackedRows` (prompts + (N, T) int64 token arrays + (N,) reference log-probs) and step plans.

Data order: epoch e uses the permutation `default_rng([seed, e])` of all N rows; rank r of W takes
every W-th row of it, cut to N // W rows so every rank runs the same number of micro-batches (DDP
would hang otherwise). The plan for (seed, epoch, step) is a pure function, so a resumed worker
recomputes exactly the batches it would have seen.

Example:
    >>> rows = [{"prompt_id": f"p{i}", "prompt": "a red circle", "image_tokens": [i % 64] * 16}
    ...         for i in range(8)]
    >>> check_rows(rows, "sft", num_image_tokens=16, codebook_size=64)
    >>> packed = pack_rows(rows, "sft")
    >>> packed.tokens["image_tokens"].shape
    (8, 16)
    >>> plan = step_plan(8, world=2, rank=0, batch_size=2, grad_accum=1, seed=0, epoch=0)
    >>> len(plan), [len(mb) for mb in plan[0]]
    (2, [2])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from trainers.losses import DPO_LOSS_TYPES

SFT_COLUMNS = ("prompt_id", "prompt", "image_tokens")
DPO_COLUMNS = ("prompt_id", "prompt", "chosen_tokens", "rejected_tokens")
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
TOKEN_COLUMNS = {"sft": ("image_tokens",), "dpo": ("chosen_tokens", "rejected_tokens")}
CHOICES = {"objective": ("sft", "dpo"), "lr_schedule": ("constant", "cosine", "linear"), "loss_type": DPO_LOSS_TYPES,
           "model_dtype": ("float32", "bfloat16", "float16"), "precision": ("fp32", "bf16"),
           "strategy": ("ddp", "fsdp")}


class TrainDataError(ValueError):
    """Training rows that break their contract; the message names the column and the row."""


@dataclass
class PackedRows:
    """Columnar training data: what every worker receives (picklable, numpy only)."""

    prompts: list[str]  # N prompt strings
    tokens: dict[str, np.ndarray]  # column -> (N, T) int64 codebook ids
    ref_logp: dict[str, np.ndarray]  # ref column -> (N,) float64 (DPO only; empty for SFT)
    aux: Any = None  # trainers.cpr.PackedAux: CPR rows trained beside these, or None

    def __len__(self) -> int:
        return len(self.prompts)


def load_rows(source: Any) -> list[dict]:
    """Rows as a list of dicts from a list of dicts, a pyarrow Table, or a Parquet path."""
    if isinstance(source, (str, os.PathLike)):
        import pyarrow.parquet as pq

        if not os.path.exists(source):
            raise TrainDataError(f"training data path {source} does not exist")
        return pq.read_table(source).to_pylist()
    if hasattr(source, "to_pylist"):  # pyarrow Table
        return source.to_pylist()
    if isinstance(source, dict):
        raise TrainDataError("training rows must be a sequence of dicts, got a single dict")
    return list(source)


def token_row(value: Any, label: str, column: str, num_image_tokens: int | None,
              codebook_size: int | None = None) -> np.ndarray:
    """One row's `column` as int64 token ids, or TrainDataError naming `label` (the row)."""
    arr = np.asarray(value if value is not None else [])
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TrainDataError(f"{label}: {column} must be a list of ints, "
                             f"got {type(value).__name__} of dtype {arr.dtype}")
    if num_image_tokens is not None and arr.shape[0] != num_image_tokens:
        raise TrainDataError(f"{label}: {column} has {arr.shape[0]} tokens, "
                             f"the model generates {num_image_tokens} image tokens per image")
    if codebook_size is not None and ((arr < 0) | (arr >= codebook_size)).any():
        raise TrainDataError(f"{label}: {column} has ids outside the codebook [0, {codebook_size})")
    return arr.astype(np.int64)


def _token_array(rows: Sequence[dict], column: str, num_image_tokens: int | None) -> np.ndarray:
    """(N, T) int64 token ids of `column`, or TrainDataError naming the first bad row."""
    out = [token_row(row[column], f"row {i} ({row.get('prompt_id')!r})", column, num_image_tokens)
           for i, row in enumerate(rows)]
    return np.stack(out) if out else np.zeros((0, num_image_tokens or 0), np.int64)


def check_rows(rows: Sequence[dict], objective: str, num_image_tokens: int, codebook_size: int) -> None:
    """Fail loudly on empty sets, missing columns, wrong token lengths, ids outside the codebook,
    blank prompts, and DPO rows without finite reference log-probs."""
    what = {"sft": "SFT set", "dpo": "DPO pair set"}[objective]
    if len(rows) == 0:
        raise TrainDataError(f"the {what} is empty: nothing to train on")
    required = SFT_COLUMNS if objective == "sft" else DPO_COLUMNS + REF_COLUMNS
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row or row[c] is None]
        if missing and set(missing) <= set(REF_COLUMNS):
            raise TrainDataError(f"{what} row {i} ({row.get('prompt_id')!r}) has no {', '.join(missing)}: "
                                 "run trainers.train.precompute_ref_logprobs first")
        if missing:
            raise TrainDataError(f"{what} row {i} is missing column(s) {', '.join(missing)} "
                                 f"(required: {', '.join(required)})")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise TrainDataError(f"{what} row {i} ({row['prompt_id']!r}): prompt must be a non-empty string")
        for c in REF_COLUMNS if objective == "dpo" else ():
            if isinstance(row[c], bool) or not isinstance(row[c], (int, float)) or not math.isfinite(row[c]):
                raise TrainDataError(f"{what} row {i} ({row['prompt_id']!r}): {c} must be a finite number, "
                                     f"got {row[c]!r}")
    for column in TOKEN_COLUMNS[objective]:
        tokens = _token_array(rows, column, num_image_tokens)  # (N, T)
        bad = np.argwhere((tokens < 0) | (tokens >= codebook_size))
        if len(bad):
            i, t = bad[0]
            raise TrainDataError(f"{what} row {i} ({rows[i]['prompt_id']!r}): {column}[{t}] = {tokens[i, t]} "
                                 f"is outside the codebook [0, {codebook_size})")


def pack_rows(rows: Sequence[dict], objective: str) -> PackedRows:
    """Columnar numpy copy of checked rows (call `check_rows` first)."""
    tokens = {c: _token_array(rows, c, None) for c in TOKEN_COLUMNS[objective]}  # each (N, T)
    ref = ({c: np.asarray([r[c] for r in rows], dtype=np.float64) for c in REF_COLUMNS}
           if objective == "dpo" else {})
    return PackedRows(prompts=[r["prompt"] for r in rows], tokens=tokens, ref_logp=ref)


def rows_per_rank(n: int, world: int) -> int:
    """Rows each rank sees per epoch: the same on every rank (the last n % world rows of the
    epoch's permutation are left out, a different few each epoch)."""
    return n // world


def steps_per_epoch(n: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: micro-batches per rank (last one may be short) / grad_accum, rounded up."""
    micro = math.ceil(rows_per_rank(n, world) / batch_size)
    return math.ceil(micro / grad_accum)


def step_plan(n: int, world: int, rank: int, batch_size: int, grad_accum: int, seed: int,
              epoch: int) -> list[list[np.ndarray]]:
    """This rank's epoch as steps -> micro-batches -> row indices; a pure function of its arguments."""
    order = np.random.default_rng([seed, epoch]).permutation(n)  # (n,) same on every rank
    mine = order[rank::world][: rows_per_rank(n, world)]  # (n // world,)
    micro = [mine[lo:lo + batch_size] for lo in range(0, len(mine), batch_size)]
    return [micro[lo:lo + grad_accum] for lo in range(0, len(micro), grad_accum)]


def model_facts(model_path: str) -> tuple[int, int, list[str]]:
    """(num_image_tokens, codebook size, module names) without loading weights (meta device)."""
    import torch
    from transformers import JanusForConditionalGeneration

    from models.loading import HUB_IDS, janus_config, load_model, shapes_checkpoint_dir

    if model_path == "tiny" or model_path.startswith("tiny:"):
        janus = load_model(model_path).janus  # builds in well under a second
    else:
        path = str(shapes_checkpoint_dir()) if model_path == "shapes" else HUB_IDS.get(model_path.lower(), model_path)
        config = janus_config(path)
        with torch.device("meta"):
            janus = JanusForConditionalGeneration(config)
    num_image_tokens = int(janus.config.vq_config.num_patches) ** 2
    return num_image_tokens, int(janus.config.vq_config.num_embeddings), [n for n, _ in janus.named_modules()]


def check_args(a) -> None:
    """Numbers and choices of a trainers.train.TrainArgs, and combinations that cannot run here."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"TrainArgs: {msg}")
    for name, allowed in CHOICES.items():
        need(getattr(a, name) in allowed, f"{name} must be one of {allowed}, got {getattr(a, name)!r}")
    for name, low in {"num_workers": 1, "epochs": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0,
                      "checkpoint_every": 0, "max_failures": 0}.items():
        need(isinstance(getattr(a, name), int) and getattr(a, name) >= low, f"{name} must be an int >= {low}")
    need(a.max_steps is None or (isinstance(a.max_steps, int) and a.max_steps >= 1), "max_steps must be None or >= 1")
    need(math.isfinite(a.lr) and a.lr > 0, f"lr must be > 0, got {a.lr}")
    need(math.isfinite(a.weight_decay) and a.weight_decay >= 0, f"weight_decay must be >= 0, got {a.weight_decay}")
    need(math.isfinite(a.cfg_weight) and a.cfg_weight >= 1, f"cfg_weight must be >= 1, got {a.cfg_weight}")
    need(math.isfinite(a.temperature) and a.temperature > 0, f"temperature must be > 0, got {a.temperature}")
    need(math.isfinite(a.max_grad_norm) and a.max_grad_norm >= 0, "max_grad_norm must be >= 0")
    need(math.isfinite(a.aux_weight) and a.aux_weight > 0, f"aux_weight must be > 0, got {a.aux_weight}")
    need(a.cpus_per_worker > 0 and (not a.use_gpu or a.gpus_per_worker > 0), "resources per worker must be > 0")
    need(a.beta > 0, f"beta must be > 0, got {a.beta}")
    need(0 <= a.label_smoothing < 0.5, f"label_smoothing must lie in [0, 0.5), got {a.label_smoothing}")
    need(a.loss_type == "sigmoid" or a.label_smoothing == 0, "label_smoothing applies to loss_type='sigmoid' only")
    need(a.precision == "fp32" or a.use_gpu, "precision='bf16' needs use_gpu=True (bf16 autocast on CPU is "
         "slow and not what a GPU run would compute; use 'fp32' on CPU)")
    need(a.strategy == "ddp" or a.use_gpu, "strategy='fsdp' needs use_gpu=True (use 'ddp' on CPU)")
    need("://" in a.storage_path or os.path.isabs(a.storage_path),
         f"storage_path must be an absolute path or URI (Ray Train requires it), got {a.storage_path!r}")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress if schedule == "linear" else 1.0
