"""One typed config tree for the whole project: pydantic v2 models, YAML mirror, dotted CLI overrides.

Where it fits: every entry point (driver, trainer, serve, benchmarks) calls `load_config` once; the
resolved tree is saved in the run dir (`store.RunStore.init`) and hashed (`config_hash`) so a
resumed run can tell whether it is "the same experiment". YAML files mirror the models 1:1;
every field has a default, so an empty YAML is a valid config (the shapes run on CPU).

Inputs: an optional YAML path and overrides like `train.beta=0.2` or
`model.lora.target_modules=[q_proj,v_proj]` (values are YAML literals). Output: a `Config`.
Everything is checked at load time (unknown keys with a suggestion, types, ranges, impossible
combinations) so a bad config fails before any compute, with a `ConfigError` naming the dotted key.

Example:
    >>> from pipelines.config import load_config, ConfigError
    >>> cfg = load_config(None, ["judge.mode=prob", "train.beta=0.2"])
    >>> cfg.judge.mode, cfg.train.beta
    ('prob', 0.2)
    >>> try:
    ...     load_config(None, ["train.bta=0.2"])
    ... except ConfigError as e:
    ...     print(e)
    train.bta: unknown key (did you mean 'train.beta'?)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, Field

from models.seeds import stable_bits
from pipelines.cpr import CprSection
from pipelines.typed_config import ConfigError, Section, build, read_yaml, walk
from pipelines.typed_config import doc_field as _f
from pipelines.typed_config import section_field as _section

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "dump_config",
           "flatten_config", "config_hash", "config_docs", "derive_seed", "HASH_EXCLUDE"]


# Janus LM projections, a regex peft full-matches on module names (anchored: the vision tower shares them).
LM_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class RunSection(Section):
    name: str = _f("shapes", "Run directory name under `root`; letters, digits, . _ - only.")
    root: str = _f("runs", "Run store root: local dir, file://, s3:// or gs:// URI.")
    seed: int = _f(0, "Run seed; stage seeds derive from (seed, round, stage, shard).", ge=0)
    rounds: int = _f(3, "Self-improvement rounds 1..rounds (round 0 = base-model evaluation).", ge=0)
    force: bool = _f(False, "Reuse a run dir created with a different config (kept, logged).")


class LoraSection(Section):
    r: int = _f(16, "LoRA rank.", ge=1)
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r).", gt=0)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", ge=0, le=0.9)
    target_modules: Union[str, list[str]] = _f(
        LM_PROJECTIONS, "Modules to adapt: a regex string (peft full match) or a list of names.")
    modules_to_save: list[str] = _f(["generation_head"], "Modules trained in full and saved with the adapter.")


class ModelSection(Section):
    path: str = _f("shapes", "Checkpoint dir or hub id; 'shapes' = shipped shapes/checkpoint, 'tiny' = random.")
    kind: Literal["janus"] = _f("janus", "Model family (one file per family in models/).")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Weight dtype for inference.")
    device: Literal["cpu", "cuda", "auto"] = _f("auto", "Device; auto = cuda when available.")
    lora: LoraSection = _section(LoraSection, "LoRA adapter trained each round.")


class PromptsSection(Section):
    source: str = _f("shapes", "'shapes' (built-in world) or a .jsonl/.csv/.parquet with `prompt`.")
    split: Literal["train", "heldout", "all"] = _f("train", "Which prompts to train on.")
    limit: Optional[int] = _f(None, "Keep at most this many prompts (after filtering).", ge=1)
    per_round: Optional[int] = _f(None, "Prompts per round, a rotating slice of the prompt list (None = all, every "
                                  "round); the curriculum replays earlier rounds' discard pools on top.", ge=1)
    shuffle: bool = _f(True, "Shuffle the training prompts once, seeded by run.seed, before rounds slice them.")
    max_prompt_tokens: int = _f(64, "Prompts longer than this (in tokens) are skipped.", ge=1)
    extra_sources: list[str] = _f([], "More prompt files, e.g. the serve contradiction log.")
    category_mix: dict[str, Annotated[float, Field(ge=0)]] = _f(
        {}, "Shares of a round's slice per prompt category (normalised; each category rotates through its own "
        "prompts; categories not named get none); {} = one slice of the mixed list.")
    proposer: Literal["none", "describe"] = _f("none", "describe: the model proposes prompts each round (captions "
                                               "of its unconditional draws; pipelines/propose.py); none: off.")
    proposal_share: float = _f(0.5, "Share of a round's prompts (per_round) the proposer supplies; the rotating "
                               "slice fills the rest (and any shortfall).", ge=0, le=1)
    proposal_inflation: float = _f(3.0, "Images drawn per wanted proposal (failures and duplicates are dropped).",
                                   ge=1, le=100)
    proposal_target: Literal["uniform", "nonunified"] = _f(
        "uniform", "Proposals per category: uniform, or by the last round's Nonunified score per category.")


class GenerateSection(Section):
    num_images: int = _f(8, "N images sampled per prompt.", ge=1)
    num_images_by_category: dict[str, Annotated[int, Field(ge=1)]] = _f(
        {}, "N per prompt for the named categories (e.g. more samples where the model is rarely right); others "
        "use num_images.")
    cfg_weight: float = _f(5.0, "Classifier-free guidance weight; 1.0 = no guidance.", ge=1.0, le=20.0)
    temperature: float = _f(1.0, "Sampling temperature of the image tokens.", gt=0)
    top_k: Optional[int] = _f(None, "Sample only among the k most likely tokens (None = all).", ge=1)
    batch_size: int = _f(16, "Prompts per model call.", ge=1)
    num_actors: int = _f(1, "Generation actors (Ray Data actor pool size).", ge=1)
    num_cpus_per_actor: float = _f(1.0, "CPUs reserved per generation actor.", ge=0)
    num_gpus_per_actor: float = _f(0.0, "GPUs per generation actor; fractions share a GPU.", ge=0)


class JudgeSection(Section):
    mode: Optional[Literal["binary", "prob", "describe_prob"]] = _f(
        None, "binary: parse 'The score is s'; prob: P(Yes); describe_prob: describe, then P(Yes); "
        "null: the mode the checkpoint was trained for.")
    batch_size: int = _f(16, "Images per judge call.", ge=1)
    num_actors: int = _f(1, "Judge actors (Ray Data actor pool size).", ge=1)
    num_cpus_per_actor: float = _f(1.0, "CPUs reserved per judge actor.", ge=0)
    num_gpus_per_actor: float = _f(0.0, "GPUs per judge actor; fractions share a GPU.", ge=0)
    fused: bool = _f(True, "Judge in the generation actors (one model copy, no second pool; the actor and CPU / "
                     "GPU settings above are then unused); false = a separate judge pool, e.g. on other GPUs.")
    grades: int = _f(0, "0: the own judge's score as it is; N: as a grade k/N (P(Yes) in N+1 bins), e.g. 10 for "
                     "UniCorn's 0-10 judge (with pools.accept_threshold=0.7 and pools.sft_select=best_of_n: keep "
                     "a prompt's best candidate if it scores above 6).", ge=0, le=100)
    corrupt: Literal["none", "random", "inverted", "oracle"] = _f(
        "none", "Control arm: replace the judge's scores on purpose: random, inverted (1 - score), or oracle "
        "(the shapes oracle's verdict: the upper bound any own judge can reach).")


class PoolsSection(Section):
    accept_threshold: float = _f(0.6, "score >= this -> accepted (checked before rejected).", ge=0, le=1)
    reject_threshold: float = _f(0.4, "score <= this -> rejected; in between -> uncertain.", ge=0, le=1)
    sft_select: Literal["all", "best_of_n"] = _f("all", "SFT rows: all accepted samples, or per prompt the top-scored "
                                                 "accepted one plus any above best_of_n_keep_above.")
    best_of_n_keep_above: float = _f(0.9, "best_of_n also keeps accepted samples scoring above this.", ge=0, le=1)
    category_cap: Optional[float] = _f(
        None, "Most share of the SFT rows one category may take (the top-scored are kept); None = no cap.", gt=0, le=1)
    review_sample: int = _f(32, "Uncertain samples exported for human review (0 = none).", ge=0)
    review_seed: int = _f(0, "Seed of the risk-weighted review sample.", ge=0)
    chunk_prompts: int = _f(2048, "Prompts whose rows the driver reads at once (row checks, pool stage).", ge=1)


class PairsSection(Section):
    strategy: Literal["best_worst", "all"] = _f("best_worst", "best_worst: top accepted vs bottom rejected; "
                                                "all: every accepted x rejected.")
    margin: float = _f(0.0, "Minimum chosen - rejected score gap for a pair.", ge=0, le=1)
    max_pairs_per_prompt: int = _f(4, "Cap on pairs per prompt (seeded sample when over).", ge=0)


class TrainSection(Section):
    objective: Literal["sft", "dpo"] = _f("sft", "sft on accepted samples, or dpo on pairs.")
    num_workers: int = _f(1, "Ray Train workers (data-parallel replicas).", ge=1)
    use_gpu: bool = _f(False, "One GPU per train worker.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per train worker (Ray Train needs > 0).", gt=0)
    lr: float = _f(3e-4, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapter (0: no pull back towards the start model).", ge=0)
    logprob_branch: Literal["guided", "conditional"] = _f(
        "guided", "Distribution the SFT/DPO log-probs (policy and reference) are taken on: guided = CFG at "
        "generate.cfg_weight and generate.temperature, what sampling, evaluation and the audit use; "
        "conditional = the conditional branch alone.")
    allow_cfg_mismatch: bool = _f(False, "Allow logprob_branch=conditional while generate.cfg_weight != 1 (trains "
                                  "another distribution than the one sampled; measured to degrade the shapes model).")
    epochs: int = _f(3, "Passes over the round's training set.", ge=1)
    steps: Optional[int] = _f(None, "Cap on optimizer steps per round (None = epochs decide).", ge=1)
    batch_size: int = _f(16, "Rows per worker per micro-batch.", ge=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", ge=0)
    warmup_steps: int = _f(0, "Linear warm-up steps.", ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = _f("constant", "Decay after warm-up.")
    beta: float = _f(0.1, "DPO beta (strength of the KL anchor to the reference).", gt=0)
    loss_type: Literal["sigmoid", "ipo"] = _f("sigmoid", "DPO loss (TRL names).")
    label_smoothing: float = _f(0.0, "Conservative-DPO label smoothing (sigmoid only).", ge=0, le=0.49)
    precision: Literal["fp32", "bf16"] = _f("fp32", "Training compute precision.")
    strategy: Literal["ddp", "fsdp"] = _f("ddp", "Data-parallel strategy.")
    max_failures: int = _f(0, "Worker failures Ray Train retries from the last checkpoint.", ge=0)
    checkpoint_every: int = _f(0, "Checkpoint every k steps (0 = only at the end).", ge=0)


class CurriculumSection(Section):
    enabled: bool = _f(False, "Replay discard-pool prompts with the current model (Alg. 2).")
    start_round: int = _f(2, "First round that replays (later works better, per the paper).", ge=1)
    max_replay: Optional[int] = _f(None, "Cap on replayed prompts per round (None = all).", ge=1)


class EvalSection(Section):
    num_prompts: int = _f(118, "Held-out prompts evaluated each round.", ge=1)
    num_images: int = _f(8, "Images per held-out prompt.", ge=1)
    understanding_pairs: int = _f(256, "(image, prompt) pairs for the understanding check.", ge=0)
    seed: int = _f(1234, "Evaluation seed (the same every round, so rounds compare).", ge=0)
    validation_prompts: int = _f(
        0, "Training prompts set aside (never trained on; the same ones whatever run.seed) and evaluated each "
        "round like the held-out set: choose recipe settings on eval/val_*, never on held-out (0 = off).", ge=0)
    validation_images: int = _f(8, "Images per validation prompt.", ge=1)
    num_shards: int = _f(2, "Parallel evaluation tasks (Ray Data), each on a share of the prompts (same rows).", ge=1)


class AuditSection(Section):
    backend: Literal["oracle", "vlm", "openai_http", "vllm"] = _f(
        "oracle", "External judge: oracle, VLM in process, OpenAI endpoint, or a vLLM engine (ray.data.llm).")
    vlm_path: Optional[str] = _f(None, "External VLM checkpoint (backend=vlm or vllm).")
    vllm_replicas: int = _f(1, "vLLM engine replicas (backend=vllm; each on its own GPU(s)).", ge=1)
    vllm_tensor_parallel_size: int = _f(1, "GPUs per vLLM engine (tensor parallel).", ge=1)
    vllm_max_model_len: int = _f(8192, "vLLM context length (image + question tokens).", ge=256)
    vllm_accelerator: Optional[str] = _f(None, "GPU type for the vLLM engines, e.g. H100 (None = any GPU).")
    http_url: Optional[str] = _f(None, "Chat-completions URL of the judge endpoint (backend=openai_http).")
    http_model: str = _f("unigap", "Model name sent to the judge endpoint.")
    http_api_key_env: Optional[str] = _f(None, "Env var with the endpoint's API key (None = no auth).")
    http_concurrency: int = _f(1, "Concurrent request workers (ray.data.llm).", ge=1)
    http_qps: Optional[int] = _f(None, "Requests per second cap (None = none).", ge=1)
    http_max_retries: int = _f(2, "Retries of a failed request (429/5xx, connection errors).", ge=0)
    metric: Literal["gen_accuracy", "und_win_rate", "val_accuracy"] = _f(
        "gen_accuracy", "External metric that must not get worse; val_accuracy = the validation slice "
        "(eval.validation_prompts), so promotion and rollback never select on the held-out prompts.")
    tolerance: float = _f(0.02, "Allowed drop of `metric` before a round counts as degraded.", ge=0)
    continue_from: Literal["best", "last_kept"] = _f(
        "last_kept", "The model the next round improves: the best promoted round, or the last round that was "
        "not degraded (a round held within tolerance stays in the chain, so gains smaller than the "
        "evaluation noise can add up over rounds; a degraded round is always rolled back).")
    paired_rollback: bool = _f(True, "Also count a round as degraded when its paired gain over the base model (same "
                               "prompts and seeds) has a 95% CI entirely below 0, even within tolerance "
                               "(gen_accuracy: on the held-out prompts; val_accuracy: on the validation slice).")
    max_und_drop: Optional[float] = _f(0.05, "A round whose understanding accuracy falls more than this below the "
                                       "base model's also counts as degraded (None = not checked).", ge=0, le=1)
    on_degradation: Literal["stop", "continue_from_best"] = _f("continue_from_best", "stop the run, or roll back "
                                                               "to the best adapter and go on.")


class WandbSection(Section):
    mode: Literal["offline", "online", "disabled"] = _f("offline", "offline never touches the network.")
    project: str = _f("unigap", "W&B project.")
    group: Optional[str] = _f(None, "W&B group (None = run name).")
    tags: list[str] = _f([], "W&B tags.")
    dir: Optional[str] = _f(None, "W&B dir (None = the run dir when local).")


class ServeSection(Section):
    host: str = _f("127.0.0.1", "HTTP bind address.")
    port: int = _f(8000, "HTTP port.", ge=1, le=65535)
    min_replicas: int = _f(1, "Autoscaling lower bound.", ge=0)
    max_replicas: int = _f(2, "Autoscaling upper bound.", ge=1)
    target_ongoing_requests: float = _f(2.0, "Autoscaling target per replica.", gt=0)
    max_batch_size: int = _f(8, "Dynamic batching: most requests per model call.", ge=1)
    batch_wait_timeout_s: float = _f(0.05, "Dynamic batching: wait for a fuller batch.", ge=0)
    contradiction_threshold: float = _f(0.5, "Self-judge score below this is logged.", ge=0, le=1)
    max_prompt_chars: int = _f(512, "Longer prompts are refused (HTTP 422).", ge=1)
    max_n: int = _f(4, "Most images returned per request.", ge=1)
    max_best_of: int = _f(8, "Most candidates sampled per request (best_of >= n).", ge=1)
    api_key_env: Optional[str] = _f(None, "Env var holding the API key (None = no auth).")
    body_timeout_s: float = _f(10.0, "A request body must arrive within this many seconds (HTTP 408; serve/guard.py).",
                               gt=0, le=600)
    max_ongoing_requests: int = _f(64, "Requests a replica holds at once (running + waiting for a batch); "
                                   "more queue at the proxy.", ge=1)


class RaySection(Section):
    address: Optional[str] = _f(None, "Cluster address (None = start a local Ray).")
    num_cpus: Optional[int] = _f(None, "CPUs of the local Ray (None = all).", ge=1)
    object_store_mb: int = _f(512, "Local object store size in MiB.", ge=64)


class Config(Section):
    run: RunSection = _section(RunSection, "Run identity and the run store.")
    model: ModelSection = _section(ModelSection, "The unified model and its LoRA.")
    prompts: PromptsSection = _section(PromptsSection, "Where prompts come from.")
    generate: GenerateSection = _section(GenerateSection, "Sampling N images per prompt.")
    judge: JudgeSection = _section(JudgeSection, "The model judging its own images.")
    pools: PoolsSection = _section(PoolsSection, "Accepted / rejected / uncertain pools.")
    pairs: PairsSection = _section(PairsSection, "DPO pair building.")
    train: TrainSection = _section(TrainSection, "LoRA training with Ray Train.")
    cpr: CprSection = _section(CprSection, "UniCorn's caption / judgement / reflection rows (pipelines/cpr.py).")
    curriculum: CurriculumSection = _section(CurriculumSection, "Discard-pool replay.")
    eval: EvalSection = _section(EvalSection, "Held-out evaluation each round.")
    audit: AuditSection = _section(AuditSection, "External judge; promote or roll back.")
    wandb: WandbSection = _section(WandbSection, "Experiment tracking.")
    serve: ServeSection = _section(ServeSection, "Ray Serve deployment.")
    ray: RaySection = _section(RaySection, "Ray cluster connection.")


# Fields that do not change any stage output: changing them must not make a run "a different
# experiment". run.rounds is here so a finished run can be extended (rounds=3 -> 5) and resumed.
# Batch sizes stay in: padding changes the numerics of batched forward passes.
HASH_EXCLUDE: tuple[str, ...] = (
    "run.name", "run.root", "run.force", "run.rounds", "wandb", "serve", "ray", "generate.num_actors",
    "generate.num_cpus_per_actor", "judge.num_actors", "judge.num_cpus_per_actor", "judge.fused",
    "train.cpus_per_worker", "train.max_failures", "train.checkpoint_every", "eval.num_shards", "pools.chunk_prompts")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (None = all defaults), apply dotted overrides, type-check and validate.

    A file may start from another with `extends: <path relative to it>`; its own keys win
    (section by section), so an experiment file lists only what it changes.
    """
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Build a validated `Config` from a plain nested dict (as YAML gives) plus overrides."""
    cfg = build(Config, data, overrides)
    _check_combinations(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, in field order; `load_config` reads it back to an equal tree."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, default_flow_style=False)


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value (leaves only), e.g. for W&B config and config diffs."""
    return {k: v for k, _, v in walk(cfg) if not isinstance(v, BaseModel)}


