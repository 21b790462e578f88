"""Human review of uncertain samples: a risk-weighted export, and the import of reviewers' labels.

Where it fits: after `pools.assign_pools`. `export_review` samples uncertain samples and writes
review.parquet, a static review.html contact sheet (inline PNGs; opens in any browser, no server)
and labels_template.csv. Reviewers fill in `label` (1 = the image shows the prompt, 0 = it does
not); `import_labels` reads the CSV or Parquet back and `apply_labels` overrides the judge
(1 -> accepted, 0 -> rejected, label_source="human") before the SFT set and DPO pairs are built.

Risk weight of an uncertain sample = closeness x rarity:
    closeness = 1 - |score - 0.5| * 2 (1 at 0.5, where the judge is least sure; invalid or NaN
                scores count as 1, the judge said nothing usable), floored at 0.05 so no sample is
                unreachable;
    rarity    = (uncertain samples) / (categories x samples of this category): 1 for a balanced
                mix, > 1 for rare categories, so a small category is not drowned by a large one.
Sampling is without replacement (Efraimidis-Spirakis keys u**(1/w)), seeded, on rows sorted by
(prompt_id, round, sample_index): the same pool and seed give the same export.

Example:
    >>> import tempfile
    >>> from pipelines.review import export_review
    >>> rows = [dict(prompt_id="p", prompt="a <b>red</b> circle", category="single", round=1,
    ...              sample_index=i, seed=i, image_tokens=[i], png=b"", score=0.5, valid=True,
    ...              answer="", pool="uncertain", label_source="judge") for i in range(3)]
    >>> out = export_review(rows, tempfile.mkdtemp(), n=2, seed=0)
    >>> len(out.rows), "&lt;b&gt;red" in open(out.html_path).read()
    (2, True)
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.pools import as_frame
from pipelines.store import atomic_write, resolve_uri

EXPORT_COLUMNS = ["prompt_id", "prompt", "category", "round", "sample_index", "score", "valid",
                  "answer", "review_weight", "png"]
_ORDER = ["prompt_id", "round", "sample_index"]


class LabelError(ValueError):
    """A human-label file or row is unusable; the message names the file and row."""


@dataclass
class ReviewExport:
    rows: pd.DataFrame  # the exported samples (EXPORT_COLUMNS)
    parquet_path: str
    html_path: str
    template_path: str


def review_weights(uncertain: pd.DataFrame, counts: Optional[pd.Series] = None) -> np.ndarray:
    """Risk weight per row: closeness to 0.5 x category rarity (see module docstring). `counts`:
    uncertain samples per category over the whole pool, when `uncertain` is one chunk of it."""
    if uncertain.empty:
        return np.zeros(0)
    score = uncertain["score"].astype(float)
    valid = uncertain["valid"].astype(bool) & score.notna()
    closeness = np.where(valid, 1.0 - (score - 0.5).abs().to_numpy() * 2.0, 1.0)
    closeness = np.clip(closeness, 0.05, 1.0)
    counts = uncertain["category"].value_counts() if counts is None else counts
    per_row = uncertain["category"].map(counts).to_numpy(dtype=float)
    rarity = float(counts.sum()) / (len(counts) * per_row)
    return closeness * rarity


class ReviewDraw:
    """The risk-weighted draw of `select_for_review`, fed the uncertain rows chunk by chunk (in
    (prompt_id, round, sample_index) order; `counts`: uncertain samples per category over all
    chunks): it keeps at most `n` rows and picks exactly what one draw over all rows would."""

    def __init__(self, n: int, seed: int, counts: pd.Series):
        self.n, self.counts, self.rng = n, counts, np.random.default_rng(seed)
        self.keep_all = int(counts.sum()) <= n
        self.kept: Optional[pd.DataFrame] = None

    def add(self, uncertain: pd.DataFrame) -> None:
        if uncertain.empty or self.n <= 0:
            return
        rows = uncertain.reset_index(drop=True).assign(review_weight=review_weights(uncertain, self.counts))
        if not self.keep_all:  # log of u**(1/w): same order, no underflow for small w
            rows["_key"] = np.log(self.rng.random(len(rows))) / rows["review_weight"].to_numpy()
        both = rows if self.kept is None else pd.concat([self.kept, rows], ignore_index=True)
        if not self.keep_all:  # the top n keys, kept in pool order (ties: the earlier row)
            both = both.iloc[np.sort(np.argsort(-both["_key"].to_numpy(), kind="stable")[:self.n])]
        self.kept = both.reset_index(drop=True)

    def rows(self, empty: pd.DataFrame) -> pd.DataFrame:
        """The chosen rows in pool order (`empty`: the columns to return when there are none)."""
        if self.kept is None:
            return empty.iloc[0:0].assign(review_weight=pd.Series(dtype=float))
        return self.kept.drop(columns="_key", errors="ignore").reset_index(drop=True)


def select_for_review(pooled: Any, n: int, seed: int) -> pd.DataFrame:
    """Up to `n` uncertain samples, drawn without replacement with probability ~ risk weight."""
    df = as_frame(pooled)
    if df.empty or n <= 0:
        return df.iloc[0:0].assign(review_weight=pd.Series(dtype=float))
    uncertain = df[df["pool"] == "uncertain"].sort_values(_ORDER, kind="stable").reset_index(drop=True)
    draw = ReviewDraw(n, seed, uncertain["category"].value_counts())
    draw.add(uncertain)
    return draw.rows(uncertain)


def export_review(pooled: Any, out_dir: str, n: int, seed: int,
                  images: Optional[Callable[[pd.DataFrame], list[bytes]]] = None) -> ReviewExport:
    """Write review.parquet, review.html and labels_template.csv under `out_dir` (path or URI).
    `images(rows)`: the PNG bytes of the chosen rows, when `pooled` does not carry them (the driver's
    pools hold no PNGs; they are fetched for the exported few only)."""
    return write_review(select_for_review(pooled, n, seed), out_dir, images)


def write_review(rows: pd.DataFrame, out_dir: str,
                 images: Optional[Callable[[pd.DataFrame], list[bytes]]] = None) -> ReviewExport:
    """`export_review`'s files for rows already chosen (`select_for_review`, `ReviewDraw`)."""
    if images is not None:
        rows["png"] = images(rows)
    rows = rows[[c for c in EXPORT_COLUMNS if c in rows.columns]].reset_index(drop=True)
    fs, base = resolve_uri(out_dir)
    paths = {name: posixpath.join(base, name)
             for name in ("review.parquet", "review.html", "labels_template.csv")}
    table = pa.Table.from_pandas(rows, preserve_index=False)
    atomic_write(fs, paths["review.parquet"], lambda p: pq.write_table(table, p, filesystem=fs))
    for name, text in (("review.html", render_html(rows)), ("labels_template.csv", _template(rows))):
        data = text.encode("utf-8")
        atomic_write(fs, paths[name], lambda p, d=data: _put(fs, p, d))
    return ReviewExport(rows, paths["review.parquet"], paths["review.html"],
                        paths["labels_template.csv"])


