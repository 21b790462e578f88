"""The driver's pool stage (no Ray): human labels in the run dir override the judge."""

from types import SimpleNamespace

from pipelines.config import config_from_dict
from pipelines.rounds import pool
from pipelines.store import RunStore


def judged_rows():
    rows = []
    for pid, scores in (("p1", [0.9, 0.1]), ("p2", [0.2, 0.3])):
        for i, s in enumerate(scores):
            rows.append(dict(prompt_id=pid, prompt=f"prompt {pid}", category="single", round=1, sample_index=i,
                             seed=i, image_tokens=[1, 2], png=b"\x89PNG", score=s, valid=True, answer=""))
    return rows


def test_labels_file_overrides_the_judge(tmp_path):
    import pandas as pd

    cfg = config_from_dict({"pools": {"review_sample": 0}})
    store = RunStore(str(tmp_path), "r")
    store.init(cfg)
    ctx = SimpleNamespace(cfg=cfg, store=store)
    prompts = [{"prompt_id": "p1", "replayed": False}, {"prompt_id": "p2", "replayed": True}]
    result, info = pool(ctx, 1, pd.DataFrame(judged_rows()), prompts)
    assert (info["accepted"], info["discarded_prompts"], info["admitted"]) == (1, 1, 0)
    store.write_bytes("labels/round_1.csv", b"prompt_id,sample_index,label\np2,1,1\n")
    result, info = pool(ctx, 1, pd.DataFrame(judged_rows()), prompts)
    row = result.data.set_index(["prompt_id", "sample_index"]).loc[("p2", 1)]
    assert row["pool"] == "accepted" and row["label_source"] == "human"
    assert (info["accepted"], info["discarded_prompts"], info["admitted"]) == (2, 0, 1)
    assert result.accepted_prompt_ids == ["p1", "p2"]
