"""The pool stage, a range of prompts at a time: pools, human labels, training sets, review export.

Where it fits: after the judge stage (`pipelines.rounds.pool` calls `pool_stage`). The judged rows
(without their PNGs) come to the driver in chunks of `pipelines.chunks.CHUNK_PROMPTS` prompts; each
chunk is pooled (`pools.assign_pools`, reviewers' labels), turned into its SFT rows, DPO pairs,
discard-pool prompts and accepted prompt ids -- all per-prompt work -- and written as part files of
`round_<k>/pool/<table>/`. The driver keeps counts, the Nonunified counts and at most
`pools.review_sample` review candidates, so it never holds more than one chunk of rows, and the tables
equal what pooling all rows at once gives (chunks are contiguous in prompt order).

Two opt-in steps need the whole round: `pools.category_cap` (the SFT set; a cap is a share of the
total) and the CPR rows (`cpr.*`, sized by the training set, drawn from all pooled rows). A Ray task
(`whole_round`) reads those tables whole and writes the result; the driver gets counts back.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines import pools as P
from pipelines.chunks import CHUNK_PROMPTS, PartWriter, chunk_frames
from pipelines.config import Config, derive_seed
from pipelines.prompts import prompt_table
from pipelines.results import PoolRows, StageRows

TABLES = {"data": None, "sft": P.SFT_COLUMNS, "pairs": P.PAIR_COLUMNS,
          "discard": ["prompt_id", "prompt", "category", "num_samples", "best_score"], "accepted": ["prompt_id"]}


def round_labels(store: Any, k: int) -> pd.DataFrame:
    """Reviewers' labels of round k (`labels/round_<k>.csv|parquet` in the run store), or none."""
    from pipelines.review import import_labels

    for ext in ("csv", "parquet"):  # import_labels resolves local paths and URIs alike
        if store.fs.get_file_info(store.path("labels", f"round_{k}.{ext}")).type == pafs.FileType.File:
            return import_labels(f"{store.uri}/labels/round_{k}.{ext}")
    return pd.DataFrame(columns=["prompt_id", "sample_index", "label"])


