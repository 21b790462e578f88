"""Row contracts: every accepted table form passes, missing / mistyped / null columns fail loudly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.schemas import SCHEMAS, SchemaError, check_batch, check_table


def _row(**over):
    row = dict(prompt_id="p", prompt="a red circle", category="single", round=1, sample_index=0,
               seed=3, image_tokens=[1, 2, 3], png=b"\x89PNG", score=float("nan"), valid=False,
               answer="", extra_debug="allowed")
    row.update(over)
    return row


def test_all_table_forms_pass():
    rows = [_row(), _row(sample_index=1, score=0.7, valid=True)]
    check_table(rows, "judged", "judge")
    check_table(pd.DataFrame(rows), "judged", "judge")
    check_table(pa.Table.from_pylist(rows), "judged", "judge")
    check_table(pa.Table.from_pylist(rows).cast(pa.Table.from_pylist(rows).schema), "sample", "generate")
    check_table([], "judged", "judge")  # no rows: nothing to check


def test_token_column_variants():
    tokens = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    batch = {"prompt_id": np.array(["a", "b"]), "prompt": np.array(["x", "y"], dtype=object),
             "category": np.array(["c", "c"]), "round": np.array([1, 1]), "sample_index": np.arange(2),
             "seed": np.array([5, 6], dtype=np.uint32), "image_tokens": tokens,
             "png": np.array([b"a", b"b"], dtype=object)}
    assert check_batch(batch, "sample", "generate") is batch  # (B, T) int matrix
    obj = np.empty(2, dtype=object)
    obj[:] = [np.array([1, 2]), np.array([3, 4])]
    check_batch(dict(batch, image_tokens=obj), "sample", "generate")  # object array of int arrays
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), 3)
    table = pa.table({k: (fixed if k == "image_tokens" else pa.array(list(v))) for k, v in batch.items()})
    check_table(table, "sample", "generate")
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(tokens)
    check_table(table.set_column(table.column_names.index("image_tokens"), "image_tokens", tensor),
                "sample", "generate")  # extension tensor column, judged by its storage


@pytest.mark.parametrize("rows, match", [
    ([_row(score="0.7")], "stage 'judge': column 'score' has type string, expected double"),
    ([{k: v for k, v in _row().items() if k != "png"}], "stage 'judge': missing column 'png'"),
    ([_row(image_tokens=["a", "b"])], "column 'image_tokens' has type list<item: string>"),
    ([_row(png="not bytes")], "column 'png' has type string, expected binary"),
    ([_row(prompt_id=None), _row()], "column 'prompt_id' has 1 null value"),
    ([_row(valid=1)], "column 'valid' has type int64, expected bool"),
])
def test_bad_tables_name_stage_and_column(rows, match):
    for form in (rows, pd.DataFrame(rows), pa.Table.from_pylist(rows)):
        with pytest.raises(SchemaError, match=match.split(" has type")[0].replace("(", r"\(")):
            check_table(form, "judged", "judge")
    with pytest.raises(SchemaError, match=match.replace("(", r"\(")):
        check_table(pa.Table.from_pylist(rows), "judged", "judge")


def test_numpy_batch_with_strings_for_tokens_fails():
    batch = {"prompt_id": np.array(["a"]), "prompt": np.array(["x"]), "category": np.array(["c"]),
             "round": np.array([1]), "sample_index": np.array([0]), "seed": np.array([1]),
             "image_tokens": np.array(["1 2 3"]), "png": np.array([b"x"], dtype=object)}
    with pytest.raises(SchemaError, match="stage 'generate': column 'image_tokens' has type numpy <U5"):
        check_batch(batch, "sample", "generate")


def test_pool_values_and_optional_pair_columns():
    pooled = [_row(pool="maybe", label_source="judge")]
    with pytest.raises(SchemaError, match=r"column 'pool' has value\(s\) \['maybe'\]"):
        check_table(pooled, "pooled", "pool")
    pair = dict(prompt_id="p", prompt="x", chosen_tokens=[1], rejected_tokens=[2], chosen_score=1.0,
                rejected_score=0.0)
    check_table([pair], "pair", "pairs")
    check_table([dict(pair, ref_chosen_logp=None, ref_rejected_logp=None)], "pair", "pairs")
    with pytest.raises(SchemaError, match="'ref_chosen_logp' has type string"):
        check_table([dict(pair, ref_chosen_logp="x")], "pair", "pairs")
    with pytest.raises(KeyError):
        check_table([pair], "pairz", "pairs")


def test_arrow_schemas_are_readable_contracts():
    assert SCHEMAS["judged"].field("score").type == pa.float64()
    assert SCHEMAS["sample"].field("image_tokens").type == pa.list_(pa.int64())
    assert SCHEMAS["pair"].field("ref_chosen_logp").nullable
