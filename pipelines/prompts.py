"""Prompt sources -> a clean list of `PromptRow` plus a report of what was skipped and why.

Where it fits: the first stage of a round. Sources: the built-in shapes world (`source="shapes"`),
JSONL / CSV / Parquet files with a `prompt` column (optional `id` or `prompt_id`, `category`,
`split`), and the serve contradiction log (Parquet: prompt, png, score, round, time), whose prompts
feed the next round. Files are read through pyarrow filesystems (local, file://, s3://, gs://).

Bad rows never stop a run: empty prompts, non-text prompts, prompts with characters a prompt may not
hold (`schemas.prompt_text_problem`: control characters, surrogates), lines that are not valid UTF-8,
prompts over the token budget, rows without a prompt, malformed lines and duplicate ids are skipped
and counted by reason, with the line (or row) of the first few, in the `PromptReport`.
Files are streamed (JSONL and CSV line by line, Parquet in record batches) and reading stops once
`limit` good prompts are kept: memory grows with the prompts kept, not with the file. A missing file,
an unknown format or a file without a `prompt` column is a `PromptSourceError` (nothing sensible to continue with).

Example:
    >>> import json, os, tempfile
    >>> from pipelines.prompts import load_prompts
    >>> path = os.path.join(tempfile.mkdtemp(), "p.jsonl")
    >>> with open(path, "w") as fh:
    ...     _ = fh.write(json.dumps({"prompt": "a red circle"}) + "\\n" + json.dumps({"prompt": ""}) + "\\n")
    >>> rows, report = load_prompts(path)
    >>> [r["prompt"] for r in rows], report.kept, dict(report.skipped)
    (['a red circle'], 1, {'empty': 1})
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.schemas import PromptRow, prompt_text_problem
from pipelines.store import resolve_uri

DEFAULT_CATEGORY = "uncategorized"
PROMPT_COLUMNS = ("prompt_id", "prompt", "category")
TABLE_BATCH = 8192  # rows turned into Arrow at a time by load_prompts(as_table=True)
CONTRADICTION_CATEGORY = "contradiction_log"  # serve log rows carry no category of their own
SKIP_REASONS = ("empty", "not_text", "bad_characters", "bad_encoding", "too_long", "duplicate_id",
                "missing_prompt", "malformed", "other_split")
READ_BUFFER = 1 << 20  # bytes read at a time from a prompt file


class PromptSourceError(ValueError):
    """A prompt source cannot be read at all (missing file, unknown format, no prompt column)."""


@dataclass
class PromptReport:
    """What happened to every row read: kept, or skipped with a reason (see SKIP_REASONS)."""

    sources: list[str] = field(default_factory=list)
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few row refs

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        refs = self.examples.setdefault(reason, [])
        if len(refs) < 3:  # enough to find the problem in the file, not a copy of it
            refs.append(where)

    def as_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "read": self.read, "kept": self.kept,
                "skipped": dict(self.skipped), "examples": self.examples}


def whitespace_tokens(text: str) -> int:
    """Default token count: whitespace words (a stand-in when no tokenizer is at hand)."""
    return len(text.split())


def prompt_id(text: str) -> str:
    """Stable short id for a prompt without one: the same text always gets the same id."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def prompt_table(prompts: Any) -> pa.Table:
    """PromptRows as one Arrow table (prompt_id, prompt, category, and `replayed` when the rows have
    it): what the driver keeps of a run's or a round's prompts, ~50 bytes a prompt where a row dict
    costs ~350 (measured: 2.5 vs 16.6 MiB for 50,000 short prompts). A table passes through
    unchanged; missing values are nulls (the stages' schema checks refuse them where needed).

    >>> prompt_table([{"prompt_id": "a", "prompt": "x", "category": "c"}, {"prompt_id": 7}]).to_pylist()
    [{'prompt_id': 'a', 'prompt': 'x', 'category': 'c'}, {'prompt_id': '7', 'prompt': None, 'category': None}]
    """
    if isinstance(prompts, pa.Table):
        return prompts
    rows = list(prompts)
    ids = [None if r.get("prompt_id") is None else str(r["prompt_id"]) for r in rows]  # ids are text
    cols = {name: pa.array(ids if name == "prompt_id" else [r.get(name) for r in rows], type=pa.string())
            for name in PROMPT_COLUMNS}
    if any("replayed" in r for r in rows):
        cols["replayed"] = pa.array([bool(r.get("replayed", False)) for r in rows], type=pa.bool_())
    return pa.table(cols)


