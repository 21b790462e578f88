"""Review export (risk-weighted sample, Parquet + HTML contact sheet) and human label import."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.pools import assign_pools, dpo_pairs, sft_set
from pipelines.review import (LabelError, apply_labels, export_review, import_labels, review_weights,
                              select_for_review)


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _rows(pid, scores, category="single", prompt=None):
    return [dict(prompt_id=pid, prompt=prompt or f"a {pid} shape", category=category, round=1,
                 sample_index=i, seed=i, image_tokens=[i], png=_png((i * 40, 0, 0)), score=s,
                 valid=s == s, answer="The score is <1>" if s == s else "???")
            for i, s in enumerate(scores)]


@pytest.fixture
def pooled():
    rows = (_rows("p1", [0.5, 0.45, 0.9, 0.1], prompt='a <script>alert("x")</script> & "red" circle')
            + _rows("p2", [0.55, float("nan")], category="spatial")
            + _rows("p3", [0.42] * 6, category="counting"))
    return assign_pools(rows, accept_threshold=0.6, reject_threshold=0.4)


class _Sheet(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_weights_prefer_uncertain_scores_and_rare_categories(pooled):
    unc = pooled[pooled["pool"] == "uncertain"].reset_index(drop=True)
    w = review_weights(unc)
    by = dict(zip(zip(unc["prompt_id"], unc["sample_index"]), w))
    assert by[("p1", 0)] > by[("p1", 1)]  # 0.5 beats 0.45
    # 10 uncertain rows in 3 categories; single has 2 -> rarity 10 / (3 * 2); score 0.5 -> closeness 1
    assert by[("p1", 0)] == pytest.approx(10 / 6)
    assert by[("p2", 1)] == pytest.approx(10 / 6)  # invalid (NaN) counts as maximally uncertain
    # counting has 6 of 10 uncertain rows: each counting row weighs less than a p2 (spatial) row
    assert by[("p3", 0)] < by[("p2", 0)]


def test_selection_is_seeded_and_uncertain_only(pooled):
    a = select_for_review(pooled, n=4, seed=1)
    b = select_for_review(pooled.sample(frac=1.0, random_state=0), n=4, seed=1)
    assert len(a) == 4 and set(a["pool"]) == {"uncertain"}
    assert a[["prompt_id", "sample_index"]].values.tolist() == b[["prompt_id", "sample_index"]].values.tolist()
    assert len(select_for_review(pooled, n=100, seed=1)) == (pooled["pool"] == "uncertain").sum()
    assert select_for_review(pooled, n=0, seed=1).empty


def test_export_writes_parquet_html_and_template(pooled, tmp_path):
    out = export_review(pooled, str(tmp_path / "review"), n=5, seed=0)
    table = pq.read_table(out.parquet_path)
    assert table.num_rows == 5 and {"png", "score", "review_weight"} <= set(table.column_names)
    sheet = _Sheet()
    sheet.feed(open(out.html_path, encoding="utf-8").read())
    sheet.close()
    assert len(sheet.imgs) == 5 and "table" in sheet.tags and "script" not in sheet.tags
    for img, row in zip(sheet.imgs, out.rows.itertuples()):
        assert img["src"] == "data:image/png;base64," + base64.b64encode(row.png).decode()
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    text = " ".join(sheet.text)
    for row in out.rows.itertuples():
        assert row.prompt in text and row.prompt_id in text  # every exported sample is on the sheet
    template = pd.read_csv(out.template_path)
    assert list(template.columns[:3]) == ["prompt_id", "sample_index", "label"]
    assert len(template) == 5 and template["label"].isna().all()


def test_html_escapes_prompts(pooled, tmp_path):
    only_p1 = pooled[pooled["prompt_id"] == "p1"]
    out = export_review(only_p1, str(tmp_path), n=10, seed=0)
    raw = open(out.html_path, encoding="utf-8").read()
    assert "<script>" not in raw and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in raw


def test_file_uri_export(pooled, tmp_path):
    out = export_review(pooled, f"file://{tmp_path}/r", n=2, seed=0)
    assert (tmp_path / "r" / "review.html").is_file() and len(out.rows) == 2


def test_labels_override_the_judge(pooled, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("prompt_id,sample_index,label,prompt\np1,0,1,x\np3,2,0,y\np2,0,,z\np1,3,1,w\n")
    labels = import_labels(str(path))
    assert sorted(labels[["prompt_id", "sample_index", "label"]].values.tolist()) == [
        ["p1", 0, 1], ["p1", 3, 1], ["p3", 2, 0]]  # blank label = not reviewed
    out = apply_labels(pooled, labels)
    get = lambda pid, i: out[(out.prompt_id == pid) & (out.sample_index == i)].iloc[0]  # noqa: E731
    assert (get("p1", 0).pool, get("p1", 0).label_source) == ("accepted", "human")
    assert (get("p1", 3).pool, get("p1", 3).label_source) == ("accepted", "human")  # judge said 0.1
    assert (get("p3", 2).pool, get("p3", 2).label_source) == ("rejected", "human")
    assert (get("p2", 0).pool, get("p2", 0).label_source) == ("uncertain", "judge")
    assert ("p1", 0) in set(zip(sft_set(out).prompt_id, sft_set(out).sample_index))
    assert len(dpo_pairs(out, "all", 0.0, 10, seed=0).query("prompt_id == 'p3'")) == 0


def test_parquet_labels(pooled, tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt_id": ["p2"], "sample_index": [1], "label": [0]}), path)
    out = apply_labels(pooled, import_labels(str(path)))
    assert out[(out.prompt_id == "p2") & (out.sample_index == 1)].iloc[0].pool == "rejected"


@pytest.mark.parametrize("body, match", [
    ("prompt_id,sample_index,label\np1,0,1\np1,1,maybe\n", r"line 3: label 'maybe' is not 0 or 1"),
    ("prompt_id,sample_index,label\np1,0,2\n", r"line 2: label '2' is not 0 or 1"),
    ("prompt_id,sample_index,label\np1,x,1\n", r"line 2: sample_index 'x' is not an integer"),
    ("prompt_id,sample_index,label\n,0,1\n", r"line 2: empty prompt_id"),
    ("prompt_id,sample_index,label\np1,0,1\np1,0,0\n", r"line 3: conflicting labels"),
    ("prompt_id,label\np1,1\n", r"missing column\(s\) \['sample_index'\]"),
])
def test_bad_label_rows_are_named(tmp_path, body, match):
    path = tmp_path / "labels.csv"
    path.write_text(body)
    with pytest.raises(LabelError, match=match):
        import_labels(str(path))


def test_bad_label_files(pooled, tmp_path):
    with pytest.raises(LabelError, match="not found"):
        import_labels(str(tmp_path / "nope.csv"))
    with pytest.raises(LabelError, match=".csv or .parquet"):
        import_labels(str(tmp_path / "labels.txt"))
    stray = pd.DataFrame({"prompt_id": ["zz"], "sample_index": [0], "label": [1]})
    with pytest.raises(LabelError, match="not in this pool"):
        apply_labels(pooled, stray)
