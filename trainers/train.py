"""LoRA training of Janus' generation branch on Ray Train: SFT on accepted images, DPO on judged pairs.

Where it fits: the `train` stage of a round. Input: the round's SFT set or DPO pairs (trainers/data.py
names the columns), the model path and, from round 2 on, the previous round's adapter to start from.
Output: a verified peft adapter directory (`adapters/round_<k>/`, SHA256SUMS included) plus
`train_metrics.json` (final metrics and the per-step history).

Flow: `validate` (no compute, no Ray) -> DPO: `precompute_ref_logprobs` once (no reference model in
memory while training) -> `train_adapter`: one `TorchTrainer.fit()`, N DDP workers (gloo on CPU, nccl
on GPU), a checkpoint (adapter + `train_state.pt`) every `checkpoint_every` steps, resume from the
latest one after a worker failure (`max_failures`) or when the same `run_name` runs again.

Data path: the rows are packed into numpy arrays once (`prepare`) into the object store; each worker
takes its slice of a (seed, epoch) permutation (trainers/data.py). Chosen over `datasets=` because a
round's set is small (thousands of rows), the order must be reproducible by seed and epoch, a resumed
worker must skip exactly the batches already trained, and DDP needs equal batch counts on every rank.

Example (2 CPU workers on a local Ray; tests/trainers/test_train.py runs the same):
    >>> import ray, tempfile
    >>> from models.loading import load_model
    >>> _ = ray.init(num_cpus=2)
    >>> m = load_model("tiny")
    >>> toks = m.generate_images(["a red circle"] * 8, num_images=1, seed=0).tokens[:, 0]  # (8, T)
    >>> rows = [{"prompt_id": f"p{i}", "prompt": "a red circle", "image_tokens": t.tolist()}
    ...         for i, t in enumerate(toks)]
    >>> args = TrainArgs(objective="sft", model_path="tiny", num_workers=2, epochs=2, batch_size=2,
    ...                  storage_path=tempfile.mkdtemp(), run_name="demo")
    >>> result = train_adapter(args, rows, out_dir=tempfile.mkdtemp())
    >>> result.metrics["step"], len(result.history)
    (4, 4)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from models.lora import (ADAPTER_FILES, CHECKSUM_FILE, LoraSpec, attach_lora, check_lora_spec, load_adapter,
                         save_adapter, verify_adapter)
from trainers import cpr as C
from trainers import data as D
from trainers.data import TrainDataError, lr_factor
from trainers.faults import maybe_fail, planned_failure
from trainers.losses import dpo_loss, sft_loss

STATE_FILE = "train_state.pt"


@dataclass
class TrainArgs:
    """One `train_adapter` call's arguments, from `improve.train_args`; defaults = the config's (tested)."""

    objective: str = "sft"
    """"sft": maximise log p(image tokens | prompt) of accepted rows; "dpo": preference pairs."""
    model_path: str = "tiny"
    """Base model, as `models.loading.load_model` takes it ("tiny", "shapes", a dir, a hub id)."""
    model_dtype: str = "float32"
    """Weight dtype of the base model (float32 | bfloat16 | float16)."""
    init_adapter: Optional[str] = None
    """Adapter dir to continue from (previous round), loaded trainable; `lora` is then ignored."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """Fresh LoRA to attach when there is no init_adapter (models.lora.LoraSpec)."""
    num_workers: int = 1
    """Data-parallel Ray Train workers."""
    use_gpu: bool = False
    """One (or gpus_per_worker) GPU per worker, nccl backend; False = CPU, gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker."""
    gpus_per_worker: float = 1.0
    """GPUs Ray reserves per worker when use_gpu."""
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: decay would pull the adapter towards 0 = the start model every round)."""
    cfg_weight: float = 1.0
    """Guidance weight of the loss's distribution: generation's trains what it samples; 1 = conditional."""
    temperature: float = 1.0
    """Sampling temperature of that distribution (log-probs of logits / temperature)."""
    epochs: int = 3
    """Passes over the rows."""
    max_steps: Optional[int] = None
    """Cap on optimizer steps (None: epochs decide). TrainSection calls it `steps`."""
    batch_size: int = 16
    """Rows per worker per micro-batch (a DPO row is one pair: 2 sequences)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is still logged)."""
    warmup_steps: int = 0
    """Linear LR warm-up steps (peak reached at step warmup_steps)."""
    lr_schedule: str = "constant"
    """After warm-up: "constant", "cosine" or "linear" decay to 0 at the last step."""
    beta: float = 0.1
    """DPO beta."""
    loss_type: str = "sigmoid"
    """DPO loss: "sigmoid" (summed log-probs) or "ipo" (token-averaged log-probs)."""
    label_smoothing: float = 0.0
    """cDPO label smoothing in [0, 0.5), sigmoid only."""
    aux_weight: float = 1.0
    """Weight of the CPR rows' loss (trainers/cpr.py) beside the generation loss, when there are any."""
    precision: str = "fp32"
    """"fp32", or "bf16" autocast -- GPU only: on CPU it is refused (validate), never silently dropped."""
    strategy: str = "ddp"
    """"ddp", or "fsdp" (GPU only; optimizer moments are not checkpointed under FSDP)."""
    max_failures: int = 0
    """Worker-group failures Ray Train survives by restarting from the latest checkpoint."""
    checkpoint_every: int = 0
    """Checkpoint every k optimizer steps (0: only at the end)."""
    seed: int = 0
    """Seeds LoRA init, data order (seed, epoch) and dropout (seed, rank, step)."""
    storage_path: str = ""
    """Absolute dir (or URI) where Ray Train keeps run dirs and checkpoints."""
    run_name: str = "train"
    """Run dir under storage_path; running the same name again resumes its latest checkpoint."""


