"""Ray Data stages: generate N images per prompt, then let the same model judge them.

Where it fits: the driver's generate and judge stages (`pipelines.rounds`) build `generate_dataset`
and `judge_dataset` once per round. Each is a `Dataset.map_batches` over a callable class holding the
model, in an actor pool (`compute=ActorPoolStrategy`), with CPUs / GPU fraction / actor count / batch
size from the config. With `judge.fused` (the default) one pool does both: it judges each batch with
the actor's own model copy (the same rows as the two pools). Rows cross stage boundaries as Parquet
in the run store, checked against `pipelines.schemas`: the actors write their own rows as part files
(a `stage_sink`; `write_rows` runs the Dataset and checks that every row landed exactly once), so
the driver never holds them; `generate_table` / `judge_table` collect the same rows on the driver
(tests, benchmarks).

Determinism: a sample's seed derives from (run seed, round, prompt id, sample index) only
(`sample_seed`), and `JanusUnified.generate_images` draws each sample from its own random stream, so
the output does not depend on batch size or on the number of actors; rows are written in a
canonical order (prompt_id, sample_index).

Example (local Ray, the tiny random model):
    >>> import ray; ray.init(num_cpus=2)
    >>> from pipelines.config import config_from_dict
    >>> cfg = config_from_dict({"model": {"path": "tiny"}, "generate": {"num_images": 2}})
    >>> rows = [{"prompt_id": "p1", "prompt": "a red circle", "category": "single"}]
    >>> samples = generate_table(rows, cfg, round_=1)
    >>> judged = judge_table(samples, cfg)
"""

from __future__ import annotations

import io
import os
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.config import Config
from pipelines.results import canonical
from pipelines.schemas import check_batch, check_table

STAGE_GENERATE, STAGE_JUDGE = "generate", "judge"


def sample_seed(run_seed: int, round_: int, prompt_id: str) -> int:
    """The prompt's seed in a round; sample n of it then uses derive_seed(this, n) (models/janus.py)."""
    from models.janus import derive_seed

    return derive_seed(run_seed, round_, "generate", prompt_id)


def _worker_setup(num_threads: Optional[int] = None) -> None:
    import torch

    torch.set_num_threads(num_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class GenerateUDF:
    """Holds one model; maps a batch of PromptRows to N SampleRows per prompt."""

    def __init__(self, model: dict, gen: dict, run_seed: int, round_: int, adapter: Optional[str] = None,
                 sink: Optional[dict] = None):
        from models.loading import load_model

        _worker_setup()
        self.m = load_model(model["path"], model["dtype"], model["device"], adapter=adapter, merge=True)
        self.gen, self.run_seed, self.round, self.sink = gen, run_seed, round_, sink

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return _emit(self.generate(batch)[0], self.sink)

    def generate(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, Any], list]:
        """(SampleRows columns, their PIL images in row order)."""
        check_batch(batch, "prompt", STAGE_GENERATE)
        ids, prompts, cats = list(batch["prompt_id"]), list(batch["prompt"]), list(batch["category"])
        seeds = [sample_seed(self.run_seed, self.round, pid) for pid in ids]
        g = self.gen
        per_cat = g.get("num_images_by_category") or {}
        groups: dict[int, list[int]] = {}  # one model call per distinct N (sample i of a prompt does not depend on N)
        for b, cat in enumerate(cats):
            groups.setdefault(per_cat.get(cat, g["num_images"]), []).append(b)
        parts, images = [], []
        for n, rows in groups.items():
            out = self.m.generate_images([prompts[b] for b in rows], num_images=n, seed=[seeds[b] for b in rows],
                                         cfg_weight=g["cfg_weight"], temperature=g["temperature"], top_k=g["top_k"])
            flat = [im for row in out.images for im in row]
            images += flat
            parts.append({
                "prompt_id": np.repeat(np.array([ids[b] for b in rows], dtype=object), n),
                "prompt": np.repeat(np.array([prompts[b] for b in rows], dtype=object), n),
                "category": np.repeat(np.array([cats[b] for b in rows], dtype=object), n),
                "round": np.full(len(rows) * n, self.round, dtype=np.int64),
                "sample_index": np.tile(np.arange(n, dtype=np.int64), len(rows)),
                "seed": out.seeds.reshape(-1).numpy().astype(np.int64),
                "image_tokens": out.tokens.reshape(len(rows) * n, -1).numpy().astype(np.int32),  # (B*N, T)
                "png": np.array([_png(im) for im in flat], dtype=object),
                "node_id": np.array([_node_id()] * (len(rows) * n), dtype=object),  # where it ran (cluster checks)
            })
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, images


