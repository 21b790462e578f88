"""The stages of a round, as the driver calls them: thin glue over the pure core and the Ray edge.

Where it fits: `pipelines/driver.py` reads as the list of stages; this module holds what the data
stages do (prompts, generate, judge, pool), `pipelines/improve.py` the model stages (train, evaluate,
audit, promote); improve imports from here, never the other way round. Every stage function
returns `(result, info)`: `result` is a DataFrame of rows or a typed result (`pipelines.results`),
`info` the small summary kept in the manifest. `Ctx.stage` runs a stage once (`run_stage`: resumed
from the store when it is done) with one console line (`progress`).

Example (round k's prompts are `round_prompts(ctx, k)`: a rotating slice plus the curriculum's replay):
    >>> ps = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "category": "c"} for i in range(5)]
    >>> [r["prompt_id"] for r in rotating_slice(ps, 2, 3)]
    ['p4', 'p0']
    >>> rows = curriculum(rotating_slice(ps, 2, 3), open_discards([([ps[1]], []), ([ps[2]], ["p1"])]), None)
    >>> [(r["prompt_id"], r["replayed"]) for r in rows.to_pylist()]
    [('p4', False), ('p0', False), ('p2', True)]
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines import pools as P
from pipelines import results, stages
from pipelines.chunks import chunk_frames, table_rows
from pipelines.config import Config, derive_seed
from pipelines.prompts import PROMPT_COLUMNS, load_prompts, prompt_table
from pipelines.store import RunStore

TABLES_KEY, RESULT_KEY = "tables", "result"
VALIDATION_SEED = 0  # which training prompts form the validation slice (eval.validation_prompts)


# ------------------------------------------------------------------ running and persisting stages
@dataclass
class Ctx:
    """What every stage of a run needs."""

    cfg: Config
    store: RunStore
    tracker: Any
    prompts: Any  # the training prompts: a `prompts.prompt_table` (the driver's), or PromptRows
    heldout: list[dict]
    validation: list[dict] = field(default_factory=list)  # eval.validation_prompts, never trained on
    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, k: int, name: str, compute: Callable[[], tuple[Any, dict]]) -> Any:
        """Run (or resume) one stage via `run_stage`, timed, with one console line."""
        t0 = time.perf_counter()
        resumed = self.store.is_done(k, name)

        def timed():
            result, info = compute()
            info["seconds"] = round(time.perf_counter() - t0, 3)
            return result, info

        result = run_stage(self.store, k, name, timed)
        info = self.store.stage_info(k, name)
        self.timings[f"time/{name}"] = info.get("seconds", 0.0)
        print(progress(k, name, info, resumed=resumed), flush=True)
        return result


def save_stage(store: RunStore, k: int, name: str, result: Any, info: dict) -> None:
    """Write a computed stage's tables (a `StageRows` result is already in storage) and mark it done."""
    tables, values = results.to_store(result)
    for key, df in tables.items():
        store.write_table(k, name, df, name=key)
    store.mark_done(k, name, {**info, TABLES_KEY: sorted(tables), RESULT_KEY: values})


def load_stage(store: RunStore, k: int, name: str) -> Any:
    info = store.stage_info(k, name)
    if results.RESULT_TYPES.get(name) is results.StageRows and not info.get(RESULT_KEY):
        return results.StageRows(k, name, int(info["rows"]))  # written before streaming: <stage>/data.parquet
    if name == "pool" and "counts" not in info.get(RESULT_KEY, {}):  # written before PoolRows: the driver's tables
        light = store.read_table(k, name, "data", columns=["category", "score", "valid"]).to_pandas()
        counts = {x: int(info.get(x, 0)) for x in ("accepted", "rejected", "uncertain", "pairs")}
        cpr = table_rows(store, k, name, "cpr") if "cpr" in info.get(TABLES_KEY, []) else 0
        counts.update(samples=len(light), sft=int(info.get("sft_rows", 0)), cpr=cpr)
        return results.PoolRows(k, counts, P.nonunified_score(light).to_metrics())
    tables = {t: store.read_table(k, name, t).to_pandas() for t in info.get(TABLES_KEY, [])}
    return results.from_store(name, tables, info.get(RESULT_KEY, {}))