def load_prompts(source: str, *, split: str = "train", limit: Optional[int] = None,
                 max_tokens: Optional[int] = None,
                 count_tokens: Callable[[str], int] = whitespace_tokens,
                 extra_sources: Sequence[str] = (), as_table: bool = False) -> tuple[Any, PromptReport]:
    """Read `source` then `extra_sources`, clean them, and keep the first `limit` good prompts: a list
    of PromptRows, or with `as_table` a `prompt_table` built TABLE_BATCH rows at a time (what the
    driver keeps: no row dict per prompt stays in memory; the ids seen so far do, for duplicates).

    Duplicate ids across sources keep the first occurrence (the main source wins). `split` selects
    shapes prompts, and file rows when the file has a `split` column ("all" keeps everything).
    """
    report = PromptReport()
    rows: list[PromptRow] = []
    parts: list[pa.Table] = []
    seen: set[str] = set()
    for src in [source, *extra_sources]:
        report.sources.append(src)
        for where, raw in _read_source(src, split, report):
            report.read += 1
            row = _clean(raw, where, split, max_tokens, count_tokens, report)
            if row is None:
                continue
            if row["prompt_id"] in seen:
                report.skip("duplicate_id", where)
                continue
            seen.add(row["prompt_id"])
            rows.append(row)
            if as_table and len(rows) >= TABLE_BATCH:
                parts.append(prompt_table(rows))
                rows = []
            if limit is not None and len(seen) >= limit:
                break  # enough: the rest of the file is never read
        if limit is not None and len(seen) >= limit:
            break
    report.kept = len(seen)
    return (pa.concat_tables(parts + [prompt_table(rows)]) if as_table else rows), report


def prompts_from_config(prompts_cfg: Any, count_tokens: Callable[[str], int] = whitespace_tokens
                        ) -> tuple[list[PromptRow], PromptReport]:
    """`load_prompts` driven by the `prompts:` config section."""
    return load_prompts(prompts_cfg.source, split=prompts_cfg.split, limit=prompts_cfg.limit,
                        max_tokens=prompts_cfg.max_prompt_tokens, count_tokens=count_tokens,
                        extra_sources=prompts_cfg.extra_sources)


def _clean(raw: dict, where: str, split: str, max_tokens: Optional[int],
           count_tokens: Callable[[str], int], report: PromptReport) -> Optional[PromptRow]:
    """One raw record -> a PromptRow, or None after counting why it was skipped."""
    if "prompt" not in raw or raw["prompt"] is None:
        report.skip("missing_prompt", where)
        return None
    text = raw["prompt"]
    if not isinstance(text, str):
        report.skip("not_text", where)
        return None
    text = text.strip()
    if not text:
        report.skip("empty", where)
        return None
    if prompt_text_problem(text):
        report.skip("bad_encoding" if _undecodable(text) else "bad_characters", where)
        return None
    row_split = raw.get("split")
    if split != "all" and row_split not in (None, "") and str(row_split) != split:
        report.skip("other_split", where)
        return None
    if max_tokens is not None and count_tokens(text) > max_tokens:
        report.skip("too_long", where)
        return None
    given = raw.get("prompt_id", raw.get("id"))
    pid = prompt_id(text) if given is None or str(given).strip() == "" else str(given).strip()
    category = raw.get("category")
    category = str(category).strip() if category not in (None, "") else raw.get("_category", DEFAULT_CATEGORY)
    return PromptRow(prompt_id=pid, prompt=text, category=category)


def _read_source(src: str, split: str, report: PromptReport) -> Iterator[tuple[str, dict]]:
    """(row reference for messages, raw record) for every row of a source."""
    if src == "shapes":
        yield from _shapes_rows(split)
        return
    lower = src.lower()
    if not lower.endswith((".jsonl", ".csv", ".parquet")):
        raise PromptSourceError(f"{src}: unknown prompt source (use 'shapes' or a .jsonl/.csv/.parquet file)")
    fs, path = resolve_uri(src)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise PromptSourceError(f"{src}: prompt file not found")
    if lower.endswith(".jsonl"):
        yield from _jsonl_rows(fs, path, src, report)
    elif lower.endswith(".csv"):
        yield from _csv_rows(fs, path, src)
    else:
        yield from _parquet_rows(fs, path, src)