def judge_batched(m, images: list, prompts: list[str], mode: str, batch_size: int) -> tuple[list, list, list]:
    """The model's own (score, valid, answer) lists on `images`, `batch_size` images per judge call."""
    score, valid, answer = [], [], []
    for lo in range(0, len(images), batch_size):
        v = m.judge(images[lo:lo + batch_size], prompts[lo:lo + batch_size], mode=mode)
        score += list(v.score)
        valid += list(v.valid)
        answer += list(v.answer)
    return score, valid, answer


def _add_verdicts(m, mode: str, rows: dict[str, Any], images: list, batch_size: int) -> dict[str, Any]:
    """SampleRows + the model's own verdicts on `images` (score / valid / answer / judge_mode / node)."""
    score, valid, answer = judge_batched(m, images, list(rows["prompt"]), mode, batch_size)
    out = dict(rows)
    out["score"] = np.array(score, dtype=np.float64)
    out["valid"] = np.array(valid, dtype=bool)
    out["answer"] = np.array(answer, dtype=object)
    out["judge_mode"] = np.array([mode] * len(images), dtype=object)
    out["judge_node_id"] = np.array([_node_id()] * len(images), dtype=object)
    return out


class GenerateJudgeUDF(GenerateUDF):
    """Generate, then judge with the same model copy (judge.fused): one actor pool, one model load,
    no PNG round trip; the rows equal GenerateUDF followed by JudgeUDF's."""

    def __init__(self, model: dict, gen: dict, run_seed: int, round_: int, adapter: Optional[str] = None,
                 mode: Optional[str] = None, judge_batch_size: int = 64, sink: Optional[dict] = None):
        super().__init__(model, gen, run_seed, round_, adapter, sink)
        self.mode, self.judge_batch_size = mode or self.m.default_judge_mode, judge_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows, images = self.generate(batch)
        return _emit(_add_verdicts(self.m, self.mode, rows, images, self.judge_batch_size), self.sink)


class JudgeUDF:
    """Holds the same model (the round's adapter); adds score / valid / answer to SampleRows."""

    def __init__(self, model: dict, mode: Optional[str], adapter: Optional[str] = None, sink: Optional[dict] = None):
        from models.loading import load_model

        _worker_setup()
        self.m = load_model(model["path"], model["dtype"], model["device"], adapter=adapter, merge=True)
        self.mode, self.sink = mode or self.m.default_judge_mode, sink

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        check_batch(batch, "sample", STAGE_JUDGE)
        images = [_unpng(b) for b in batch["png"]]
        return _emit(_add_verdicts(self.m, self.mode, batch, images, max(1, len(images))), self.sink)


def _model_args(cfg: Config) -> dict:
    return {"path": cfg.model.path, "dtype": cfg.model.dtype, "device": cfg.model.device}


def _to_frame(ds) -> pd.DataFrame:
    """Materialise a (small) Ray Dataset on the driver with image tokens as int lists."""
    df = ds.to_pandas()
    df["image_tokens"] = [np.asarray(t, dtype=np.int64).tolist() for t in df["image_tokens"]]
    return df


def expected_samples(prompts: Any, cfg: Config) -> int:
    """How many samples the generate stage draws for `prompts` (PromptRows or a `prompt_table`):
    generate.num_images, or generate.num_images_by_category[category]."""
    import pyarrow.compute as pc

    from pipelines.prompts import prompt_table

    g = cfg.generate
    counts = pc.value_counts(prompt_table(prompts)["category"]).to_pylist()
    return sum(g.num_images_by_category.get(c["values"], g.num_images) * c["counts"] for c in counts)


def prompt_dataset(prompts: Any):
    """A Ray Dataset of the prompts (PromptRows or a `prompt_table`), built from the Arrow table in
    as many blocks as Ray Data reads into by default (DataContext.read_op_min_num_blocks), so the
    actors share the work; no Python object per prompt on the driver."""
    import ray

    from pipelines.prompts import prompt_table

    table = prompt_table(prompts)
    size = max(1, -(-table.num_rows // ray.data.DataContext.get_current().read_op_min_num_blocks))
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, max(table.num_rows, 1), size)])