def config_hash(cfg: Config) -> str:
    """Stable short hash of everything that changes results (see HASH_EXCLUDE for what doesn't)."""
    flat = {k: v for k, v in flatten_config(cfg).items()
            if not any(k == x or k.startswith(x + ".") for x in HASH_EXCLUDE)}
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_docs() -> dict[str, str]:
    """Dotted key -> one-line doc, for `--help` and for checking that every field is documented."""
    return {k: f.description or "" for k, f, _ in walk(Config)}


def derive_seed(run_seed: int, round_: int, stage: str, shard: int = 0) -> int:
    """Seed for one (round, stage, shard): independent streams, reproducible, order-free."""
    return stable_bits(f"{run_seed}/{round_}/{stage}/{shard}", 4)  # 32 bits: fits numpy and torch seeds


def _check_combinations(cfg: Config) -> None:
    """Reject settings that cannot work together, before any compute (first problem wins)."""
    t, p, r = cfg.train, cfg.pools, cfg.ray
    gpu_keys = [("generate.num_gpus_per_actor", cfg.generate.num_gpus_per_actor > 0), ("train.use_gpu", t.use_gpu),
                ("judge.num_gpus_per_actor", cfg.judge.num_gpus_per_actor > 0)]
    local_cpus = r.num_cpus if r.address is None and r.num_cpus is not None else None
    demands = [("generate.num_actors", cfg.generate.num_actors * cfg.generate.num_cpus_per_actor),
               ("judge.num_actors", cfg.judge.num_actors * cfg.judge.num_cpus_per_actor),
               ("train.num_workers", t.num_workers * t.cpus_per_worker)]
    checks = [
        ("pools.accept_threshold", p.accept_threshold < p.reject_threshold,
         f"{p.accept_threshold} is below pools.reject_threshold={p.reject_threshold}"),
        ("pairs.max_pairs_per_prompt", t.objective == "dpo" and cfg.pairs.max_pairs_per_prompt == 0,
         "train.objective=dpo needs at least one pair per prompt"),
        ("curriculum.start_round", cfg.curriculum.enabled and cfg.curriculum.start_round > cfg.run.rounds,
         f"{cfg.curriculum.start_round} is after the last round (run.rounds={cfg.run.rounds})"),
        ("judge.corrupt", cfg.judge.corrupt == "oracle" and cfg.audit.backend != "oracle",
         "the oracle-judge control needs the shapes world (audit.backend=oracle)"),
        ("audit.metric", cfg.audit.metric == "val_accuracy" and not cfg.eval.validation_prompts,
         "val_accuracy needs a validation slice: set eval.validation_prompts > 0"),
        ("audit.vlm_path", cfg.audit.backend in ("vlm", "vllm") and not cfg.audit.vlm_path,
         f"audit.backend={cfg.audit.backend} needs a VLM checkpoint path"),
        ("audit.http_url", cfg.audit.backend == "openai_http" and not re.match(r"https?://", cfg.audit.http_url or ""),
         "audit.backend=openai_http needs an http(s):// chat-completions URL"),
        ("train.logprob_branch", t.logprob_branch == "conditional" and cfg.generate.cfg_weight != 1.0
         and not t.allow_cfg_mismatch,
         f"conditional training under guided sampling (generate.cfg_weight={cfg.generate.cfg_weight}) trains "
         "another distribution than the one sampled and evaluated; use train.logprob_branch=guided, "
         "generate.cfg_weight=1.0, or train.allow_cfg_mismatch=true"),
        ("train.label_smoothing", t.loss_type == "ipo" and t.label_smoothing > 0,
         "label smoothing is defined for the sigmoid loss only"),
        ("train.warmup_steps", t.steps is not None and t.warmup_steps > t.steps,
         f"{t.warmup_steps} warm-up steps exceed train.steps={t.steps}"),
        ("serve.min_replicas", cfg.serve.min_replicas > cfg.serve.max_replicas,
         f"{cfg.serve.min_replicas} exceeds serve.max_replicas={cfg.serve.max_replicas}"),
        ("serve.max_ongoing_requests", cfg.serve.max_ongoing_requests < 2 * cfg.serve.max_batch_size,
         f"{cfg.serve.max_ongoing_requests} leaves no room for a full batch running while the next one "
         f"fills (need >= 2 * serve.max_batch_size = {2 * cfg.serve.max_batch_size})"),
        ("serve.max_n", cfg.serve.max_n > cfg.serve.max_best_of,
         f"{cfg.serve.max_n} exceeds serve.max_best_of={cfg.serve.max_best_of} (best_of >= n)"),
        ("model.dtype", cfg.model.dtype == "float16" and cfg.model.device == "cpu",
         "float16 is not supported on CPU; use float32 or bfloat16"),
        ("run.name", not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run.name) or cfg.run.name in (".", ".."),
         f"{cfg.run.name!r} is not a safe directory name (letters, digits, . _ -)"),
    ]
    checks += [(key, cfg.model.device == "cpu" and w, "needs a GPU but model.device=cpu") for key, w in gpu_keys]
    checks += [(key, local_cpus is not None and need > local_cpus,
                f"needs {need:g} CPUs but the local Ray has ray.num_cpus={local_cpus} (would hang)")
               for key, need in demands]
    checks += [(key, src != "shapes" and not src.lower().endswith((".jsonl", ".csv", ".parquet")),
                f"{src!r} is not 'shapes' or a .jsonl/.csv/.parquet")
               for key, src in [("prompts.source", cfg.prompts.source)]
               + [(f"prompts.extra_sources[{i}]", s) for i, s in enumerate(cfg.prompts.extra_sources)]]
    for key, bad, message in checks:
        if bad:
            raise ConfigError(key, message)
    _check_target_modules(cfg.model.lora.target_modules)


def _check_target_modules(target: str | list[str]) -> None:
    key = "model.lora.target_modules"
    if isinstance(target, list):
        if not target:
            raise ConfigError(key, "an empty list adapts nothing")
        return
    try:
        re.compile(target)
    except re.error as exc:
        raise ConfigError(key, f"invalid regex {target!r}: {exc}") from None