@dataclass
class TrainResult:
    adapter_dir: str  # verified peft adapter (SHA256SUMS) + train_metrics.json
    metrics: dict  # final metrics (rank 0; checksums gathered over ranks)
    history: list[dict] = field(default_factory=list)  # one dict per optimizer step


def validate(args: TrainArgs, rows: Any, aux: Any = None) -> None:
    """Reject bad arguments and bad rows before any compute or Ray call (TrainDataError / ValueError)."""
    prepare(args, rows, aux)


def prepare(args: TrainArgs, rows: Any, aux: Any = None) -> D.PackedRows:
    """The rows (+ CPR rows) checked against the model and the arguments, packed for the workers."""
    D.check_args(args)
    planned_failure(args.storage_path, args.run_name)  # a malformed fault-drill file fails here
    rows = D.load_rows(rows)
    num_image_tokens, codebook, names = D.model_facts(args.model_path)
    D.check_rows(rows, args.objective, num_image_tokens, codebook)
    if len(rows) < args.num_workers:  # each rank must get >= 1 row per epoch
        raise TrainDataError(f"{len(rows)} rows for {args.num_workers} workers: every worker needs at least one")
    if args.init_adapter:
        verify_adapter(args.init_adapter)
    else:
        check_lora_spec(args.lora, names)
    packed = D.pack_rows(rows, args.objective)
    aux = D.load_rows(aux) if aux is not None else []
    if len(aux):  # CPR rows: checked and packed here too, before any Ray call
        C.check_aux_rows(aux, num_image_tokens, codebook)
        packed.aux = C.pack_aux(aux, num_image_tokens)
    return packed


# ---------------------------------------------------------------------------------------- reference
@torch.no_grad()
def precompute_ref_logprobs(model_path: str, init_adapter: Optional[str], pairs: Any, batch_size: int = 32,
                            dtype: str = "float32", device: str = "cpu", cfg_weight: float = 1.0,
                            temperature: float = 1.0) -> list[dict]:
    """Pairs with ref_chosen_logp / ref_rejected_logp: summed log-probs under base + init_adapter, on
    the distribution the policy is trained on (`cfg_weight`, `temperature`: TrainArgs' values)."""
    from models.loading import load_model

    pairs = D.load_rows(pairs)
    m = load_model(model_path, dtype=dtype, device=device, adapter=init_adapter)
    out = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        prompts = [p["prompt"] for p in chunk]
        chosen, rejected = (m.image_logprobs(prompts, [p[c] for p in chunk], cfg_weight, temperature).total  # (b,)
                            for c in ("chosen_tokens", "rejected_tokens"))
        out += [{**p, "ref_chosen_logp": float(c), "ref_rejected_logp": float(r)}
                for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist())]
    return out