def pool_stage(store: Any, cfg: Config, k: int, judged: StageRows, prompts: Any,
               size: int = CHUNK_PROMPTS) -> tuple[PoolRows, dict]:
    """Pool round k's judged rows chunk by chunk (module doc); returns the handle and the stage info.
    `prompts`: the round's `prompt_table` (or PromptRows)."""
    from pipelines.review import LabelError, ReviewDraw, apply_labels, write_review

    prompts = prompt_table(prompts)
    ids = prompts["prompt_id"].combine_chunks()
    labels = round_labels(store, k)
    label_ids = labels["prompt_id"].astype(str)
    known = pc.is_in(pa.array(label_ids.tolist(), type=pa.string()), value_set=ids).to_numpy(zero_copy_only=False)
    stray = sorted(set(label_ids[~known]))
    if stray:
        raise LabelError(f"labels for samples not in this pool: {stray[:5]}{' ...' if len(stray) > 5 else ''}")
    columns = [c for c in store.table_schema(judged.round, judged.stage).names if c != "png"]
    pooled_columns = columns + ["pool", "label_source"]
    writers = {name: PartWriter(store, k, "pool", name, pd.DataFrame(columns=cols or pooled_columns))
               for name, cols in TABLES.items()}
    replayed = (set(prompts.filter(pc.fill_null(prompts["replayed"], False))["prompt_id"].to_pylist())
                if "replayed" in prompts.column_names else set())  # the curriculum's replayed prompts
    pools: dict[str, int] = {}
    nonunified = uncertain = None
    admitted = 0
    c = cfg.pools
    for rows in chunk_frames(store, judged.round, judged.stage, ids, size, columns=columns):
        pooled = P.assign_pools(rows, c.accept_threshold, c.reject_threshold)
        ids_in = (label_ids >= rows["prompt_id"].min()) & (label_ids <= rows["prompt_id"].max())
        mine = labels[ids_in] if len(rows) else labels[:0]
        if len(mine):
            pooled = apply_labels(pooled, mine)
        accepted = sorted(set(pooled.loc[pooled["pool"] == "accepted", "prompt_id"]))
        writers["data"].write(pooled)
        writers["sft"].write(P.sft_set(pooled, c.sft_select, c.best_of_n_keep_above))
        writers["pairs"].write(P.dpo_pairs(pooled, cfg.pairs.strategy, cfg.pairs.margin,
                                           cfg.pairs.max_pairs_per_prompt, seed=derive_seed(cfg.run.seed, k, "pairs")))
        writers["discard"].write(P.discard_pool(pooled))
        writers["accepted"].write(pd.DataFrame({"prompt_id": accepted}))
        for name, n in pooled["pool"].value_counts().items():
            pools[name] = pools.get(name, 0) + int(n)
        nonunified = P.add_counts(nonunified, P.nonunified_counts(pooled))
        uncertain = P.add_counts(uncertain, pooled.loc[pooled["pool"] == "uncertain", "category"].value_counts())
        admitted += len(replayed & set(accepted))
    sizes = {name: w.close() for name, w in writers.items()}
    cpr_kinds: dict[str, int] = {}
    if c.category_cap is not None or cfg.cpr.enabled():  # they need the whole round: a Ray task reads it
        import ray

        task = ray.remote(num_cpus=1, max_retries=0)(whole_round)  # no retry: it rewrites the table it reads
        sizes["sft"], cpr_kinds = ray.get(task.remote(store, cfg, k, sizes["sft"], sizes["pairs"]))
    info = {"accepted": pools.get("accepted", 0), "rejected": pools.get("rejected", 0),
            "uncertain": pools.get("uncertain", 0), "discarded_prompts": sizes["discard"], "pairs": sizes["pairs"],
            "replayed": len(replayed), "admitted": admitted, "sft_rows": sizes["sft"]}
    if c.review_sample and info["uncertain"]:
        draw = ReviewDraw(c.review_sample, c.review_seed, uncertain)
        for rows in chunk_frames(store, k, "pool", ids, size, filters=[("pool", "==", "uncertain")]):
            draw.add(rows)
        write_review(draw.rows(pd.DataFrame(columns=columns)), os.path.join(store.uri, f"round_{k}", "review"),
                     images=lambda rows: judged.pngs(store, rows))
    counts = {"samples": sum(pools.values()), **{x: info[x] for x in ("accepted", "rejected", "uncertain", "pairs")},
              "sft": info["sft_rows"]}
    if cfg.cpr.enabled():
        counts["cpr"] = sum(cpr_kinds.values())
        info.update({f"cpr_{kind}": n for kind, n in cpr_kinds.items()})
    metrics = P.nonunified_from_counts(nonunified).to_metrics()
    return PoolRows(k, counts, metrics), info


def whole_round(store: Any, cfg: Config, k: int, sft_rows: int, pairs: int) -> tuple[int, dict[str, int]]:
    """The pool stage's two opt-in steps that need the whole round, where this runs (`pool_stage`: a
    Ray task): `pools.category_cap` (a share of the whole SFT set: read it, cap it, write it back) and
    UniCorn's caption / judgement / reflection rows (`cpr.*`, sized by the round's image rows and
    drawn from all its pooled rows). Returns (SFT rows after the cap, CPR rows per kind)."""
    c = cfg.pools
    if c.category_cap is not None:
        sft = PoolRows(k).table(store, "sft").assign(pool="accepted")  # every SFT row is an accepted sample
        sft_rows = _rewrite(store, k, "sft", P.cap_categories(sft, c.category_cap)[P.SFT_COLUMNS])
    kinds: dict[str, int] = {}
    if cfg.cpr.enabled():
        from pipelines.cpr import cpr_rows

        n = sft_rows if cfg.train.objective == "sft" else pairs
        cpr = cpr_rows(PoolRows(k).table(store, "data"), n, cfg.cpr, derive_seed(cfg.run.seed, k, "cpr"))
        _rewrite(store, k, "cpr", cpr)
        kinds = {str(kind): int(n) for kind, n in cpr["kind"].value_counts().items()}
    return sft_rows, kinds


def _rewrite(store: Any, k: int, name: str, df: pd.DataFrame) -> int:
    writer = PartWriter(store, k, "pool", name, df)
    writer.write(df)
    return writer.close()