def generate_dataset(prompts: Any, cfg: Config, round_: int, adapter: Optional[str] = None,
                     judge: bool = False, sink: Optional[dict] = None):
    """The lazy Ray Dataset of SampleRows (JudgedRows with judge=True) for `prompts` (PromptRows or a
    `prompt_table`): nothing runs until it is consumed (`generate_table`). With a `sink` (`stage_sink`)
    the actors write their rows into the run store themselves and the Dataset yields only row counts
    (`write_rows(..., written=True)`)."""
    import ray

    from pipelines.prompts import prompt_table

    check_table(prompts, "prompt", STAGE_GENERATE)  # as given: a row without a category is a missing column
    prompts = prompt_table(prompts)
    g = cfg.generate
    gen = {"num_images": g.num_images, "cfg_weight": g.cfg_weight, "temperature": g.temperature, "top_k": g.top_k,
           "num_images_by_category": dict(g.num_images_by_category)}
    kwargs = {"model": _model_args(cfg), "gen": gen, "run_seed": cfg.run.seed, "round_": round_,
              "adapter": adapter, "sink": sink}
    if judge:
        kwargs.update(mode=cfg.judge.mode, judge_batch_size=cfg.judge.batch_size)
    return prompt_dataset(prompts).map_batches(
        GenerateJudgeUDF if judge else GenerateUDF, batch_size=g.batch_size, batch_format="numpy",
        fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        num_cpus=g.num_cpus_per_actor, num_gpus=g.num_gpus_per_actor or None,
    )


def judge_dataset(samples, cfg: Config, adapter: Optional[str] = None, sink: Optional[dict] = None):
    """The lazy Ray Dataset of JudgedRows for a Dataset of SampleRows (the judge actor pool); a `sink`
    as in `generate_dataset`."""
    import ray

    j = cfg.judge
    return samples.map_batches(
        JudgeUDF, batch_size=j.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": _model_args(cfg), "mode": j.mode, "adapter": adapter, "sink": sink},
        compute=ray.data.ActorPoolStrategy(size=j.num_actors),
        num_cpus=j.num_cpus_per_actor, num_gpus=j.num_gpus_per_actor or None,
    )


def generate_table(prompts: Any, cfg: Config, round_: int, adapter: Optional[str] = None,
                   judge: bool = False) -> pd.DataFrame:
    """SampleRows for `prompts` (PromptRows), collected on the driver: N per prompt
    (`generate.num_images`, or `generate.num_images_by_category[category]`), in canonical order.
    judge=True: JudgedRows, the same actors judging their own samples (GenerateJudgeUDF; the rows
    `judge_table` would give). The driver's stages write the same Dataset to storage instead (`write_rows`)."""
    df = canonical(_to_frame(generate_dataset(prompts, cfg, round_, adapter, judge)))
    check_table(df, "judged" if judge else "sample", STAGE_GENERATE)
    expected = expected_samples(prompts, cfg)
    if len(df) != expected:
        raise RuntimeError(f"stage 'generate': expected {expected} samples, got {len(df)}")
    return df


def judge_table(samples: pd.DataFrame, cfg: Config, adapter: Optional[str] = None) -> pd.DataFrame:
    """JudgedRows for SampleRows, in canonical order; invalid answers kept (valid=False, NaN score)."""
    import ray

    check_table(samples, "sample", STAGE_JUDGE)
    ds = judge_dataset(ray.data.from_arrow(pa.Table.from_pandas(samples, preserve_index=False)), cfg, adapter)
    df = canonical(_to_frame(ds))
    check_table(df, "judged", STAGE_JUDGE)
    if len(df) != len(samples):
        raise RuntimeError(f"stage 'judge': {len(samples)} samples in, {len(df)} judged rows out")
    return df


# ------------------------------------------------------------------ one model task
def model_task(cfg: Config, fn):
    """`fn` as a Ray remote function with the generation actors' resources (a GPU on a cluster): the
    model work that is one call rather than a stream of rows (reference log-probs, evaluation shards,
    the proposer's draws)."""
    import ray

    return ray.remote(num_cpus=1, num_gpus=cfg.generate.num_gpus_per_actor or None, max_retries=1)(fn)


def run_model_task(cfg: Config, fn, *args):
    """Run `fn(*args)` as one such Ray task and wait for it."""
    import ray

    return ray.get(model_task(cfg, fn).remote(*args))


# ------------------------------------------------------------------ rows straight to storage
def stage_sink(store, round_: int, stage: str, schema: str) -> dict:
    """Where the workers of a stage write its rows: `round_<k>/<stage>/data/` of the run store."""
    return {"fs": store.fs, "path": store.path(f"round_{int(round_)}", stage, "data"), "schema": schema}


