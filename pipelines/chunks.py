"""A stage's rows in bounded chunks: what the driver reads of the run store, a range of prompts at a time.

Where it fits: the generate and judge workers write their rows straight to the run store
(`pipelines.stages.write_rows`); what the driver still does with them -- the exactly-once check, the
Nonunified counts, the pool stage (`pipelines.pooling`) -- goes through `chunk_frames`, which reads
the rows of at most `size` prompts at a time (a Parquet range filter on prompt_id over the stage's part
files). So the driver holds at most `size` x samples-per-prompt rows of a stage, whatever the round's
size (the prompt ids themselves, one per prompt, are a column of the round's prompt table on the driver).
A pass reads the table's Parquet footers once (`part_ranges`: each part file's prompt_id range), so
a chunk opens only the files that can hold its prompts (the workers write contiguous prompts per file).
`PartWriter` writes a table chunk by chunk as the part files of `<stage>/<name>/`.

Chunks are contiguous ranges of the sorted prompt ids, each read back sorted by (prompt_id,
sample_index): their concatenation is the stage's rows in canonical order, so per-prompt work done
chunk by chunk gives what the same work on all rows gives.

Example:
    >>> id_ranges(["p3", "p1", "p2", "p1", "p0"], 2)
    [('p0', 'p1'), ('p2', 'p3')]
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterable, Iterator, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.results import ORDER, canonical

CHUNK_PROMPTS = 2048  # prompts per chunk: x 8 samples, ~16k rows without PNGs on the driver at most


def id_ranges(ids: Iterable[str] | pa.Array | pa.ChunkedArray, size: int) -> list[tuple[str, str]]:
    """The sorted distinct ids (strings, or an Arrow column of a prompt table) cut into runs of
    `size`: (first, last) of each run. Sorted in Arrow (UTF-8 byte order = Python's str order)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array([str(i) for i in ids], type=pa.string())
    ordered = pc.unique(ids.cast(pa.string()))
    ordered = ordered.take(pc.sort_indices(ordered))
    n = len(ordered)
    return [(ordered[i].as_py(), ordered[min(i + size, n) - 1].as_py()) for i in range(0, n, size)]


Part = tuple[str, Optional[str], Optional[str]]  # (file, lowest prompt_id, highest prompt_id)


def part_ranges(store: Any, round_: int, stage: str, name: str = "data") -> list[Part]:
    """(file, lowest prompt_id, highest prompt_id) of each non-empty part file of a table, from the
    Parquet footers' statistics ((file, None, None) when a file has none: always read). Read once per
    pass over a table, so a chunk reads only the files that can hold its prompts: the workers write
    a batch of contiguous prompts per file, so a chunk touches a few of the table's files, not all."""
    out = []
    for frag in pq.ParquetDataset(store.table_path(round_, stage, name), filesystem=store.fs).fragments:
        md = frag.metadata
        if not md.num_rows:
            continue
        lo = hi = None
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            cols = [rg.column(c) for c in range(rg.num_columns)]
            st = next((c.statistics for c in cols if c.path_in_schema == "prompt_id"), None)
            if st is None or not st.has_min_max:
                lo = hi = None
                break
            lo, hi = (st.min, st.max) if lo is None else (min(lo, st.min), max(hi, st.max))
        out.append((frag.path, lo, hi))
    return out


def read_range(store: Any, round_: int, stage: str, lo: str, hi: str, columns: Optional[list[str]] = None,
               name: str = "data", filters: Optional[list] = None,
               parts: Optional[list[Part]] = None) -> pd.DataFrame:
    """The rows of table `name` whose prompt_id is in [lo, hi] (plus `filters`), sorted canonically;
    with `parts` (`part_ranges`) only the files whose prompt range meets [lo, hi] are opened."""
    where = [("prompt_id", ">=", lo), ("prompt_id", "<=", hi)] + list(filters or [])
    files = None if parts is None else [f for f, a, b in parts if a is None or (a <= hi and b >= lo)]
    if files == []:  # no file holds these prompts
        empty = store.table_schema(round_, stage, name).empty_table()
        return canonical((empty.select(columns) if columns else empty).to_pandas())
    return canonical(store.read_table(round_, stage, name, columns=columns, filters=where, files=files).to_pandas())


def chunk_frames(store: Any, round_: int, stage: str, ids: Iterable[str], size: int = CHUNK_PROMPTS,
                 columns: Optional[list[str]] = None, name: str = "data",
                 filters: Optional[list] = None) -> Iterator[pd.DataFrame]:
    """Table `name` of a stage, `size` prompts at a time, in canonical order (see the module doc)."""
    ranges = id_ranges(ids, size)
    parts = part_ranges(store, round_, stage, name) if ranges else None
    for lo, hi in ranges:
        yield read_range(store, round_, stage, lo, hi, columns, name, filters, parts)


def table_rows(store: Any, round_: int, stage: str, name: str = "data") -> int:
    """Rows of a stage's table, from the Parquet footers alone (no row is read)."""
    return sum(f.count_rows() for f in pq.ParquetDataset(store.table_path(round_, stage, name),
                                                         filesystem=store.fs).fragments)


def check_once(store: Any, round_: int, stage: str, ids: Iterable[str], size: int = CHUNK_PROMPTS) -> dict[str, int]:
    """Rows of a stage counted on the key columns, a range of prompts at a time: `total` (the Parquet
    footers), `seen` (rows of the prompts `ids`), `duplicated` (a (prompt_id, sample_index) seen twice).
    The rows are there exactly once when total == seen == expected and nothing is duplicated."""
    seen = dup = 0
    for keys in chunk_frames(store, round_, stage, ids, size, columns=list(ORDER)):
        seen += len(keys)
        dup += int(keys.duplicated().sum())
    return {"total": table_rows(store, round_, stage), "seen": seen, "duplicated": dup}


class PartWriter:
    """Table `name` of a stage written chunk by chunk: `<stage>/<name>/part-<i>.parquet`, each
    written atomically; `close()` writes one empty part (the `empty` frame's columns) if no chunk had
    rows, so the table always exists. An earlier attempt's parts are removed first."""

    def __init__(self, store: Any, round_: int, stage: str, name: str, empty: pd.DataFrame):
        from pipelines.store import atomic_write

        self.store, self.atomic_write, self.empty = store, atomic_write, empty
        self.dir = store.path(f"round_{int(round_)}", stage, name)
        if store.fs.get_file_info(self.dir).type != pafs.FileType.NotFound:
            store.fs.delete_dir(self.dir)  # an earlier attempt's parts: this one replaces them all
        self.parts = self.rows = 0
        self.schema: Optional[pa.Schema] = None

    def write(self, df: pd.DataFrame) -> None:
        if df.empty:
            return
        table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
        if self.schema is None:
            self.schema = table.schema
        else:  # a later chunk's all-null column keeps the first chunk's type
            table = table.cast(self.schema)
        self._put(posixpath.join(self.dir, f"part-{self.parts:05d}.parquet"), table)
        self.parts += 1
        self.rows += len(df)

    def close(self) -> int:
        """Rows written (an empty part when there were none)."""
        if not self.parts:
            table = pa.Table.from_pandas(self.empty.iloc[0:0].reset_index(drop=True), preserve_index=False)
            self._put(posixpath.join(self.dir, "part-00000.parquet"), table)
        return self.rows

    def _put(self, path: str, table: pa.Table) -> None:
        fs = self.store.fs
        self.atomic_write(fs, path, lambda target: pq.write_table(table, target, filesystem=fs))