def run_stage(store: RunStore, k: int, name: str, compute) -> Any:
    """The stored result when stage `name` of round k is done, else `compute()` -> (result, info),
    saved and marked done (a crash before that leaves no mark)."""
    if store.is_done(k, name):
        return load_stage(store, k, name)
    store.clear_stage(k, name)  # an earlier crashed attempt leaves nothing behind
    result, info = compute()
    save_stage(store, k, name, result, info)
    return result


def progress(k: int, stage: str, info: dict, resumed: bool = False) -> str:
    """One console line per stage."""
    keys = [x for x in ("drawn", "valid_rate", "rows", "prompts", "accepted", "rejected", "uncertain", "nonunified",
                        "replayed", "admitted", "sft_rows", "steps", "loss", "gen_accuracy", "gain_vs_base",
                        "und_accuracy", "val_accuracy", "decision", "best", "head") if info.get(x) is not None]
    shown = " ".join(f"{x}={info[x]:.3f}" if isinstance(info[x], float) else f"{x}={info[x]}" for x in keys)
    return f"[round {k}] {stage:<9} {'resumed' if resumed else 'done':<7} {info.get('seconds', 0):7.1f}s  {shown}"


# ------------------------------------------------------------------ prompts and adapters
def load_prompt_sets(cfg: Config, store: RunStore) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out evaluation prompts); bad rows are counted into the run dir."""
    train_rows, heldout, report = read_prompt_sets(cfg)
    write_prompt_report(store, report)
    return train_rows, heldout


def split_validation(train_rows: Any, n: int) -> tuple[Any, list[dict]]:
    """(training prompts, validation slice): `n` prompts chosen by `evaluate.select_prompts` with a
    fixed seed leave the training set (the same slice whatever run.seed or file order, so recipe
    comparisons share it). `train_rows`: PromptRows or a `prompt_table` (the same kind back; the
    slice is PromptRows in id order)."""
    from pipelines.evaluate import select_ids

    if not n:
        return train_rows, []
    if n >= len(train_rows):
        raise ValueError(f"eval.validation_prompts={n} leaves no training prompts (there are {len(train_rows)})")
    if isinstance(train_rows, pa.Table):
        val_ids = select_ids(train_rows["prompt_id"].to_pylist(), n, seed=VALIDATION_SEED)
        mask = pc.is_in(train_rows["prompt_id"], value_set=pa.array(sorted(val_ids), type=pa.string()))
        val = sorted(train_rows.filter(mask).to_pylist(), key=lambda r: str(r["prompt_id"]))
        return train_rows.filter(pc.invert(mask)), val
    val_ids = select_ids([r["prompt_id"] for r in train_rows], n, seed=VALIDATION_SEED)
    val = sorted((r for r in train_rows if r["prompt_id"] in val_ids), key=lambda r: str(r["prompt_id"]))
    return [r for r in train_rows if r["prompt_id"] not in val_ids], val


def write_prompt_report(store: RunStore, report: dict) -> None:
    import json

    store.write_bytes("prompts_report.json", json.dumps(report, indent=1).encode())


def read_prompt_sets(cfg: Config, as_table: bool = False) -> tuple[Any, list[dict], dict]:
    """(training prompts, held-out prompts, the report of skipped rows), writing nothing: the driver
    checks the prompts before it creates the run dir, so a bad prompt file blocks nothing. The
    training prompts as PromptRows, or with `as_table` a `prompt_table` (the driver's form)."""
    p = cfg.prompts
    train_rows, report = load_prompts(p.source, split=p.split, limit=p.limit, max_tokens=p.max_prompt_tokens,
                                      extra_sources=p.extra_sources, as_table=as_table)
    heldout, _ = load_prompts(p.source, split="heldout", limit=cfg.eval.num_prompts)
    if not len(train_rows):
        raise ValueError(f"prompts.source={p.source!r} gave no usable training prompts ({report.as_dict()})")
    if not heldout:
        raise ValueError(f"prompts.source={p.source!r} has no held-out prompts (a `split` column with "
                         "'heldout' rows) to evaluate on")
    have = set(pc.unique(prompt_table(train_rows)["category"]).to_pylist())
    for key, named in (("prompts.category_mix", p.category_mix), ("generate.num_images_by_category",
                                                                   cfg.generate.num_images_by_category)):
        missing = sorted(set(named) - have)
        if missing:
            raise ValueError(f"{key} names categories no training prompt has: {missing} (have: {sorted(have)})")
    if cfg.audit.backend == "oracle":  # a prompt file is fine when it speaks the shapes grammar
        from shapes.world import parse_prompt

        for row in heldout:
            try:
                parse_prompt(row["prompt"])
            except ValueError:
                raise ValueError(f"audit.backend=oracle judges shapes-world prompts only, but held-out prompt "
                                 f"{row['prompt']!r} of prompts.source={p.source!r} is not one; "
                                 "use audit.backend=vlm for other prompts") from None
    if p.shuffle:  # sources are often sorted (the shapes world is grouped by category): mix the rounds
        import random

        order = list(range(len(train_rows)))  # shuffling positions = shuffling the rows (same swaps)
        random.Random(cfg.run.seed).shuffle(order)
        train_rows = _take(train_rows, np.asarray(order, dtype=np.int64))
    return train_rows, heldout, report.as_dict()


def round_prompts(ctx: Ctx, k: int, proposed: Sequence[dict] = ()) -> pa.Table:
    """Round k's prompts (a `prompt_table` with `replayed`): the model's own `proposed` prompts (the
    propose stage), then a rotating slice of the training prompts up to prompts.per_round, plus
    (curriculum, Algorithm 2) earlier rounds' discard-pool prompts not admitted since, replayed with
    the current model."""
    cfg, prompts = ctx.cfg, prompt_table(ctx.prompts)
    n = cfg.prompts.per_round or len(prompts)
    chosen = (mixed_slice(prompts, cfg.prompts.category_mix, n, k) if cfg.prompts.category_mix
              else rotating_slice(prompts, n, k)).select(list(PROMPT_COLUMNS))
    if proposed:
        own = prompt_table(proposed).select(list(PROMPT_COLUMNS))
        rest = chosen.filter(pc.invert(pc.is_in(chosen["prompt_id"], value_set=own["prompt_id"].combine_chunks())))
        chosen = pa.concat_tables([own, rest.slice(0, max(0, n - len(own)))])
    c = cfg.curriculum
    replay = c.enabled and k >= c.start_round
    return curriculum(chosen, open_discards(pool_history(ctx.store, k)) if replay else [], c.max_replay)


def curriculum(chosen: Any, discarded: list[dict], max_replay: Optional[int]) -> pa.Table:
    """The round's prompts as a `prompt_table`: `chosen` (replayed=False), then the open `discarded`
    prompts not already chosen, at most `max_replay` of them (replayed=True; None = all).

    >>> rows = curriculum([{"prompt_id": "a", "prompt": "x", "category": "c"}],
    ...                   [{"prompt_id": "a", "prompt": "x", "category": "c"},
    ...                    {"prompt_id": "b", "prompt": "y", "category": "c", "score": 0.1}], None).to_pylist()
    >>> [(r["prompt_id"], r["replayed"]) for r in rows], sorted(rows[1])
    ([('a', False), ('b', True)], ['category', 'prompt', 'prompt_id', 'replayed'])
    """
    chosen = prompt_table(chosen).select(list(PROMPT_COLUMNS))
    extra = prompt_table(discarded).select(list(PROMPT_COLUMNS))
    extra = extra.filter(pc.invert(pc.is_in(extra["prompt_id"], value_set=chosen["prompt_id"].combine_chunks())))
    extra = extra.slice(0, max_replay) if max_replay is not None else extra
    flag = lambda t, v: t.append_column("replayed", pa.array([v] * len(t), type=pa.bool_()))  # noqa: E731
    return pa.concat_tables([flag(chosen, False), flag(extra, True)])


def _rotation(size: int, n: int, k: int) -> np.ndarray:
    """Positions of round k's n items of `size`: the k-th consecutive run, wrapping around."""
    return (((k - 1) * n) % size + np.arange(min(n, size))) % size


def _take(prompts: Any, idx: np.ndarray) -> Any:
    """The rows at `idx` of a `prompt_table` or a list of PromptRows (the same kind back)."""
    return prompts.take(pa.array(idx, type=pa.int64())) if isinstance(prompts, pa.Table) else [prompts[i] for i in idx]


def rotating_slice(prompts: Any, n: int, k: int) -> Any:
    """Round k's n prompts: the k-th consecutive slice, wrapping around (no repeats within a round).
    `prompts`: a list of PromptRows or a `prompt_table` (the same kind back)."""
    return _take(prompts, _rotation(len(prompts), n, k))


def mixed_slice(prompts: Any, mix: dict[str, float], n: int, k: int) -> Any:
    """Round k's n prompts composed by category shares (`prompts.category_mix`): each category's count
    by largest remainder, each taken as a rotating slice of that category's own prompts (a list of
    PromptRows or a `prompt_table`, the same kind back).

    >>> ps = [{"prompt_id": f"{c}{i}", "category": c} for c in "ab" for i in range(4)]
    >>> ([p["prompt_id"] for p in mixed_slice(ps, {"a": 3, "b": 1}, 4, 1)],
    ...  [p["prompt_id"] for p in mixed_slice(ps, {"a": 3, "b": 1}, 4, 2)])
    (['a0', 'a1', 'a2', 'b0'], ['a3', 'a0', 'a1', 'b1'])
    """
    shares = {c: w for c, w in mix.items() if w > 0}
    total = sum(shares.values())
    exact = {c: n * w / total for c, w in shares.items()}
    counts = {c: int(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: counts[c] - exact[c])[: n - sum(counts.values())]:
        counts[c] += 1
    if isinstance(prompts, pa.Table):
        cats = prompts["category"].to_numpy(zero_copy_only=False)
    else:
        cats = np.array([p["category"] for p in prompts], dtype=object)
    out = [np.zeros(0, dtype=np.int64)]
    for c, m in counts.items():
        own = np.flatnonzero(cats == c)
        if len(own) and m:
            out.append(own[_rotation(len(own), m, k)])
    return _take(prompts, np.concatenate(out))


def pool_history(store: RunStore, k: int) -> list[tuple[list[dict], list[str]]]:
    """(discard-pool rows, accepted prompt ids) of each finished pool stage of rounds 1..k-1, in order."""
    return [(store.read_table(j, "pool", "discard").sort_by("prompt_id").to_pylist(), accepted_ids(store, j))
            for j in range(1, k) if store.is_done(j, "pool")]


def accepted_ids(store: RunStore, j: int) -> list[str]:
    """Round j's prompts with an accepted sample: the pool stage's `accepted` table (run dirs written
    before the pool stage wrote chunks keep them in the manifest)."""
    legacy = store.stage_info(j, "pool")[RESULT_KEY].get("accepted_prompt_ids")
    if legacy is not None:
        return legacy
    return sorted(store.read_table(j, "pool", "accepted").column("prompt_id").to_pylist())


def open_discards(history: list[tuple[list[dict], list[str]]]) -> list[dict]:
    """Prompts discarded in some earlier round and not accepted in any round after it (first-seen
    order; a prompt discarded again after an acceptance is open again).

    >>> d = lambda *ids: [{"prompt_id": i} for i in ids]
    >>> [r["prompt_id"] for r in open_discards([(d("a", "b"), []), (d("c"), ["a"]), (d("a"), ["c"])])]
    ['b', 'a']
    """
    open_: dict[str, dict] = {}
    for discarded, accepted in history:
        for row in discarded:
            open_.setdefault(row["prompt_id"], row)
        for pid in accepted:
            open_.pop(pid, None)
    return list(open_.values())


def adapter_path(store: RunStore, k: int) -> Optional[str]:
    """Round k's adapter as every node can reach it: a local path, or the run store's URI (fetched
    and verified where it is loaded, models.lora.fetch_adapter). None for round 0 = the base model."""
    if not k:
        return None
    if isinstance(store.fs, pafs.LocalFileSystem):
        return store.adapter_dir(k)
    return store.uri.rstrip("/") + f"/adapters/round_{k}"


# ------------------------------------------------------------------ generate / judge / pool
def generate(ctx: Ctx, prompts: Any, k: int, adapter: Optional[str]):
    """SampleRows (with judge.fused already judged by the generating actors: JudgedRows), written by
    the actors straight into the run store; the driver gets a `StageRows` handle. `prompts`: the
    round's `prompt_table` (or PromptRows)."""
    cfg, prompts = ctx.cfg, prompt_table(prompts)
    fused = cfg.judge.fused
    schema = "judged" if fused else "sample"
    ds = stages.generate_dataset(prompts, cfg, round_=k, adapter=adapter, judge=fused,
                                 sink=stages.stage_sink(ctx.store, k, "generate", schema))  # actors write
    rows = stages.write_rows(ds, ctx.store, k, "generate", stages.expected_samples(prompts, cfg), schema,
                             prompts["prompt_id"], written=True, chunk=cfg.pools.chunk_prompts)
    return rows, {"prompts": len(prompts), "rows": rows.rows, "adapter_round": adapter and os.path.basename(adapter),
                  "fused": fused}


def judge(ctx: Ctx, samples: results.StageRows, k: int, adapter: Optional[str], prompts: Any):
    """The own judge's verdicts (a judge pool, or the generate stage's when fused), graded (judge.grades),
    control arms, Nonunified: workers read the samples and write the judged rows to the run store."""
    cfg, store = ctx.cfg, ctx.store
    ids, chunk = prompt_table(prompts)["prompt_id"], cfg.pools.chunk_prompts
    fused = "score" in store.table_schema(samples.round, samples.stage).names  # judged in the generate stage
    j = cfg.judge
    if fused and not j.grades and j.corrupt == "none":
        out = samples  # the generating actors' verdicts are the stage's rows: nothing to copy
    else:
        ds = samples.dataset(store)
        post = j.grades or j.corrupt != "none"
        if not fused:  # the judge actors write their rows unless post-processing follows
            sink = None if post else stages.stage_sink(store, k, "judge", "judged")
            ds = stages.judge_dataset(ds, cfg, adapter, sink=sink)
        if post:
            kw = {"grades": j.grades, "corrupt": j.corrupt, "seed": derive_seed(cfg.run.seed, k, "corrupt"),
                  "binary": j.mode == "binary" or j.grades == 1}
            ds = ds.map_batches(stages.post_judge, fn_kwargs=kw, batch_format="pandas")
        out = stages.write_rows(ds, store, k, "judge", samples.rows, "judged", ids, written=not post,
                                chunk=chunk)
    counts = None  # the Nonunified counts, a range of prompts at a time
    for light in chunk_frames(store, out.round, out.stage, ids, chunk, ["prompt_id", "category", "score", "valid"]):
        counts = P.add_counts(counts, P.nonunified_counts(light))
    ns = P.nonunified_from_counts(counts)
    return out, {"rows": out.rows, "fused": fused, "invalid": ns.invalid, "nonunified": ns.overall.rate,
                 "corrupt": j.corrupt}


def pool(ctx: Ctx, k: int, judged: results.StageRows, prompts: Any) -> tuple[results.PoolRows, dict]:
    """Pools, human labels (if `labels/round_<k>.csv|parquet` exists), training sets, review export:
    `pipelines.pooling`, a range of prompts at a time (the judged rows' PNGs stay in storage)."""
    from pipelines.pooling import pool_stage

    return pool_stage(ctx.store, ctx.cfg, k, judged, prompts, ctx.cfg.pools.chunk_prompts)
