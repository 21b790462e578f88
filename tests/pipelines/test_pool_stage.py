"""The driver's pool stage (Ray only for category_cap's task): human labels in the run dir override the
judge; the judged rows' PNGs stay in storage except the few the review export fetches; pooled a range of
prompts at a time, the driver never holds more than one chunk of rows and the tables equal pooling all
rows at once."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipelines import pooling
from pipelines.config import config_from_dict
from pipelines.results import StageRows
from pipelines.rounds import pool
from pipelines.store import RunStore


def judged_rows(scores=(("p1", [0.9, 0.1]), ("p2", [0.2, 0.3]))):
    rows = []
    for pid, values in scores:
        for i, s in enumerate(values):
            rows.append(dict(prompt_id=pid, prompt=f"prompt {pid}", category="single", round=1, sample_index=i,
                             seed=i, image_tokens=[1, 2], png=f"png {pid} {i}".encode(), score=s, valid=True,
                             answer=""))
    return rows


def stored(store, rows):
    """The judged rows as the judge stage leaves them: in the run store, the driver holding a handle."""
    store.write_table(1, "judge", pd.DataFrame(rows))
    return StageRows(1, "judge", len(rows))


def setup(tmp_path, **pools):
    cfg = config_from_dict({"pools": pools})
    store = RunStore(str(tmp_path), "r")
    store.init(cfg)
    return SimpleNamespace(cfg=cfg, store=store)


def test_labels_file_overrides_the_judge(tmp_path):
    ctx = setup(tmp_path, review_sample=0)
    store = ctx.store
    prompts = [{"prompt_id": "p1", "replayed": False}, {"prompt_id": "p2", "replayed": True}]
    result, info = pool(ctx, 1, stored(store, judged_rows()), prompts)
    assert (info["accepted"], info["discarded_prompts"], info["admitted"]) == (1, 1, 0)
    store.write_bytes("labels/round_1.csv", b"prompt_id,sample_index,label\np2,1,1\n")
    result, info = pool(ctx, 1, stored(store, judged_rows()), prompts)
    row = result.table(store, "data").set_index(["prompt_id", "sample_index"]).loc[("p2", 1)]
    assert row["pool"] == "accepted" and row["label_source"] == "human"
    assert (info["accepted"], info["discarded_prompts"], info["admitted"]) == (2, 0, 1)
    assert result.table(store, "accepted")["prompt_id"].tolist() == ["p1", "p2"]
    assert result.table(store, "discard").empty and result.counts["sft"] == 2


def test_pools_hold_no_images_and_the_review_export_fetches_its_own(tmp_path):
    ctx = setup(tmp_path, review_sample=2, review_seed=0)
    scores = (("p1", [0.9, 0.5]), ("p2", [0.45, 0.1]), ("p3", [0.55, 0.5]))
    result, info = pool(ctx, 1, stored(ctx.store, judged_rows(scores)), [{"prompt_id": p} for p, _ in scores])
    assert "png" not in result.table(ctx.store, "data").columns and info["uncertain"] == 4
    review = pd.read_parquet(tmp_path / "r" / "round_1" / "review" / "review.parquet")
    assert len(review) == 2
    for r in review.itertuples():  # each exported image is its own row's, read back from the judge stage
        assert r.png == f"png {r.prompt_id} {r.sample_index}".encode()


def many_rows(n_prompts=12, n=3, seed=0):
    rng = np.random.default_rng(seed)
    scores = tuple((f"p{i:02d}", rng.choice([0.05, 0.2, 0.5, 0.7, 0.95], size=n).tolist()) for i in range(n_prompts))
    rows = judged_rows(scores)
    for r in rows:
        r["category"] = ["single", "counting", "spatial"][int(r["prompt_id"][1:]) % 3]
    return scores, rows


@pytest.mark.parametrize("pools", [{}, {"sft_select": "best_of_n", "category_cap": 0.4}])
def test_pooled_chunk_by_chunk_the_driver_holds_one_chunk_and_the_tables_match_one_pass(tmp_path, pools,
                                                                                       counting_store, request):
    if pools:  # category_cap reads the whole SFT set in a Ray task (pipelines/pooling.py: whole_round)
        request.getfixturevalue("ray_session")
    scores, rows = many_rows()
    prompts = [{"prompt_id": p, "replayed": i % 4 == 0} for i, (p, _) in enumerate(scores)]
    out = {}
    for size in (2, 100):
        cfg = config_from_dict({"pools": {"review_sample": 2, "review_seed": 3, **pools},
                                "pairs": {"strategy": "all", "max_pairs_per_prompt": 2}})
        store = counting_store(str(tmp_path), f"s{size}")
        store.init(cfg)
        store.write_table(1, "judge", pd.DataFrame(rows))
        store.write_bytes("labels/round_1.csv", b"prompt_id,sample_index,label\np03,0,1\np07,2,0\n")
        store.most = 0
        result, info = pooling.pool_stage(store, cfg, 1, StageRows(1, "judge", len(rows)), prompts, size=size)
        most = store.most
        tables = {name: result.table(store, name) for name in ("data", "sft", "pairs", "discard", "accepted")}
        review = pd.read_parquet(tmp_path / f"s{size}" / "round_1" / "review" / "review.parquet")
        out[size] = (result, info, tables, review, most)
    (small, info, tables, review, most), (big, info_big, tables_big, review_big, _) = out[2], out[100]
    assert most <= 2 * 3 < len(rows)  # two prompts x three samples (and the review's 2 prompts' PNGs) at most
    assert info == info_big and small.counts == big.counts and small.nonunified == big.nonunified
    assert info["uncertain"] > 2 and len(review) == 2 and info["pairs"] > 0 and info["discarded_prompts"] > 0
    for name, df in tables.items():
        pd.testing.assert_frame_equal(df, tables_big[name], check_dtype=False, obj=name)
    pd.testing.assert_frame_equal(review, review_big)
    if pools:  # the cap applies to the whole SFT set
        assert tables["sft"]["category"].value_counts().max() <= 0.4 * len(tables["sft"]) + 1
    human = tables["data"][tables["data"]["label_source"] == "human"]
    assert human[["prompt_id", "sample_index", "pool"]].values.tolist() == [["p03", 0, "accepted"],
                                                                            ["p07", 2, "rejected"]]


def test_labels_for_prompts_not_in_the_round_are_refused(tmp_path):
    from pipelines.review import LabelError

    ctx = setup(tmp_path, review_sample=0)
    ctx.store.write_bytes("labels/round_1.csv", b"prompt_id,sample_index,label\nzz,0,1\n")
    with pytest.raises(LabelError, match="not in this pool: \\['zz'\\]"):
        pool(ctx, 1, stored(ctx.store, judged_rows()), [{"prompt_id": "p1"}, {"prompt_id": "p2"}])