def _emit(rows: Any, sink: Optional[dict]) -> Any:
    """A UDF's output: its rows, or with a sink the rows written (`write_part`) and their count."""
    return rows if sink is None else write_part(rows, sink)


def write_part(rows: Any, sink: dict) -> dict[str, np.ndarray]:
    """Write one batch of rows (numpy dict or DataFrame) as a Parquet part file of the stage dir, in
    the run store's row schema (tensor columns as list<int64>), and return {"rows": [count]}.

    The file is named by a hash of the batch's (prompt_id, sample_index) keys and written atomically:
    a retried task writes the same file again (replacing it), never a second copy."""
    import hashlib

    import pyarrow.parquet as pq

    from pipelines.schemas import arrow_schema
    from pipelines.store import atomic_write

    if isinstance(rows, pd.DataFrame):
        table = pa.Table.from_pandas(rows, preserve_index=False)
    else:
        table = pa.table({k: pa.array(list(np.asarray(v, dtype=np.int64))) if np.ndim(v) == 2 else pa.array(v)
                          for k, v in rows.items()})
    want = arrow_schema(sink["schema"])
    table = table.cast(pa.schema([want.field(f.name) if f.name in want.names else f for f in table.schema]))
    keys = "\n".join(f"{p}\t{i}" for p, i in sorted(zip(table["prompt_id"].to_pylist(),
                                                          table["sample_index"].to_pylist())))
    name = f"part-{hashlib.sha1(keys.encode()).hexdigest()[:20]}.parquet"
    fs = sink["fs"]
    atomic_write(fs, f"{sink['path']}/{name}", lambda target: pq.write_table(table, target, filesystem=fs))
    return {"rows": np.array([table.num_rows], dtype=np.int64)}


def write_rows(ds, store, round_: int, stage: str, expected: int, schema: str, ids: Any,
               written: bool = False, chunk: Optional[int] = None):
    """Run `ds` so that its rows land in `<stage>/data/` of the run store from the workers (Parquet
    part files; the driver never holds the rows): `written=True` when its UDFs write them themselves
    (a `sink`: no extra tasks or worker processes), else a map task per block writes them. Then check
    the schema, and that each of the `expected` rows of the prompts `ids` is there exactly once
    (`pipelines.chunks.check_once`: the key columns, `chunk` prompts at a time): a lost block, or
    rows written twice under different batchings, fail the stage (nothing is marked done; a rerun
    starts clean)."""
    from pipelines.chunks import CHUNK_PROMPTS, check_once
    from pipelines.results import StageRows

    sink = stage_sink(store, round_, stage, schema)
    path = sink["path"]
    if not written:
        ds = ds.map_batches(write_part, fn_kwargs={"sink": sink}, batch_format="pandas")
    ds.materialize()  # runs the stage; what stays in the object store is one count per batch
    rows = StageRows(int(round_), stage, expected)
    if expected == 0:
        return rows
    check_table(store.table_schema(round_, stage).empty_table(), schema, stage)
    n = check_once(store, round_, stage, ids, chunk or CHUNK_PROMPTS)
    if not n["total"] == n["seen"] == expected or n["duplicated"]:
        raise RuntimeError(f"stage {stage!r}: expected {expected} rows exactly once in {path}, found {n['total']} "
                           f"({n['duplicated']} duplicated, {n['total'] - n['seen']} of other prompts). On a "
                           "multi-node cluster run.root must be storage every node writes to (s3://, gs://, a "
                           "shared mount): a node-local dir keeps other nodes' rows.")
    return rows


def post_judge(batch: pd.DataFrame, grades: int, corrupt: str, seed: int, binary: bool) -> pd.DataFrame:
    """The judge stage's per-row work after the verdicts, run in the workers: graded scores
    (judge.grades) and the control arms (judge.corrupt: oracle / random / inverted; the score before
    corruption kept in `raw_score`). Every step is per row, so the batching does not matter."""
    from pipelines import pools as P

    df = P.grade_scores(batch, grades)  # grades=0: unchanged
    if corrupt == "none":
        return df
    raw = df["score"].copy()
    if corrupt == "oracle":  # a perfect judge (the upper bound)
        from pipelines.audit import OracleJudge

        df = P.oracle_scores(df, OracleJudge().verdicts([_unpng(b) for b in df["png"]], list(df["prompt"])))
    else:
        df = P.corrupt_scores(df, corrupt, seed=seed, binary=binary)
    df["raw_score"] = raw.values
    return df