def _jsonl_rows(fs: pafs.FileSystem, path: str, src: str,
                report: PromptReport) -> Iterator[tuple[str, dict]]:
    """One record per non-blank line, streamed; undecodable or non-object lines are counted here."""
    any_object = has_prompt = False
    with fs.open_input_stream(path) as fh:
        for lineno, raw in enumerate(io.BufferedReader(fh, buffer_size=READ_BUFFER), start=1):
            where = f"{src}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.read += 1
                report.skip("bad_encoding", where)
                continue
            if not line.strip():
                continue  # blank lines are formatting, not rows
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                record = None
            if not isinstance(record, dict):  # counted here because it never reaches _clean
                report.read += 1
                report.skip("malformed", where)
                continue
            any_object = True
            has_prompt = has_prompt or "prompt" in record
            yield where, record
    if any_object and not has_prompt:
        raise PromptSourceError(f"{src}: no 'prompt' field in any row")


def _csv_rows(fs: pafs.FileSystem, path: str, src: str) -> Iterator[tuple[str, dict]]:
    """Streamed; bytes that are not UTF-8 become lone surrogates (surrogateescape), which `_clean`
    counts as `bad_encoding` for that row only."""
    with fs.open_input_stream(path) as fh:
        text = io.TextIOWrapper(io.BufferedReader(fh, buffer_size=READ_BUFFER), encoding="utf-8-sig",
                                errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise PromptSourceError(f"{src}: no 'prompt' column (columns: {reader.fieldnames or []})")
        for record in reader:
            yield f"{src}:{reader.line_num}", record


def _undecodable(text: str) -> bool:
    """True when `text` holds the lone surrogates surrogateescape makes of undecodable bytes."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet_rows(fs: pafs.FileSystem, path: str, src: str) -> Iterator[tuple[str, dict]]:
    names = pq.read_schema(path, filesystem=fs).names
    if "prompt" not in names:
        raise PromptSourceError(f"{src}: no 'prompt' column (columns: {names})")
    # Only the text columns: a contradiction log also holds PNGs we do not need here.
    wanted = [c for c in ("prompt", "id", "prompt_id", "category", "split") if c in names]
    is_log = {"score", "round"} <= set(names) and "category" not in names
    i = 0
    with fs.open_input_file(path) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=8192, columns=wanted):
            for record in batch.to_pylist():
                if is_log:
                    record["_category"] = CONTRADICTION_CATEGORY
                yield f"{src}#row{i}", record
                i += 1


def _shapes_rows(split: str) -> Iterator[tuple[str, dict]]:
    """The built-in world's prompts, via `shapes.world.train_prompts()` / `heldout_prompts()`.

    Imported lazily: the shapes package is optional for file-based runs. Each prompt object needs
    `.text` (and optionally `.category`, `.id`/`.prompt_id`); plain strings and dicts are accepted too.
    """
    try:
        world = importlib.import_module("shapes.world")
    except ImportError as exc:
        raise PromptSourceError(f"shapes: cannot import shapes.world ({exc})") from exc
    wanted = {"train": ["train_prompts"], "heldout": ["heldout_prompts"],
              "all": ["train_prompts", "heldout_prompts"]}[split]
    for fn_name in wanted:
        fn = getattr(world, fn_name, None)
        if not callable(fn):
            raise PromptSourceError(f"shapes: shapes.world has no {fn_name}()")
        for i, obj in enumerate(_as_iterable(fn(), fn_name)):
            yield f"shapes.{fn_name}()[{i}]", _shape_record(obj)


def _as_iterable(value: Any, name: str) -> Iterable:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise PromptSourceError(f"shapes: {name}() returned {type(value).__name__}, not a sequence")
    return value


def _shape_record(obj: Any) -> dict:
    if isinstance(obj, str):
        return {"prompt": obj}
    if isinstance(obj, dict):
        return {"prompt": obj.get("text", obj.get("prompt")), "category": obj.get("category"),
                "prompt_id": obj.get("prompt_id", obj.get("id"))}
    return {"prompt": getattr(obj, "text", None), "category": getattr(obj, "category", None),
            "prompt_id": getattr(obj, "prompt_id", getattr(obj, "id", None))}