def _put(fs: Any, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def _template(rows: pd.DataFrame) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["prompt_id", "sample_index", "label", "prompt"])
    for r in rows.itertuples():
        writer.writerow([r.prompt_id, int(r.sample_index), "", r.prompt])
    return buf.getvalue()


def render_html(rows: pd.DataFrame) -> str:
    """A self-contained contact sheet: one table row per sample, PNG inlined as base64."""
    body = []
    for r in rows.itertuples():
        score = "invalid" if not r.valid or math.isnan(float(r.score)) else f"{float(r.score):.3f}"
        png = base64.b64encode(bytes(r.png)).decode("ascii") if r.png is not None else ""
        body.append(
            "<tr>"
            f'<td><img src="data:image/png;base64,{png}" width="128" height="128" '
            f'alt="{html.escape(str(r.prompt_id))} #{int(r.sample_index)}"></td>'
            f"<td>{html.escape(str(r.prompt))}</td><td>{html.escape(str(r.category))}</td>"
            f"<td>{score}</td><td>{html.escape(str(r.prompt_id))}</td>"
            f"<td>{int(r.sample_index)}</td><td>{html.escape(str(r.answer))}</td></tr>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>unigap review</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px}"
        "img{image-rendering:pixelated}</style></head><body>\n"
        f"<h1>Uncertain samples for review ({len(rows)})</h1>\n"
        "<p>Label each sample in labels_template.csv: 1 = the image shows the prompt, 0 = it does "
        "not; leave blank to skip.</p>\n<table>\n<tr><th>image</th><th>prompt</th><th>category</th>"
        "<th>score</th><th>prompt_id</th><th>sample_index</th><th>judge answer</th></tr>\n"
        + "\n".join(body) + "\n</table>\n</body></html>\n")


