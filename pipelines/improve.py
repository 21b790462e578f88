"""The second half of a round: train, evaluate, audit, promote -- and the base-model evaluation.

Where it fits: called through `pipelines.rounds` by the driver's round function. Same convention as
there: each stage returns `(result, info)`. Training runs on Ray Train (`trainers.train`), the
evaluation runs as a Ray Data map and a Ray task (so on a cluster it lands on GPU nodes), the audit
is a pure decision.

Example:
    >>> result, info = train(ctx, 1, pooled, adapter=None)   # adapters/round_1, or skipped
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import stages
from pipelines.audit import AuditDecision
from pipelines.config import Config, derive_seed
from pipelines.results import Evaluated, PoolRows, Promoted, RoundRecord, Trained
from pipelines.rounds import Ctx, adapter_path
from pipelines.store import RunStore


# ------------------------------------------------------------------ train
def train_args(cfg: Config, k: int, init_adapter: Optional[str], storage_path: str):
    from models.lora import LoraSpec
    from trainers.train import TrainArgs

    t, lora = cfg.train, cfg.model.lora
    return TrainArgs(
        objective=t.objective, model_path=cfg.model.path, model_dtype=cfg.model.dtype, init_adapter=init_adapter,
        lora=LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                      modules_to_save=list(lora.modules_to_save)),
        num_workers=t.num_workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker, lr=t.lr,
        weight_decay=t.weight_decay, epochs=t.epochs, **loss_distribution(cfg),
        max_steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule, beta=t.beta, loss_type=t.loss_type,
        label_smoothing=t.label_smoothing, aux_weight=cfg.cpr.weight, precision=t.precision, strategy=t.strategy,
        max_failures=t.max_failures, checkpoint_every=t.checkpoint_every,
        seed=derive_seed(cfg.run.seed, k, "train"), storage_path=storage_path, run_name=f"round_{k}")


def loss_distribution(cfg: Config) -> dict[str, float]:
    """cfg_weight / temperature of the distribution SFT and DPO log-probs are taken on (train.logprob_branch)."""
    if cfg.train.logprob_branch == "guided":
        return {"cfg_weight": cfg.generate.cfg_weight, "temperature": cfg.generate.temperature}
    return {"cfg_weight": 1.0, "temperature": 1.0}


def _ref_logprobs(cfg: Config, adapter: Optional[str], pairs: list[dict]) -> list[dict]:
    from trainers.train import precompute_ref_logprobs

    return precompute_ref_logprobs(cfg.model.path, adapter, pairs, dtype=cfg.model.dtype,
                                   device="cuda" if cfg.generate.num_gpus_per_actor else "cpu",
                                   **loss_distribution(cfg))


def _training_data(cfg: Config, args: Any, adapter: Optional[str], store: RunStore, k: int, key: str,
                   with_cpr: bool):
    """The train stage's rows, in a Ray task (`train`: on the driver only for an SFT set within one
    pool chunk): round k's pool table `key` (sft or pairs) and the CPR rows if `with_cpr`, DPO's
    reference log-probs added, checked and packed (`trainers.train.prepare`). Returns (PackedRows,
    rows, CPR rows); from the task, the packed rows stay in the object store for the training workers."""
    from trainers.train import prepare

    rows = PoolRows(k).table(store, key).to_dict("records")
    if cfg.train.objective == "dpo":  # reference log-probs once, before training: no resident reference model
        rows = _ref_logprobs(cfg, adapter, rows)
    aux = PoolRows(k).table(store, "cpr").to_dict("records") if with_cpr else None
    return prepare(args, rows, aux), len(rows), len(aux or ())


def train(ctx: Ctx, k: int, pooled: PoolRows, adapter: Optional[str]) -> tuple[Trained, dict]:
    """LoRA post-training on the round's SFT set or DPO pairs; starts from the round's start adapter.
    The rows are read, checked and packed (`_training_data`) by a Ray task, which also computes DPO's
    reference log-probs, so the driver holds their counts; an SFT set no larger than one chunk of the
    pool stage (`pools.chunk_prompts` x samples per prompt) is packed on the driver instead (a task
    costs a fresh worker process, ~4 s a round on 2 CPUs)."""
    import ray

    from trainers.train import train_adapter

    cfg, store = ctx.cfg, ctx.store
    key = "sft" if cfg.train.objective == "sft" else "pairs"
    n = pooled.counts[key]
    if n < cfg.train.num_workers:
        reason = f"{n} {key} rows for {cfg.train.num_workers} workers: nothing to train on"
        return Trained(None), {"skipped": reason, "rows": n}
    local = isinstance(store.fs, pafs.LocalFileSystem)
    storage = store.path("train") if local else store.uri + "/train"
    out_dir = store.adapter_dir(k) if local else tempfile.mkdtemp(prefix="unigap-adapter-")
    if local and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # a crashed earlier attempt; the stage was never marked done
    args = train_args(cfg, k, adapter, storage)
    data = (cfg, args, adapter, store, k, key, bool(pooled.counts.get("cpr")))
    per_prompt = max([cfg.generate.num_images, *cfg.generate.num_images_by_category.values()])
    if key == "sft" and n + pooled.counts.get("cpr", 0) <= cfg.pools.chunk_prompts * per_prompt:
        packed, rows, aux = _training_data(*data)
        packed = ray.put(packed)
    else:
        packed, rows, aux = stages.model_task(cfg, _training_data).options(num_returns=3).remote(*data)
        rows, aux = ray.get([rows, aux])  # bad rows fail here, before any training
    result = train_adapter(args, None, out_dir, packed=packed)
    if not local:
        pafs.copy_files(out_dir, store.adapter_dir(k), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=store.fs)
    final = {f"train/{m}": float(v) for m, v in result.metrics.items() if isinstance(v, (int, float))}
    info = {"rows": rows, "cpr_rows": aux, "steps": len(result.history), "loss": final.get("train/loss", float("nan"))}
    return Trained(k, final), info


# ------------------------------------------------------------------ evaluate
def _load_eval_models(cfg: Config, adapter: Optional[str]):
    from models.loading import load_model
    from pipelines.audit import make_external_judge

    model = load_model(cfg.model.path, cfg.model.dtype, "cuda" if cfg.generate.num_gpus_per_actor else "cpu",
                       adapter=adapter, judge_mode=cfg.judge.mode, merge=True)
    return model, make_external_judge(cfg.audit, dtype=cfg.model.dtype, device=cfg.model.device)


GEN_COLUMNS = ["kind", "prompt_id", "prompt", "category", "sample_index", "seed", "png", "own_score", "own_valid",
               "own_answer", "own_verdict", "judge_mode", "external_verdict", "label_source"]
ORACLE_COLUMNS = ["second_verdict", "near_threshold", "cycle_ok", "caption_faithful", "cycle_failure"]
VAL_COLUMNS = ["kind", "prompt_id", "prompt", "category", "sample_index", "seed", "external_verdict"]
_PAD = {"png": b"", "own_score": float("nan"), "own_valid": False, "own_answer": "", "own_verdict": False,
        "judge_mode": "", "label_source": "", "cycle_failure": ""}  # a validation row's held-out-only columns


def evaluate_rows(batch: pd.DataFrame, cfg: Config, adapter: Optional[str]) -> pa.Table:
    """One batch of the evaluation's map (a Ray Data task): the round's model and the external judge
    map prompts (`eval_split`: heldout | validation) to their rows -- held-out generations with own
    and external verdicts (+ second verdict and UniCycle in the shapes world), validation generations
    with the external verdict -- in one table of fixed columns (validation rows padded)."""
    from pipelines.evaluate import generation_rows, validation_rows
    from pipelines.shapes_checks import second_verdict, unicycle

    columns = GEN_COLUMNS + (ORACLE_COLUMNS if cfg.audit.backend == "oracle" else [])
    model, judge = _load_eval_models(cfg, adapter)
    heldout = batch[batch["eval_split"] == "heldout"].to_dict("records")
    validation = batch[batch["eval_split"] == "validation"].to_dict("records")
    parts = []
    if heldout:  # eval samples as the run does
        gen, images = generation_rows(model, judge, heldout, cfg.eval, cfg.judge.mode or model.default_judge_mode,
                                      cfg.generate)
        if cfg.audit.backend == "oracle":  # shapes world: a gain only the oracle sees is not a gain; UniCycle
            gen, _ = second_verdict(gen, images)
            gen = unicycle(gen, images, model)
        parts.append(gen.assign(eval_split="heldout"))
    if validation:
        val = validation_rows(model, judge, validation, cfg.eval, cfg.generate)
        parts.append(val.assign(**{c: _PAD.get(c, float("nan")) for c in columns if c not in val},
                                eval_split="validation"))
    frame = pd.concat(parts, ignore_index=True)[columns + ["eval_split"]]
    return pa.Table.from_pandas(frame, preserve_index=False)  # Arrow blocks: plain dtypes back on the driver


def _evaluate_task(cfg: Config, adapter: Optional[str], heldout: list[dict], base_pairs, generations):
    """Understanding pairs and all metrics, on the shards' generation rows."""
    from pipelines.evaluate import EvalResult, evaluate_round
    from pipelines.shapes_checks import second_verdict_metrics, unicycle_metrics

    model, judge = _load_eval_models(cfg, adapter)
    out = evaluate_round(model, judge, heldout, cfg.eval, cfg.judge.mode or model.default_judge_mode,
                         generate_cfg=cfg.generate, base_pairs=base_pairs, generations=generations)
    extra = {**(second_verdict_metrics(out.samples) if "second_verdict" in out.samples else {}),
             **(unicycle_metrics(out.samples) if "cycle_ok" in out.samples else {})}
    return EvalResult({**out.metrics, **extra}, out.samples)


