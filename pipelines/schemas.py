"""Row contracts between stages, and the checks that enforce them at every stage boundary.

Where it fits: prompts -> generate -> judge -> pools -> train. Each arrow is a table of rows of one
kind below; each stage calls `check_table` on what it reads and writes, so an image column that
silently became strings (the most common Ray Data bug) fails loudly, naming the stage and column.

Contracts (TypedDicts, readable without their producers):
    PromptRow   prompt_id, prompt, category
    SampleRow   PromptRow + round, sample_index, seed, image_tokens, png
    JudgedRow   SampleRow + score (NaN when invalid), valid, answer
    PooledRow   JudgedRow without png (it stays in storage) + pool ("accepted"|"rejected"|"uncertain"),
                label_source ("judge"|"human")
    SFTRow      one accepted sample to fine-tune on
    PairRow     chosen vs rejected image tokens for one prompt (+ optional reference log-probs)

Decisions: extra columns are allowed (stages add diagnostics); required columns are never missing,
mistyped or null. Integer widths are free (int32 or int64); image tokens may be any integer list
column, a fixed-size list, a tensor extension column (Ray's ArrowTensorType, pyarrow's
FixedShapeTensorType), a 2-D integer numpy array, or an object array of integer arrays (Ray batches).

Example:
    >>> from pipelines.schemas import check_table, SchemaError
    >>> rows = [{"prompt_id": "p1", "prompt": "a red circle", "category": "shape_color"}]
    >>> check_table(rows, "prompt", stage="prompts")
    >>> try:
    ...     check_table([{"prompt_id": "p1", "prompt": 3, "category": "x"}], "prompt", "prompts")
    ... except SchemaError as e:
    ...     print(e)
    stage 'prompts': column 'prompt' has type int64, expected string
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, TypedDict, Union

import numpy as np
import pyarrow as pa

Pool = Literal["accepted", "rejected", "uncertain"]
LabelSource = Literal["judge", "human"]
POOLS: tuple[str, ...] = ("accepted", "rejected", "uncertain")
LABEL_SOURCES: tuple[str, ...] = ("judge", "human")
Tokens = Union[list[int], np.ndarray]


def prompt_text_problem(text: str) -> Optional[str]:
    """Why `text` cannot be a prompt, or None. The one rule every entry point applies (prompt files,
    the serve HTTP API, the contradiction log that feeds later rounds):

    a prompt is non-empty text (after stripping) with no control characters (Unicode category Cc:
    NUL, tab, newline, DEL, C1 codes) and no surrogates (Cs: not encodable as UTF-8; what a lone
    UTF-16 half or an undecodable byte becomes). Everything else -- any script, emoji, format
    characters -- is allowed.

    >>> prompt_text_problem("a red circle") is None, prompt_text_problem("a\\x00b"), prompt_text_problem(" ")
    (True, 'contains a control character (U+0000)', 'is empty')
    """
    if not text.strip():
        return "is empty"
    bad = _BAD_PROMPT_CHAR.search(text)
    if bad is None:
        return None
    ch = bad.group()
    if unicodedata.category(ch) == "Cs":
        return f"contains a lone surrogate (U+{ord(ch):04X}; not valid UTF-8 text)"
    return f"contains a control character (U+{ord(ch):04X})"


# Exactly Unicode categories Cc (U+0000-001F, U+007F-009F) and Cs (U+D800-DFFF), as one regex: fast
# enough for million-row prompt files (tests/pipelines checks it against unicodedata).
_BAD_PROMPT_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class PromptRow(TypedDict):
    prompt_id: str  # stable id: given by the source, else a short sha1 of the text
    prompt: str
    category: str  # e.g. "counting"; per-category metrics group by it


class SampleRow(PromptRow):
    round: int  # self-improvement round that generated it (0 = base model)
    sample_index: int  # 0..N-1 within (prompt, round)
    seed: int  # the per-sample seed actually used (reproducible regardless of batching)
    image_tokens: Tokens  # (T,) codebook ids: what training and log-probs consume
    png: bytes  # the decoded image as PNG: what the judge, reviewers and reports see


class JudgedRow(SampleRow):
    score: float  # in [0, 1]; NaN when the judge's answer could not be parsed
    valid: bool  # False = unparseable answer (never silently scored 0)
    answer: str  # raw judge text ("" in prob mode)


class PooledRow(JudgedRow):  # stored without `png`: the judge stage's table keeps the images
    pool: Pool
    label_source: LabelSource  # "human" when a reviewer's label overrode the judge


class SFTRow(TypedDict):
    prompt_id: str
    prompt: str
    category: str
    round: int
    sample_index: int
    image_tokens: Tokens
    score: float
    label_source: LabelSource


class PairRow(TypedDict, total=False):
    prompt_id: str
    prompt: str
    chosen_tokens: Tokens
    rejected_tokens: Tokens
    chosen_score: float
    rejected_score: float
    # Optional: where the pair came from, and reference log-probs precomputed before training
    # (so DPO workers need not hold a second, frozen model).
    category: str
    round: int
    chosen_index: int
    rejected_index: int
    ref_chosen_logp: Optional[float]
    ref_rejected_logp: Optional[float]


class SchemaError(ValueError):
    """A table broke its contract; the message names the stage and the column."""


@dataclass(frozen=True)
class Col:
    name: str
    kind: str  # string | int | float | bool | binary | int_list
    required: bool = True
    values: tuple[str, ...] = ()  # allowed values of a string column (empty = any)


_ARROW = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
          "binary": pa.binary(), "int_list": pa.list_(pa.int64())}

_PROMPT = (Col("prompt_id", "string"), Col("prompt", "string"), Col("category", "string"))
_SAMPLE = _PROMPT + (Col("round", "int"), Col("sample_index", "int"), Col("seed", "int"),
                     Col("image_tokens", "int_list"), Col("png", "binary"))
_JUDGED = _SAMPLE + (Col("score", "float"), Col("valid", "bool"), Col("answer", "string"))
_POOLED = tuple(c for c in _JUDGED if c.name != "png") + (Col("pool", "string", values=POOLS),  # PNGs stay in storage
                     Col("label_source", "string", values=LABEL_SOURCES))
_SFT = _PROMPT + (Col("round", "int"), Col("sample_index", "int"), Col("image_tokens", "int_list"),
                  Col("score", "float"), Col("label_source", "string", values=LABEL_SOURCES))
_PAIR = (Col("prompt_id", "string"), Col("prompt", "string"), Col("chosen_tokens", "int_list"),
         Col("rejected_tokens", "int_list"), Col("chosen_score", "float"),
         Col("rejected_score", "float"), Col("category", "string", required=False),
         Col("round", "int", required=False), Col("chosen_index", "int", required=False),
         Col("rejected_index", "int", required=False), Col("ref_chosen_logp", "float", required=False),
         Col("ref_rejected_logp", "float", required=False))

COLUMNS: dict[str, tuple[Col, ...]] = {
    "prompt": _PROMPT, "sample": _SAMPLE, "judged": _JUDGED, "pooled": _POOLED,
    "sft": _SFT, "pair": _PAIR,
}


def arrow_schema(schema_name: str) -> pa.Schema:
    """The canonical Arrow schema (int64 ids, list<int64> tokens) of a row kind."""
    return pa.schema([pa.field(c.name, _ARROW[c.kind], nullable=not c.required)
                      for c in COLUMNS[schema_name]])


SCHEMAS: dict[str, pa.Schema] = {name: arrow_schema(name) for name in COLUMNS}


def check_table(table: Any, schema_name: str, stage: str) -> None:
    """Raise `SchemaError` unless `table` has every required column of `schema_name`, well typed.

    `table`: a pyarrow Table, a pandas DataFrame, a list of row dicts, or a dict of numpy arrays
    (a Ray "numpy" batch). Extra columns are allowed. An empty list of rows passes (no columns to
    check); an empty Table or DataFrame still needs its columns.
    """
    columns = _as_columns(table, stage)
    if columns is None:
        return
    for col in _columns(schema_name):
        if col.name not in columns:
            if col.required:
                raise SchemaError(f"stage {stage!r}: missing column {col.name!r} "
                                  f"(a {schema_name} table needs {_required(schema_name)})")
            continue
        kind, shown, nulls, values = _describe(columns[col.name])
        if kind == "null" and not col.required:
            continue  # an optional column that is entirely empty, e.g. reference log-probs not yet computed
        if kind != col.kind:
            raise SchemaError(f"stage {stage!r}: column {col.name!r} has type {shown}, "
                              f"expected {_ARROW[col.kind]}")
        if nulls and col.required and col.kind != "float":
            raise SchemaError(f"stage {stage!r}: column {col.name!r} has {nulls} null value(s)")
        bad = sorted(set(values) - set(col.values)) if col.values else []
        if bad:
            raise SchemaError(f"stage {stage!r}: column {col.name!r} has value(s) {bad}, "
                              f"expected one of {list(col.values)}")


def check_batch(batch: Any, schema_name: str, stage: str) -> Any:
    """`check_table` for a Ray Data batch (numpy dict or pandas); returns it, for use inline."""
    check_table(batch, schema_name, stage)
    return batch


def _columns(schema_name: str) -> tuple[Col, ...]:
    if schema_name not in COLUMNS:
        raise KeyError(f"unknown schema {schema_name!r}; known: {sorted(COLUMNS)}")
    return COLUMNS[schema_name]


def _required(schema_name: str) -> str:
    return ", ".join(c.name for c in COLUMNS[schema_name] if c.required)


def _as_columns(table: Any, stage: str) -> Optional[Mapping[str, Any]]:
    """name -> pyarrow ChunkedArray/Array or numpy array, without copying big columns."""
    if isinstance(table, pa.Table):
        return {name: table.column(name) for name in table.column_names}
    if isinstance(table, Mapping):  # Ray numpy batch: column -> ndarray
        return {name: np.asarray(v) if isinstance(v, list) else v for name, v in table.items()}
    if isinstance(table, list):
        if not table:
            return None
        if not all(isinstance(r, Mapping) for r in table):
            raise SchemaError(f"stage {stage!r}: expected rows as dicts")
        try:  # Arrow's own inference gives the clearest type names in errors
            return _as_columns(pa.Table.from_pylist(table), stage)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # mixed types: describe per value
            names = dict.fromkeys(k for r in table for k in r)  # first-seen order
            return {n: _object_array([r.get(n) for r in table]) for n in names}
    if hasattr(table, "columns") and hasattr(table, "__getitem__"):  # pandas DataFrame
        return {str(n): table[n].to_numpy() for n in table.columns}
    raise SchemaError(f"stage {stage!r}: cannot read a table from {type(table).__name__}")


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values  # slice assignment keeps per-row arrays/lists as single objects
    return out


def _describe(column: Any) -> tuple[str, str, int, list]:
    """(kind, type as shown in errors, null count, distinct string values)."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        kind = _arrow_kind(column.type)
        values = column.unique().to_pylist() if kind == "string" else []
        return kind, str(column.type), column.null_count, [v for v in values if v is not None]
    arr = np.asarray(column)
    if arr.dtype != object:
        kind = _numpy_kind(arr.dtype, arr.ndim)
        values = list(np.unique(arr)) if kind == "string" else []
        return kind, f"numpy {arr.dtype}{'' if arr.ndim == 1 else f' {arr.shape}'}", 0, values
    kinds = [_value_kind(v) for v in arr.ravel()]
    nulls = kinds.count("null")
    kinds = set(kinds)
    kinds.discard("null")
    kind = kinds.pop() if len(kinds) == 1 else ("null" if not kinds else "mixed")
    shown = f"object array of {kind}" if kind != "mixed" else "object array of mixed types"
    values = list({v for v in arr.ravel() if isinstance(v, str)}) if kind == "string" else []
    return kind, shown, nulls, values


def _arrow_kind(t: pa.DataType) -> str:
    if isinstance(t, pa.BaseExtensionType):  # Ray / pyarrow tensor columns: judge by the storage
        t = t.storage_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
            or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_null(t):
        return "null"
    is_list = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
               or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))
    if is_list:
        return "int_list" if pa.types.is_integer(t.value_type) else f"list<{t.value_type}>"
    return str(t)


def _numpy_kind(dtype: np.dtype, ndim: int) -> str:
    base = {"i": "int", "u": "int", "f": "float", "b": "bool", "U": "string", "S": "binary"}
    kind = base.get(dtype.kind, str(dtype))
    if ndim == 2 and kind == "int":
        return "int_list"  # (rows, T) token matrix from a fixed-shape tensor column
    return kind if ndim == 1 else f"{kind} array of {ndim} dims"


def _value_kind(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):  # pandas writes missing strings as NaN
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "binary"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, (list, tuple, np.ndarray)) or hasattr(v, "__array__"):
        a = np.asarray(v)
        return "int_list" if a.ndim == 1 and (a.dtype.kind in "iu" or a.size == 0) else f"list of {a.dtype}"
    return type(v).__name__
