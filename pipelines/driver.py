"""The driver: self-improvement rounds, audited by a judge that is not the model, resumable.

Where it fits: `unigap run CONFIG [key=value ...]` (locally, or `ray job submit -- unigap run ...` on a
cluster). Round 0 evaluates the base model. Each round k then runs the stages of `run_round`:

    [propose ->] generate -> judge -> pool -> train -> evaluate -> audit -> promote

Each stage writes `runs/<run>/round_<k>/<stage>/` and is marked done in the manifest; a rerun of the
same command skips finished stages (resume after `kill -9`, a lost job, a KubeRay retry). Round k
improves the last round that was not rolled back (or the best promoted one: `audit.continue_from`); a
round whose external metric falls beyond `audit.tolerance` below the best is flagged as co-degradation,
rolled back and never promoted (`audit.on_degradation`: stop, or continue from the best round). Stage
times are logged as `time/<stage>`.

Example:
    $ unigap run configs/shapes.yaml run.name=demo train.objective=dpo
"""

from __future__ import annotations

import logging
import os
import sys

from pipelines import improve, propose, rounds
from pipelines.config import Config, load_config
from pipelines.results import RoundRecord
from pipelines.rounds import Ctx
from pipelines.store import RunStore

log = logging.getLogger("unigap")
STAGES = ("generate", "judge", "pool", "train", "evaluate", "audit", "promote")


def run_round(ctx: Ctx, k: int) -> RoundRecord:
    """One self-improvement round on one screen: improve the start model, audit, promote."""
    cfg, store = ctx.cfg, ctx.store
    start = improve.start_model(store, cfg)  # the model this round improves (0 = base; audit.continue_from)
    adapter = rounds.adapter_path(store, start)
    proposed = None
    if cfg.prompts.proposer != "none":  # the model proposes some of the round's prompts (UniCorn's proposer)
        proposed = ctx.stage(k, "propose", lambda: propose.propose(ctx, k, adapter))
    prompts = rounds.round_prompts(ctx, k, propose.admitted(proposed))  # + rotating slice + curriculum replay
    samples = ctx.stage(k, "generate", lambda: rounds.generate(ctx, prompts, k, adapter))  # rows stay in storage
    judged = ctx.stage(k, "judge", lambda: rounds.judge(ctx, samples, k, adapter, prompts))
    pooled = ctx.stage(k, "pool", lambda: rounds.pool(ctx, k, judged, prompts))
    trained = ctx.stage(k, "train", lambda: improve.train(ctx, k, pooled, adapter))
    evaluated = ctx.stage(k, "evaluate", lambda: improve.evaluate(ctx, k, trained))
    decision = ctx.stage(k, "audit", lambda: improve.audit(ctx, k, evaluated))
    ctx.stage(k, "promote", lambda: improve.promote(store, k, decision))
    metrics = {**evaluated.metrics, **improve.round_metrics(k, pooled, trained, decision, ctx.timings)}
    if proposed is not None:
        info = store.stage_info(k, "propose")
        metrics.update({f"propose/{x}": info[x] for x in ("drawn", "admitted", "valid_rate", "heldout_candidates")})
    ctx.tracker.log_round(k, metrics)
    ctx.tracker.log_samples(k, evaluated.samples)
    ctx.tracker.log_train_curve(k, improve.train_curve(store, trained.adapter_round))
    if decision.degraded:
        ctx.tracker.flag(k, decision.reason)
    return RoundRecord(k, start, decision, metrics)


def run(cfg: Config) -> dict:
    """All rounds of `cfg` (round 0 = base evaluation); returns the final manifest."""
    # Everything is checked before anything is written: a bad prompt file or an unwritable run.root
    # leaves no run dir behind (whose config hash would block the corrected command).
    train, heldout, prompt_report = rounds.read_prompt_sets(cfg, as_table=True)  # ~50 bytes a prompt
    train, validation = rounds.split_validation(train, cfg.eval.validation_prompts)
    store = RunStore.from_config(cfg)  # checks run.root is writable first
    rounds.write_prompt_report(store, prompt_report)
    connect_ray(cfg)
    from pipelines.report import write_report
    from pipelines.tracking import Tracker

    ctx = Ctx(cfg, store, Tracker(cfg, store), train, heldout, validation)
    history = [improve.evaluate_base(ctx)]
    ctx.tracker.log_round(0, history[0].metrics)
    for k in range(1, cfg.run.rounds + 1):
        record = run_round(ctx, k)
        history.append(record)
        if record.decision.degraded and cfg.audit.on_degradation == "stop":
            print(f"[round {k}] co-degradation: stopping ({record.decision.reason})", flush=True)
            break
    write_report(ctx.store, [r.as_dict() for r in history])  # runs/<run>/report.md: metrics plot, before/after grid
    ctx.tracker.finish()
    return store.manifest()


def connect_ray(cfg: Config) -> None:
    """Join the cluster at RAY_ADDRESS / ray.address, or start a local Ray (bounded object store)."""
    import ray

    if ray.is_initialized():
        return
    bars = progress_bars()
    if not bars:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # inside `ray job submit` / a RayJob: the job's
        ray.init(address=address or "auto", log_to_driver=False)  # runtime env applies; don't fight it
    elif address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_mb * 1024**2,
                 include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        from pipelines.reaper import start_reaper

        start_reaper()  # the local Ray we started goes with us, even after kill -9
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = bars


def progress_bars() -> bool:
    """Ray Data progress bars only for a person watching: stderr is a terminal and not under CI / pytest."""
    return sys.stderr.isatty() and not any(os.environ.get(v) for v in ("CI", "PYTEST_CURRENT_TEST"))


def _cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)  # bad configs fail here, before Ray starts
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    manifest = run(cfg)
    best = manifest["pointers"].get("best")
    print(f"run {cfg.run.name}: done; best round {best}; "
          f"report {os.path.join(cfg.run.root, cfg.run.name, 'report.md')}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="run self-improvement rounds from a config (resumable)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.objective=dpo judge.mode=prob")
    p.set_defaults(func=_cmd_run)
