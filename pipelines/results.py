"""Typed stage results: what each stage of a round hands the next, and how it is stored.

Where it fits: the driver's stages (`pipelines.rounds`, `pipelines.improve`) return `(result, info)`.
The generate and judge stages' result is a `StageRows` handle on rows their Ray workers wrote to
the run store; the later stages return one of the small dataclasses below (the audit's is
`pipelines.audit.AuditDecision`). `to_store` / `from_store`
turn a result into the run store's form and back: fields marked `table()` become Parquet tables of the
stage, every other field must be JSON-able and is kept in the manifest under `info["result"]`, so a
resumed run sees the same values as an uninterrupted one. Run dirs written when the results were
plain dicts load unchanged (the field names are the dicts' keys).

Example:
    >>> import pandas as pd
    >>> tables, values = to_store(Trained(adapter_round=3, metrics={"train/loss": 0.5}))
    >>> tables, values
    ({}, {'adapter_round': 3, 'metrics': {'train/loss': 0.5}})
    >>> from_store("train", tables, values)
    Trained(adapter_round=3, metrics={'train/loss': 0.5})
    >>> from_store("judge", {}, to_store(StageRows(round=2, stage="generate", rows=1600))[1])
    StageRows(round=2, stage='generate', rows=1600)
    >>> df = pd.DataFrame({"x": [1]})
    >>> sorted(to_store(df)[0]), from_store("rows", {"data": df}, {}) is df
    (['data'], True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd

from pipelines.audit import AuditDecision


def table(optional: bool = False) -> Any:
    """A DataFrame field: stored as `<stage>/<name>.parquet`; optional ones may be None (no table)."""
    return field(default=None, metadata={"table": True}) if optional else field(metadata={"table": True})


ORDER = ("prompt_id", "sample_index")  # the canonical row order of a stage's rows


def canonical(df: pd.DataFrame, order: tuple[str, ...] = ORDER) -> pd.DataFrame:
    """`df` stably sorted by the columns of `order` it has (unchanged if none)."""
    keys = [c for c in order if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys else df


@dataclass
class StageRows:
    """The generate and judge stages' result: rows that the stage's Ray workers wrote straight into
    the run store (`<stage>/data/`, Parquet part files), so the driver holds this handle, never the rows.
    `stage` names where they live: a fused judge stage with nothing to add keeps the generate stage's.
    Run dirs written before streaming (`<stage>/data.parquet`, written by the driver) read the same."""

    round: int
    stage: str
    rows: int

    def frame(self, store: Any, columns: Optional[list[str]] = None, images: bool = False) -> pd.DataFrame:
        """The rows on the driver, in canonical order (prompt_id, sample_index): `columns`, else all but
        the PNG bytes (unless `images`), which stay in storage (`pngs` fetches a few)."""
        if columns is None:
            columns = [n for n in store.table_schema(self.round, self.stage).names if images or n != "png"]
        return canonical(store.read_table(self.round, self.stage, columns=columns).to_pandas())

    def pngs(self, store: Any, rows: pd.DataFrame) -> list[bytes]:
        """The PNG bytes of `rows` (keyed by prompt_id, sample_index), read for those prompts only."""
        if rows.empty:
            return []
        ids = sorted(set(rows["prompt_id"]))
        found = store.read_table(self.round, self.stage, columns=["prompt_id", "sample_index", "png"],
                                 filters=[("prompt_id", "in", ids)]).to_pandas()
        keyed = {(p, int(i)): b for p, i, b in zip(found["prompt_id"], found["sample_index"], found["png"])}
        return [keyed[(p, int(i))] for p, i in zip(rows["prompt_id"], rows["sample_index"])]

    def dataset(self, store: Any):
        """The rows as a lazy Ray Dataset read by the workers (nothing passes through the driver)."""
        import ray

        return ray.data.read_parquet(store.table_path(self.round, self.stage), filesystem=store.fs)


@dataclass
class PoolRows:
    """The pool stage (`pipelines.pooling`): its tables were written chunk by chunk into the run
    store (`pool/<name>/`: data = judged rows + pool and label_source, sft, pairs, discard,
    accepted = prompt ids, cpr when cpr.* asks for rows), so the driver holds this handle, the counts
    and the own judge's Nonunified metrics. Run dirs whose pool tables the driver wrote read the same."""

    round: int
    counts: dict[str, int] = field(default_factory=dict)  # accepted/rejected/uncertain samples, sft, pairs, cpr
    nonunified: dict[str, float] = field(default_factory=dict)  # pools.NonunifiedScore.to_metrics()

    def table(self, store: Any, name: str, columns: Optional[list[str]] = None) -> pd.DataFrame:
        """Table `name`, all of it, in the order the pool stage built it (a prompt's pairs keep their
        order: they are in one part file)."""
        df = store.read_table(self.round, "pool", name, columns=columns).to_pandas()
        return canonical(df, {"cpr": ("kind", "prompt_id", "sample_index"), "pairs": ("prompt_id",)}.get(name, ORDER))


@dataclass
class Trained:
    """The train stage: the round's adapter (None when there was nothing to train on) and its metrics."""

    adapter_round: Optional[int]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluated:
    """The evaluate stage: held-out metrics (and paired gains) of the model of `model_round`."""

    metrics: dict[str, float]
    model_round: Optional[int]  # the adapter round evaluated (0 / None = the base model)
    samples: pd.DataFrame = table()  # held-out generations + understanding pairs, with verdicts
    pairs: pd.DataFrame = table()  # the (image, prompt) understanding pairs
    validation: Optional[pd.DataFrame] = table(optional=True)  # eval.validation_prompts rows, if any


@dataclass
class Promoted:
    """The promote stage: the pointers after the round."""

    best: Optional[int]
    head: Optional[int]


@dataclass
class RoundRecord:
    """One round as the driver keeps it for the report and the tracker."""

    round: int
    start: Optional[int]  # the round whose model this one improved (None for round 0)
    decision: AuditDecision
    metrics: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.round, "start": self.start, "decision": self.decision.as_dict(),
                "metrics": self.metrics}


RESULT_TYPES: dict[str, type] = {"generate": StageRows, "judge": StageRows, "pool": PoolRows, "train": Trained,
                                 "evaluate": Evaluated, "audit": AuditDecision,
                                 "promote": Promoted}


def to_store(result: Any) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """(tables, JSON-able values) of a stage result: a DataFrame, a result dataclass, or None."""
    if isinstance(result, pd.DataFrame):
        return {"data": result}, {}
    if result is None:
        return {}, {}
    if not dataclasses.is_dataclass(result):
        raise TypeError(f"a stage result is a DataFrame or a result dataclass, not {type(result).__name__}")
    tables, values = {}, {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if f.metadata.get("table"):
            if value is not None:
                tables[f.name] = value
        else:
            values[f.name] = value
    return tables, values


def from_store(stage: str, tables: dict[str, pd.DataFrame], values: dict[str, Any]) -> Any:
    """The stage's result back from its tables and values (the inverse of `to_store`)."""
    cls = RESULT_TYPES.get(stage)
    if cls is None:
        if list(tables) == ["data"] and not values:
            return tables["data"]
        raise ValueError(f"stage {stage!r} has no result type (known: {sorted(RESULT_TYPES)})")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**values, **tables}.items() if k in names})