def import_labels(path: str) -> pd.DataFrame:
    """Read human labels (CSV or Parquet: prompt_id, sample_index, label in {0, 1}).

    Rows with an empty label are skipped (not reviewed yet: the template starts blank). Anything
    else that is not 0 or 1, a bad sample_index, an empty prompt_id or two different labels for the
    same sample is a `LabelError` naming the row (CSV: line number; Parquet: row number from 1).
    """
    records = _read_label_records(path)
    out: dict[tuple[str, int], int] = {}
    for where, rec in records:
        raw_label = rec.get("label")
        if raw_label is None or (isinstance(raw_label, float) and math.isnan(raw_label)) \
                or str(raw_label).strip() == "":
            continue
        label = _parse_int(raw_label, {0, 1}, f"{path} {where}: label {raw_label!r} is not 0 or 1")
        index = _parse_int(rec.get("sample_index"), None,
                           f"{path} {where}: sample_index {rec.get('sample_index')!r} is not an integer")
        pid = str(rec.get("prompt_id") or "").strip()
        if not pid:
            raise LabelError(f"{path} {where}: empty prompt_id")
        if out.get((pid, index), label) != label:
            raise LabelError(f"{path} {where}: conflicting labels for ({pid}, {index})")
        out[(pid, index)] = label
    return pd.DataFrame([{"prompt_id": p, "sample_index": i, "label": v} for (p, i), v in out.items()],
                        columns=["prompt_id", "sample_index", "label"])


def _read_label_records(path: str) -> list[tuple[str, dict]]:
    fs, p = resolve_uri(path)
    try:
        if path.lower().endswith(".parquet"):
            table = pq.read_table(p, filesystem=fs)
            records = [(f"row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)]
            columns = table.column_names
        elif path.lower().endswith(".csv"):
            with fs.open_input_stream(p) as fh:
                reader = csv.DictReader(io.StringIO(fh.read().decode("utf-8-sig")))
                records = [(f"line {i}", r) for i, r in enumerate(reader, start=2)]
                columns = list(reader.fieldnames or [])
        else:
            raise LabelError(f"{path}: labels must be a .csv or .parquet file")
    except FileNotFoundError as exc:
        raise LabelError(f"{path}: label file not found") from exc
    missing = [c for c in ("prompt_id", "sample_index", "label") if c not in columns]
    if missing:
        raise LabelError(f"{path}: missing column(s) {missing} (have {columns})")
    return records


def _parse_int(value: Any, allowed: set[int] | None, message: str) -> int:
    try:
        as_float = float(str(value).strip())
    except (TypeError, ValueError):
        raise LabelError(message) from None
    if isinstance(value, bool) or not as_float.is_integer() or (allowed and int(as_float) not in allowed):
        raise LabelError(message)
    return int(as_float)


def apply_labels(pooled: Any, labels: pd.DataFrame) -> pd.DataFrame:
    """Override the judge with human labels: 1 -> accepted, 0 -> rejected, label_source="human".

    Labels apply to every round of a (prompt_id, sample_index) present in `pooled` (a pool holds
    one round; a replayed prompt gets new prompt rows, not new ids). A label for a sample that is
    not in `pooled` is a `LabelError`: it means the file belongs to another run or round.
    """
    df = as_frame(pooled)
    if labels.empty:
        return df
    key = df["prompt_id"].astype(str) + "#" + df["sample_index"].astype(int).astype(str)
    lab_key = labels["prompt_id"].astype(str) + "#" + labels["sample_index"].astype(int).astype(str)
    unknown = sorted(set(lab_key) - set(key))
    if unknown:
        raise LabelError(f"labels for samples not in this pool: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    mapping = dict(zip(lab_key, labels["label"].astype(int)))
    label = key.map(mapping)
    has = label.notna()
    df.loc[has, "pool"] = np.where(label[has] == 1, "accepted", "rejected")
    df.loc[has, "label_source"] = "human"
    return df