def evaluate_model(cfg: Config, adapter: Optional[str], heldout: list[dict], base_pairs=None, validation=()):
    """(EvalResult, validation rows or None) of one model: the generations of the held-out prompts
    and the validation slice as a Ray Data map (`evaluate_rows`, `eval.num_shards` batches in parallel
    tasks, anywhere on the cluster; each row depends on its prompt alone, so the rows are the same for
    any split), then the understanding pairs and all metrics in one Ray task. The rows are bounded by
    the eval config (eval.num_prompts x num_images), not by the run's size, so they come back to the
    driver. Tasks, not an actor pool: each batch loads the model once either way, and an actor pool
    starts fresh worker processes every evaluation (measured +6 to +7 s a round on 2 CPUs, against
    warm task workers)."""
    import ray

    from pipelines.evaluate import EvalResult, select_prompts, validation_metrics

    prompts = select_prompts(heldout, cfg.eval.num_prompts, cfg.eval.seed)
    items = [{"prompt_id": str(r["prompt_id"]), "prompt": r["prompt"], "category": r.get("category") or "uncategorized",
              "eval_split": split} for split, rows in (("heldout", prompts), ("validation", validation)) for r in rows]
    n = max(1, min(cfg.eval.num_shards, len(items)))
    g = cfg.generate
    ds = ray.data.from_items(items).map_batches(
        evaluate_rows, batch_size=-(-len(items) // n), batch_format="pandas",
        fn_kwargs={"cfg": cfg, "adapter": adapter}, compute=ray.data.TaskPoolStrategy(size=n),
        num_cpus=g.num_cpus_per_actor, num_gpus=g.num_gpus_per_actor or None)
    rows = pa.concat_tables(ray.get(ds.to_arrow_refs())).to_pandas()
    split = rows.pop("eval_split")
    generations = rows[split == "heldout"].reset_index(drop=True)
    out = stages.run_model_task(cfg, _evaluate_task, cfg, adapter, prompts, base_pairs, generations)
    if not (split == "validation").any():
        return out, None
    val = rows.loc[split == "validation", VAL_COLUMNS]
    val = val.sort_values(["prompt_id", "sample_index"], kind="stable").reset_index(drop=True)
    return EvalResult({**out.metrics, **validation_metrics(val)}, out.samples), val


def start_model(store: RunStore, cfg: Config) -> int:
    """The round whose model the next round improves (0 = base): audit.continue_from."""
    best = store.pointer("best") or 0
    head = store.pointer("head")
    return best if cfg.audit.continue_from == "best" or head is None else head


def evaluate(ctx: Ctx, k: int, trained: Trained) -> tuple[Evaluated, dict]:
    """Held-out metrics of the round's model (the new adapter; the start model if training skipped)."""
    start = start_model(ctx.store, ctx.cfg)
    model_round = trained.adapter_round or start
    base = ctx.store.read_table(0, "evaluate", "pairs").to_pandas() if k else None
    out, val = evaluate_model(ctx.cfg, adapter_path(ctx.store, model_round), ctx.heldout, base, ctx.validation)
    metrics = {**out.metrics, **_paired_gains(ctx.store, k, start, out.samples)}
    result = Evaluated(metrics, model_round, out.samples, out.pairs, val)
    if val is not None:
        if k:  # paired with the base model's validation rows (same prompts, same seeds)
            from pipelines.evaluate import paired_gain

            metrics.update(paired_gain(val, ctx.store.read_table(0, "evaluate", "validation").to_pandas(),
                                       "val_gain_vs_base", seed=k))
    info = {"model_round": model_round, "gen_accuracy": metrics.get("eval/gen_accuracy"),
            "und_accuracy": metrics.get("eval/und_accuracy"), "gain_vs_base": metrics.get("eval/gen_gain_vs_base"),
            "val_accuracy": metrics.get("eval/val_accuracy")}
    return result, info


def _paired_gains(store: RunStore, k: int, start: int, samples) -> dict[str, float]:
    """Round k's held-out generation accuracy vs the base model and vs the round it started from,
    paired over prompts (same prompts, same seeds every round: pipelines.evaluate.paired_gain)."""
    from pipelines.evaluate import paired_gain

    if not k:
        return {}
    out, tables = {}, {}
    for name, ref in (("gen_gain_vs_base", 0), ("gen_gain_vs_start", start)):
        if ref not in tables:  # start is often the base itself: read each round's table once
            tables[ref] = store.read_table(ref, "evaluate", "samples").to_pandas()
        reference = tables[ref]
        out.update(paired_gain(samples, reference, name, seed=k))
        if "second_verdict" in samples and "second_verdict" in reference:
            out.update(paired_gain(samples, reference, name + "_second", seed=k, verdict="second_verdict"))
    return out


def evaluate_base(ctx: Ctx) -> RoundRecord:
    """Round 0: the base model's held-out metrics; it is the first `best`."""
    evaluated = ctx.stage(0, "evaluate", lambda: evaluate(ctx, 0, Trained(None)))
    if ctx.store.pointer("best") is None:
        for name in ("best", "latest", "head"):
            ctx.store.set_pointer(name, 0)
    ctx.tracker.log_samples(0, evaluated.samples)
    return RoundRecord(0, None, AuditDecision(True, False, "base model", 0), evaluated.metrics)


def train_curve(store: RunStore, round_: Optional[int]) -> list[dict]:
    """The per-step training history of the adapter round `round_` (`train_metrics.json` beside the
    adapter; [] for None or a round that trained nothing): step, loss, grad_norm, lr, tokens_per_s."""
    if round_ is None:
        return []
    try:
        with store.fs.open_input_stream(posixpath.join(store.adapter_dir(round_), "train_metrics.json")) as fh:
            return json.loads(fh.read())["history"]
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------ audit / promote
def audit(ctx: Ctx, k: int, evaluated: Evaluated) -> tuple[AuditDecision, dict]:
    """Compare with the best promoted round by the external metric; flag co-degradation."""
    from pipelines.audit import audit_vs_best as decide

    store = ctx.store
    best = store.pointer("best") or 0
    best_metrics = store.stage_info(best, "evaluate")["result"]["metrics"]
    if evaluated.model_round != k:  # training was skipped: there is no new model to promote
        decision = AuditDecision(False, False, "no new adapter (training skipped)", best, ctx.cfg.audit.metric,
                                 round=evaluated.model_round or 0)
    else:
        base_metrics = store.stage_info(0, "evaluate")["result"]["metrics"]
        decision = decide(best, best_metrics, k, evaluated.metrics, ctx.cfg.audit, base_metrics)
    info = {"decision": "promote" if decision.promote else ("degraded" if decision.degraded else "keep")}
    return decision, info


def promote(store: RunStore, k: int, decision: AuditDecision) -> tuple[Promoted, dict]:
    """Move `latest` to k; `best` only when the audit says so (a worse round is never promoted);
    `head` (audit.continue_from=last_kept) when round k made a new model that was not degraded."""
    store.set_pointer("latest", k)
    if decision.promote:
        store.set_pointer("best", k)
    if decision.round == k and not decision.degraded:
        store.set_pointer("head", k)
    best, head = store.pointer("best"), store.pointer("head")
    return Promoted(best, head), {"best": best, "head": head}


def round_metrics(k: int, pooled: PoolRows, trained: Trained, decision: AuditDecision,
                  timings: dict) -> dict[str, Any]:
    """Per-round scalars for W&B and the report, besides the evaluation's own."""
    counts = pooled.counts  # the judged rows' pools, counted by the pool stage
    out = {f"train_set/{name}": int(counts.get(name, 0)) for name in ("accepted", "rejected", "uncertain")}
    out.update({f"train_set/{m}": v for m, v in pooled.nonunified.items()})
    out.update(trained.metrics)
    seconds = {name: timings.get(f"time/{name}", 0.0) for name in ("generate", "train")}
    if seconds["generate"] > 0:
        out["throughput/generate_rows_per_s"] = counts.get("samples", 0) / seconds["generate"]
    if seconds["train"] > 0 and "train/step" in out:
        out["throughput/train_steps_per_s"] = out["train/step"] / seconds["train"]
    out.update({"audit/degraded": float(decision.degraded), "audit/promote": float(decision.promote)})
    out.update(timings)
    return out
