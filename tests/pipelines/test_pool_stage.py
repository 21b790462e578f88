"""The driver's pool stage (no Ray): human labels in the run dir override the judge; the judged rows'
PNGs stay in storage except the few the review export fetches."""

from types import SimpleNamespace

import pandas as pd

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
    row = result.data.set_index(["prompt_id", "sample_index"]).loc[("p2", 1)]
    assert row["pool"] == "accepted" and row["label_source"] == "human"
    assert (info["accepted"], info["discarded_prompts"], info["admitted"]) == (2, 0, 1)
    assert result.accepted_prompt_ids == ["p1", "p2"]


def test_pools_hold_no_images_and_the_review_export_fetches_its_own(tmp_path):
    ctx = setup(tmp_path, review_sample=2, review_seed=0)
    scores = (("p1", [0.9, 0.5]), ("p2", [0.45, 0.1]), ("p3", [0.55, 0.5]))
    result, info = pool(ctx, 1, stored(ctx.store, judged_rows(scores)), [{"prompt_id": p} for p, _ in scores])
    assert "png" not in result.data.columns and info["uncertain"] == 4
    review = pd.read_parquet(tmp_path / "r" / "round_1" / "review" / "review.parquet")
    assert len(review) == 2
    for r in review.itertuples():  # each exported image is its own row's, read back from the judge stage
        assert r.png == f"png {r.prompt_id} {r.sample_index}".encode()
