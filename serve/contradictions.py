"""The serve contradiction log: served images the model's own judge scored low, as Parquet parts.

Where it fits: every Serve replica appends, once per model batch, the served images whose own-judge
score is below `serve.contradiction_threshold` (or whose binary answer was unparseable) to
`<run>/contradictions/part-<replica>-<seq>.parquet`. Each part is written whole through the run
store's filesystem with `pipelines.store.atomic_write` (temp name + rename locally, one PUT on
S3/GCS), so a crash never leaves a half-written part and never touches earlier parts. The driver
reads the log back as a prompt source (DESIGN.md: "log contradiction events in production as a
quality asset").

Columns (what `pipelines.prompts` recognises as a contradiction log: prompt, png, score, round, time
and no `category`): prompt, png (PNG bytes), score (float, NaN = unparseable), round, time (UTC),
request_id, replica, seed (the per-sample seed).

`pipelines.prompts.load_prompts` reads one .parquet file, so `contradiction_log_path(run_dir)`
compacts the parts into `<run>/contradictions.parquet` and returns that path.

Example:
    >>> import tempfile
    >>> from pipelines.config import load_config
    >>> from pipelines.store import RunStore
    >>> from pipelines.prompts import load_prompts
    >>> store = RunStore(tempfile.mkdtemp(), "demo"); _ = store.init(load_config(None))
    >>> log = ContradictionLog(store, "r1")
    >>> _ = log.write([contradiction_row("a red circle", b"png", 0.1, 1, "req-1", 7)])
    >>> rows, _ = load_prompts(contradiction_log_path(store.uri))
    >>> [r["prompt"] for r in rows], rows[0]["category"]
    (['a red circle'], 'contradiction_log')
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.store import RunStore, RunStoreError, atomic_write

LOG_DIR = "contradictions"
COMPACTED = "contradictions.parquet"
SCHEMA = pa.schema([
    ("prompt", pa.string()), ("png", pa.binary()), ("score", pa.float64()), ("round", pa.int64()),
    ("time", pa.timestamp("us", tz="UTC")), ("request_id", pa.string()), ("replica", pa.string()),
    ("seed", pa.int64()),
])


def open_run(run_dir: str) -> RunStore:
    """The RunStore of an existing run directory (local path, file://, s3:// or gs:// URI)."""
    root, _, name = run_dir.rstrip("/").rpartition("/")
    store = RunStore(root or ".", name)
    if not store.exists():
        raise RunStoreError(f"{run_dir} is not a run directory (no manifest.json)")
    return store


def contradiction_row(prompt: str, png: bytes, score: float, round_: int, request_id: str,
                      seed: int, replica: str = "") -> dict:
    return {"prompt": prompt, "png": png, "score": float(score), "round": int(round_),
            "time": dt.datetime.now(dt.timezone.utc), "request_id": request_id,
            "replica": replica, "seed": int(seed) & (2**63 - 1)}


class ContradictionLog:
    """Appends part files for one replica; `write` is called from one thread at a time."""

    def __init__(self, store: RunStore, replica: str):
        self.store = store
        # Replica ids are unique per replica incarnation, so parts of a restarted replica never
        # overwrite its predecessor's; the uuid covers callers outside Serve with a fixed name.
        self.prefix = f"part-{re.sub(r'[^A-Za-z0-9_-]', '_', replica)}-{uuid.uuid4().hex[:6]}"
        self.seq = 0

    def write(self, rows: list[dict]) -> Optional[str]:
        """Write `rows` as one new part file, atomically; returns its path (None for no rows)."""
        if not rows:
            return None
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        path = self.store.path(LOG_DIR, f"{self.prefix}-{self.seq:06d}.parquet")
        self.seq += 1
        atomic_write(self.store.fs, path, lambda p: pq.write_table(table, p, filesystem=self.store.fs))
        return path


def _parts(store: RunStore) -> list[str]:
    selector = pafs.FileSelector(store.path(LOG_DIR), allow_not_found=True)
    names = [i.path for i in store.fs.get_file_info(selector) if i.type == pafs.FileType.File]
    # ".tmp-*" files are writes in progress (or a crashed writer's leftovers): never read them.
    return sorted(p for p in names if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))


def read_contradictions(run_dir: str) -> pa.Table:
    """Every logged contradiction of the run, oldest part first (an empty table when none)."""
    store = open_run(run_dir)
    tables = [pq.read_table(p, filesystem=store.fs, schema=SCHEMA) for p in _parts(store)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def contradiction_log_path(run_dir: str) -> str:
    """Compact the parts into `<run>/contradictions.parquet` (atomically) and return its path/URI,
    which `pipelines.prompts.load_prompts` accepts. Parts are kept: compaction is repeatable."""
    store = open_run(run_dir)
    table = read_contradictions(run_dir)
    target = store.path(COMPACTED)
    atomic_write(store.fs, target, lambda p: pq.write_table(table, p, filesystem=store.fs))
    return store.uri.rstrip("/") + "/" + COMPACTED