# ---------------------------------------------------------------------------------------- driver
def train_adapter(args: TrainArgs, rows: Any, out_dir: str, aux: Any = None, packed: Any = None) -> TrainResult:
    """Validate, run one TorchTrainer.fit(), copy the final adapter to out_dir (verified) + metrics.
    `aux`: CPR rows (trainers/cpr.py) trained beside `rows`, or None. `packed`: an ObjectRef of
    `prepare(args, rows, aux)` made where the rows are stored (a Ray task): the caller never holds them."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    data = packed if packed is not None else ray.put(prepare(args, rows, aux))  # raises before any Ray call
    resources = {"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if args.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config={"args": args, "data": data},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        run_config=RunConfig(name=args.run_name, storage_path=args.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=args.max_failures)))
    result = trainer.fit()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt:
        for name in ADAPTER_FILES + (CHECKSUM_FILE,):
            shutil.copy2(Path(ckpt) / name, out / name)
        state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)
    verify_adapter(out)
    record = {"metrics": state["final"], "history": state["history"], "args": dataclasses.asdict(args)}
    (out / "train_metrics.json").write_text(json.dumps(record, indent=1, default=str))
    return TrainResult(str(out), state["final"], state["history"])


# ---------------------------------------------------------------------------------------- worker
class PolicyLogprobs(nn.Module):
    """forward(ids, mask, tokens) -> (B, T) image-token log-probs under the sampling distribution
    (CFG at `cfg_weight`, `temperature`): the module DDP wraps, so DDP's hooks see the whole forward
    (prompt embeddings -> language model -> generation head, both CFG branches)."""

    def __init__(self, unified, cfg_weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.policy = unified.model  # registers the (peft) parameters
        self.unified = unified  # a plain object: nn.Module keeps it as an attribute
        self.cfg_weight, self.temperature = cfg_weight, temperature

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, aux=None):
        per_token = self.unified.token_logprobs(ids, mask, tokens, self.cfg_weight, self.temperature)  # (B, T)
        return per_token if aux is None else (per_token, C.aux_loss(self.unified, *aux))  # CPR rows: same pass


def _build_policy(args: TrainArgs, state: Optional[dict], device: str):
    """Base model + LoRA (fresh, or init_adapter trainable) + checkpointed trainable weights."""
    from models.loading import load_model

    unified = load_model(args.model_path, dtype=args.model_dtype, device=device)
    torch.manual_seed(args.seed)  # identical LoRA init on every rank
    unified = load_adapter(unified, args.init_adapter, trainable=True) if args.init_adapter else attach_lora(unified, args.lora)  # noqa: E501
    unified.model.to(device).train()
    if state is not None:
        trainable = {n for n, p in unified.model.named_parameters() if p.requires_grad}
        if trainable != set(state["trainable"]):  # strict=False below must not hide a mismatch
            raise RuntimeError(f"checkpoint's trainable weights do not match this model's: "
                               f"{sorted(trainable ^ set(state['trainable']))[:3]}")
        unified.model.load_state_dict(state["trainable"], strict=False)  # frozen weights: from the base
    return unified


def _micro_loss(model, unified, data: D.PackedRows, idx, args: TrainArgs, aux_idx=None, images=None):
    """Loss and metrics of one micro-batch of row indices `idx` (+ CPR rows `aux_idx`, weighted)."""
    ids, mask = unified.encode_generation_prompts([data.prompts[i] for i in idx])  # (b, L)
    dev = ids.device
    aux = None if aux_idx is None else (data.aux, aux_idx, images)
    if args.objective == "sft":
        tokens = torch.from_numpy(data.tokens["image_tokens"][idx]).to(dev)  # (b, T)
        per_token, aux_out = C.split(model(ids, mask, tokens, aux))  # (b, T)
        return (*C.with_aux(sft_loss(per_token), {"token_logp": per_token.mean().item()}, aux_out, args.aux_weight),
                tokens.numel())
    b = len(idx)  # tokens: b chosen rows, then b rejected
    tokens = torch.cat([torch.from_numpy(data.tokens[c][idx]) for c in D.TOKEN_COLUMNS["dpo"]]).to(dev)  # (2b, T)
    per_token, aux_out = C.split(model(ids.repeat(2, 1), mask.repeat(2, 1), tokens, aux))  # (2b, T)
    norm = tokens.shape[1] if args.loss_type == "ipo" else 1  # ipo: token-averaged log-probs
    logp = per_token.sum(-1) / norm  # (2b,)
    ref = [torch.from_numpy(data.ref_logp[c][idx]).to(dev, torch.float32) / norm for c in D.REF_COLUMNS]  # 2 x (b,)
    out = dpo_loss(logp[:b], logp[b:], ref[0], ref[1], args.beta, args.loss_type, args.label_smoothing)
    stats = {"reward_accuracy": out.reward_accuracy.item(), "reward_margin": out.reward_margin.item(),
             "chosen_logp": logp[:b].mean().item(), "rejected_logp": logp[b:].mean().item()}
    return (*C.with_aux(out.loss, stats, aux_out, args.aux_weight), tokens.numel())


def train_step(model, unified, optimizer, scheduler, data, micro_batches, args: TrainArgs, aux_batches=None,
               images=None) -> dict:
    """One optimizer step over this rank's micro-batches (+ their CPR rows); metrics averaged over ranks."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    sums, num_tokens = {}, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    for j, idx in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        with (nullcontext() if last else getattr(model, "no_sync", nullcontext)()), autocast:
            loss, stats, n = _micro_loss(model, unified, data, idx, args, aux_batches and aux_batches[j], images)
            (loss / len(micro_batches)).backward()  # DDP all-reduces gradients on the last one
        for k, v in {"loss": loss.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
        num_tokens += n
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    metrics = C.finish_metrics(_mean_over_ranks({**sums, "grad_norm": float(grad_norm)}))
    return {**metrics, "lr": lr, "tokens_per_s": num_tokens / (time.perf_counter() - t0)}  # per worker


def _mean_over_ranks(metrics: dict) -> dict:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64)  # (K,)
    if torch.distributed.get_backend() == "nccl":  # nccl reduces device tensors only
        values = values.cuda()
    torch.distributed.all_reduce(values)
    return dict(zip(metrics, (values / torch.distributed.get_world_size()).tolist()))


