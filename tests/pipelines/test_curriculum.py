"""The curriculum (C-SFT / C-DPO, Algorithm 2) as pure functions, and read back from a real run store."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.rounds import RESULT_KEY, curriculum, open_discards, pool_history, rotating_slice
from pipelines.store import RunStore

PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "category": "c" if i % 2 else "d"} for i in range(10)]


def test_replay_adds_open_discards_after_the_slice_once_and_capped():
    chosen = rotating_slice(PROMPTS, 3, 1)  # p0 p1 p2
    discarded = [PROMPTS[2], PROMPTS[7], PROMPTS[8], PROMPTS[9]]
    rows = curriculum(chosen, discarded, max_replay=2).to_pylist()
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2", "p7", "p8"]  # p2 is in the slice already
    assert [r["replayed"] for r in rows] == [False] * 3 + [True] * 2
    assert len(curriculum(chosen, discarded, None)) == 6
    assert curriculum(chosen, [], None).to_pylist() == [{**r, "replayed": False} for r in chosen]
    assert curriculum(chosen, discarded, 0).num_rows == 3


def test_a_prompt_leaves_the_discard_pool_when_accepted_and_comes_back_when_discarded_again():
    d = lambda *ids: [PROMPTS[int(i[1:])] for i in ids]  # noqa: E731
    history = [(d("p1", "p2"), ["p3"]),  # round 1: p1, p2 discarded
               (d("p4"), ["p1"]),  # round 2: p1 admitted (accepted on replay)
               (d("p1"), [])]  # round 3: p1 discarded again
    assert [r["prompt_id"] for r in open_discards(history[:1])] == ["p1", "p2"]
    assert [r["prompt_id"] for r in open_discards(history[:2])] == ["p2", "p4"]
    assert [r["prompt_id"] for r in open_discards(history)] == ["p2", "p4", "p1"]


def test_pool_history_reads_finished_pool_stages_from_the_run_store(tmp_path):
    store = RunStore(str(tmp_path), "cur")
    store.init(load_config(None, [f"run.root={tmp_path}"]))
    for j, (discard, accepted) in {1: (["p1", "p2"], []), 2: (["p5"], ["p1"])}.items():
        rows = [{**PROMPTS[int(p[1:])], "round": j} for p in discard]
        store.write_table(j, "pool", rows, name="discard")
        store.mark_done(j, "pool", {RESULT_KEY: {"accepted_prompt_ids": accepted}})
    store.write_table(3, "pool", [{**PROMPTS[9], "round": 3}], name="discard")  # crashed: no done marker
    history = pool_history(store, 4)
    assert [([r["prompt_id"] for r in rows], acc) for rows, acc in history] == [(["p1", "p2"], []), (["p5"], ["p1"])]
    assert [r["prompt_id"] for r in open_discards(history)] == ["p2", "p5"]
    assert pool_history(store, 2) == history[:1]


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_rotating_slices_cover_the_prompts_without_repeats_within_a_round(k):
    ids = [r["prompt_id"] for r in rotating_slice(PROMPTS, 4, k)]
    assert len(ids) == len(set(ids)) == 4
    covered = {r["prompt_id"] for j in range(k, k + 3) for r in rotating_slice(PROMPTS, 4, j)}
    assert covered == {p["prompt_id"] for p in PROMPTS}  # 3 rounds of 4 cover all 10