def _checksums(unified) -> dict:
    """Float64 sums of trainable and frozen weights, and the spread of the trainable sum over ranks."""
    sums = {"trainable_checksum": 0.0, "frozen_checksum": 0.0}
    for _, p in unified.model.named_parameters():
        sums["trainable_checksum" if p.requires_grad else "frozen_checksum"] += p.detach().double().sum().item()
    spread = 0.0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, sums["trainable_checksum"])
        spread = max(gathered) - min(gathered)
    return {**sums, "replica_checksum_spread": spread}


def _full_weights(model, args: TrainArgs, rank0_only: bool):
    """FSDP: gather the full (unsharded) weights for the block; DDP: every rank holds them already."""
    if args.strategy != "fsdp":
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(model, writeback=False, rank0_only=rank0_only)


def _save_checkpoint(model, unified, optimizer, scheduler, state: dict, metrics: dict, args: TrainArgs) -> None:
    """Every rank reports; rank 0 attaches adapter (peft + SHA256SUMS) + train_state.pt."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp, _full_weights(model, args, rank0_only=True):
        checkpoint = None
        if rank == 0:
            save_adapter(unified, tmp)
            trainable = {n: p.detach().cpu().clone() for n, p in unified.model.named_parameters() if p.requires_grad}
            torch.save({**state, "trainable": trainable, "scheduler": scheduler.state_dict(),
                        # FSDP shards optimizer state across ranks: only DDP's is saved whole.
                        "optimizer": optimizer.state_dict() if args.strategy == "ddp" else None},
                       os.path.join(tmp, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _load_state(checkpoint) -> Optional[dict]:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop(config: dict) -> None:
    """Per-worker loop: build or resume, then step through the deterministic plan, checkpointing."""
    import ray
    import ray.train
    from ray.train.torch import get_device, prepare_model

    args, data = config["args"], ray.get(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not args.use_gpu:
        torch.set_num_threads(1)  # contended cores: 1 thread is 4-17x faster (STACK-NOTES.md §8)
    state = _load_state(ray.train.get_checkpoint())
    unified = _build_policy(args, state, str(get_device()))
    model = prepare_model(PolicyLogprobs(unified, args.cfg_weight, args.temperature), parallel_strategy=args.strategy,
                          parallel_strategy_kwargs={"use_orig_params": True} if args.strategy == "fsdp" else None)
    spe = D.steps_per_epoch(len(data), world, args.batch_size, args.grad_accum)
    total = min(args.epochs * spe, args.max_steps or math.inf)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_steps, total, args.lr_schedule))
    step, history, attempt = 0, [], 0
    if state is not None:
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, attempt = state["step"], state["history"], state["attempt"] + 1
    resumed_from, images = step, {}  # images: CPR rows' decoded images, by row
    fail_at = planned_failure(args.storage_path, args.run_name)  # a fault drill (trainers/faults.py), if any
    while step < total:
        epoch, i = divmod(step, spe)
        plan = D.step_plan(len(data), world, rank, args.batch_size, args.grad_accum, args.seed, epoch)
        micro_batches, aux_batches = plan[i], C.step_aux(data.aux, plan, i, world, rank, args.seed, epoch)
        torch.manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)  # dropout: resumable, rank-distinct
        maybe_fail(args.storage_path, args.run_name, fail_at, step, rank, world)
        metrics = train_step(model, unified, optimizer, scheduler, data, micro_batches, args, aux_batches, images)
        step += 1
        history.append({"step": step, "epoch": epoch, "attempt": attempt, **metrics})
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < total:
            state = {"step": step, "history": history, "attempt": attempt, "final": history[-1]}
            _save_checkpoint(model, unified, optimizer, scheduler, state, history[-1], args)

    with _full_weights(model, args, rank0_only=False):
        checks = _checksums(unified)
    final = {**(history[-1] if history else {}), "step": step, "attempt": attempt,
             "resumed_from_step": resumed_from, "world_size": world, **checks}
    state = {"step": step, "history": history, "attempt": attempt, "final": final}
    _save_checkpoint(model, unified, optimizer, scheduler, state, final, args)
