"""Prompt sources: each format, every skip reason counted, hard errors for unusable sources."""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.prompts import (CONTRADICTION_CATEGORY, PromptSourceError, load_prompts, prompt_id,
                               prompts_from_config)
from pipelines.schemas import check_table


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_jsonl_every_skip_reason_is_counted(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "a red circle", "category": "single"},
        {"prompt": "two blue squares"},                     # no id: sha1 id, default category
        {"prompt": "   "},                                  # empty
        {"prompt": 42},                                     # not_text
        {"prompt": "one two three four five six"},          # too_long (budget 5)
        {"id": "a", "prompt": "a green triangle"},          # duplicate_id
        {"text": "no prompt key"},                          # missing_prompt
        "{not json",                                        # malformed
        "",                                                 # blank line: not a row
        {"prompt": "a square", "split": "heldout"},         # other_split
    ])
    rows, report = load_prompts(src, max_tokens=5)
    assert [r["prompt"] for r in rows] == ["a red circle", "two blue squares"]
    assert rows[1]["prompt_id"] == prompt_id("two blue squares") and rows[1]["category"] == "uncategorized"
    assert dict(report.skipped) == {"empty": 1, "not_text": 1, "too_long": 1, "duplicate_id": 1,
                                    "missing_prompt": 1, "malformed": 1, "other_split": 1}
    assert report.read == 9 and report.kept == 2
    assert report.examples["malformed"] == [f"{src}:8"]  # points at the line
    check_table(rows, "prompt", "prompts")


def test_custom_token_counter_and_limit(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt number {i}"} for i in range(5)])
    rows, report = load_prompts(src, max_tokens=10, count_tokens=lambda t: len(t), limit=2)
    assert rows == [] and report.skipped["too_long"] == 5
    rows, report = load_prompts(src, limit=2)
    assert len(rows) == 2 and report.kept == 2 and report.read == 2  # reading stops at the limit


def test_undecodable_bytes_and_forbidden_characters_are_bad_rows_with_their_line(tmp_path):
    lines = [json.dumps({"prompt": "a red circle"}).encode(),
             b'{"prompt": "a blue \xff square"}',                       # 2: not UTF-8
             json.dumps({"prompt": "a green\u0000 triangle"}).encode(),  # 3: NUL
             b'{"prompt": "half a \\ud800 pair"}',                     # 4: lone surrogate (JSON escape)
             json.dumps({"prompt": "two\nlines"}).encode(),             # 5: control character
             json.dumps({"prompt": "\u00e9t\u00e9 \U0001F600 circle"}).encode()]  # 6: fine
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, report = load_prompts(str(path))
    assert [r["prompt"] for r in rows] == ["a red circle", "\u00e9t\u00e9 \U0001F600 circle"]
    assert dict(report.skipped) == {"bad_encoding": 1, "bad_characters": 3}
    assert report.examples["bad_encoding"] == [f"{path}:2"]
    assert report.examples["bad_characters"] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert report.read == 6

    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b"prompt,category\na red circle,single\na \xfe\xff square,single\nan\x00x,single\n"
                         b"a blue square,single\n")
    rows, report = load_prompts(str(csv_path))
    assert [r["prompt"] for r in rows] == ["a red circle", "a blue square"]
    assert dict(report.skipped) == {"bad_encoding": 1, "bad_characters": 1}
    assert report.examples["bad_encoding"] == [f"{csv_path}:3"]


def test_csv_source(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,category\n7,a red circle,single\n8,,single\n9,\"a, b, c\",counting\n")
    rows, report = load_prompts(str(path))
    assert [(r["prompt_id"], r["prompt"]) for r in rows] == [("7", "a red circle"), ("9", "a, b, c")]
    assert report.skipped == {"empty": 1} and report.examples["empty"] == [f"{path}:3"]


def test_parquet_source_with_bad_rows(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle", None, "a red circle", "x"],
                             "category": ["single", "single", "single", None]}), path)
    rows, report = load_prompts(str(path))
    assert [r["prompt"] for r in rows] == ["a red circle", "x"]
    assert rows[1]["category"] == "uncategorized"
    assert report.skipped == {"missing_prompt": 1, "duplicate_id": 1}


def test_contradiction_log_and_extra_sources(tmp_path):
    log = tmp_path / "contradictions.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle", "two blue squares", "two blue squares"],
                             "png": [b"\x89PNG"] * 3, "score": [0.1, 0.2, 0.3], "round": [1, 1, 1],
                             "time": [1.0, 2.0, 3.0]}), log)
    main = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle", "category": "single"}])
    rows, report = load_prompts(main, extra_sources=[str(log)])
    assert [(r["prompt"], r["category"]) for r in rows] == [
        ("a red circle", "single"), ("two blue squares", CONTRADICTION_CATEGORY)]
    assert report.skipped == {"duplicate_id": 2} and report.sources == [main, str(log)]


def test_file_uri(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}])
    rows, _ = load_prompts(f"file://{src}")
    assert rows[0]["prompt"] == "a red circle"


@pytest.mark.parametrize("content, name, match", [
    (None, "missing.jsonl", "not found"),
    ("prompt\n", "p.txt", "unknown prompt source"),
    ("text,category\na,b\n", "p.csv", "no 'prompt' column"),
    ('{"text": "a"}\n', "p.jsonl", "no 'prompt' field"),
])
def test_unusable_sources_raise(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptSourceError, match=match):
        load_prompts(str(path))


def test_parquet_without_prompt_column_raises(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(PromptSourceError, match="no 'prompt' column"):
        load_prompts(str(path))


def test_shapes_hook_with_a_fake_world(monkeypatch):
    import sys
    import types
    from dataclasses import dataclass

    @dataclass
    class Spec:
        text: str
        category: str

    fake = types.ModuleType("shapes.world")
    fake.train_prompts = lambda: [Spec("a red circle", "single"), Spec("", "single")]
    fake.heldout_prompts = lambda: ["two blue squares", {"text": "a square", "category": "shape"}]
    monkeypatch.setitem(sys.modules, "shapes.world", fake)
    rows, report = load_prompts("shapes", split="all")
    assert [(r["prompt"], r["category"]) for r in rows] == [
        ("a red circle", "single"), ("two blue squares", "uncategorized"), ("a square", "shape")]
    assert report.skipped == {"empty": 1}
    fake.heldout_prompts = None
    with pytest.raises(PromptSourceError, match="heldout_prompts"):
        load_prompts("shapes", split="heldout")


@pytest.mark.skipif(importlib.util.find_spec("shapes") is None
                    or importlib.util.find_spec("shapes.world") is None,
                    reason="shapes.world not written yet (another engineer's package)")
def test_real_shapes_world():
    cfg = load_config(None)
    train, report = prompts_from_config(cfg.prompts)
    heldout, _ = load_prompts("shapes", split="heldout")
    assert train and heldout and report.kept == len(train)
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in heldout}
    check_table(train, "prompt", "prompts")


def test_rounds_take_rotating_slices_of_a_seeded_shuffle(tmp_path):
    from types import SimpleNamespace

    from pipelines.prompts import prompt_table
    from pipelines.rounds import load_prompt_sets, read_prompt_sets, round_prompts
    from pipelines.store import RunStore

    def rounds(*overrides, name):
        cfg = load_config(None, [f"run.root={tmp_path}", f"run.name={name}", "prompts.per_round=50", *overrides])
        train, heldout = load_prompt_sets(cfg, RunStore.from_config(cfg))
        table, heldout_t, _ = read_prompt_sets(cfg, as_table=True)  # the driver's form: same rows, same order
        assert table.to_pylist() == train and heldout_t == heldout
        ctx = SimpleNamespace(cfg=cfg, prompts=train, store=None)
        slices = [round_prompts(ctx, k)["prompt_id"].to_pylist() for k in (1, 2, 3)]
        as_table = SimpleNamespace(cfg=cfg, prompts=prompt_table(train), store=None)  # what the driver keeps
        assert [round_prompts(as_table, k)["prompt_id"].to_pylist() for k in (1, 2, 3)] == slices
        return train, heldout, slices

    plain, heldout, _ = rounds("prompts.shuffle=false", name="plain")
    a, heldout_a, slices = rounds("run.seed=1", name="a")
    b, _, slices_b = rounds("run.seed=1", name="b")
    c, _, _ = rounds("run.seed=2", name="c")
    ids = [r["prompt_id"] for r in plain]
    assert sorted(r["prompt_id"] for r in a) == sorted(ids) and [r["prompt_id"] for r in a] != ids
    assert slices == slices_b and [r["prompt_id"] for r in c] != [r["prompt_id"] for r in a]  # seeded
    assert heldout_a == heldout  # evaluation prompts are never reordered
    assert all(len(s) == 50 for s in slices) and len(set(sum(slices, []))) == 150  # disjoint slices
    # The unshuffled shapes list is grouped by category (no spatial prompt in its first 50); a
    # shuffled first round has about the list's share of them (74 %).
    assert sum(r["category"] == "spatial" for r in plain[:50]) == 0
    assert sum(r["category"] == "spatial" for r in a[:50]) >= 25


def test_oracle_audit_takes_a_file_of_shapes_prompts_and_names_a_foreign_one(tmp_path):
    from pipelines.rounds import load_prompt_sets
    from pipelines.store import RunStore

    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "a red circle", "split": "train"},
                                             {"prompt": "a blue square", "split": "heldout"}])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a red circle", "split": "train"},
                                           {"prompt": "a cat on a mat", "split": "heldout"}])
    for name, src in (("good", good), ("bad", bad)):
        cfg = load_config(None, [f"run.root={tmp_path}", f"run.name={name}", f"prompts.source={src}"])
        assert cfg.audit.backend == "oracle"
        if name == "good":
            train, heldout = load_prompt_sets(cfg, RunStore.from_config(cfg))
            assert [r["prompt"] for r in heldout] == ["a blue square"] and len(train) == 1
        else:
            with pytest.raises(ValueError, match=r"audit.backend=oracle .*'a cat on a mat'"):
                load_prompt_sets(cfg, RunStore.from_config(cfg))


def test_the_prompt_text_rule_is_exactly_control_characters_and_surrogates():
    import unicodedata

    from pipelines.schemas import prompt_text_problem

    refused = [c for c in range(0x110000) if prompt_text_problem(f"a{chr(c)}b")]
    assert refused == [c for c in range(0x110000) if unicodedata.category(chr(c)) in ("Cc", "Cs")]
    assert prompt_text_problem("   ") == "is empty"
    assert prompt_text_problem("\u00e9t\u00e9 \U0001F600 \u200b ok") is None  # scripts, emoji, format chars


def test_contradiction_log_rows_follow_the_same_rule(tmp_path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle", "a nul\x00 here", "a blue square"], "score": [0.1, 0.2, 0.3],
                             "round": [1, 1, 1], "png": [b"", b"", b""]}), path)
    rows, report = load_prompts(str(path))
    assert [r["prompt"] for r in rows] == ["a red circle", "a blue square"]
    assert report.skipped["bad_characters"] == 1 and report.examples["bad_characters"] == [f"{path}#row1"]


def test_a_category_mix_composes_each_round_and_names_unknown_categories(tmp_path):
    from pipelines.prompts import prompt_table
    from pipelines.rounds import mixed_slice, read_prompt_sets

    prompts = [{"prompt_id": f"{c}{i}", "category": c} for c, m in (("spatial", 10), ("counting", 4), ("single", 6))
               for i in range(m)]
    rounds = [mixed_slice(prompts, {"spatial": 0.5, "counting": 0.25, "single": 0.25}, 8, k) for k in (1, 2, 3)]
    for chosen in rounds:
        cats = [p["category"] for p in chosen]
        assert (cats.count("spatial"), cats.count("counting"), cats.count("single")) == (4, 2, 2)
        assert len({p["prompt_id"] for p in chosen}) == 8
    assert [p["prompt_id"] for p in rounds[2] if p["category"] == "counting"] == ["counting0", "counting1"]  # wraps
    table = prompt_table(prompts)  # the driver's form of the prompts: the same slices
    assert [mixed_slice(table, {"spatial": 0.5, "counting": 0.25, "single": 0.25}, 8, k).to_pylist()
            for k in (1, 2, 3)] == [prompt_table(r).to_pylist() for r in rounds]
    cfg = load_config(None, [f"run.root={tmp_path}", "prompts.category_mix={spatial: 1, nosuch: 1}"])
    with pytest.raises(ValueError, match=r"prompts.category_mix names categories no training prompt has: \['nosuch'\]"):
        read_prompt_sets(cfg)


def test_the_validation_slice_is_the_same_whatever_the_order_and_never_trained_on():
    import random

    from pipelines.rounds import split_validation

    from pipelines.prompts import prompt_table

    prompts = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "category": "c"} for i in range(50)]
    train, val = split_validation(prompts, 5)
    shuffled = prompts[:]
    random.Random(3).shuffle(shuffled)
    train2, val2 = split_validation(shuffled, 5)
    assert val == val2 and len(val) == 5 and len(train) == 45
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in val}
    assert [r["prompt_id"] for r in train2] == [r["prompt_id"] for r in shuffled if r not in val]  # order kept
    as_table, val3 = split_validation(prompt_table(shuffled), 5)  # the driver's form: the same split
    assert val3 == val2 and as_table.to_pylist() == train2
    assert split_validation(prompts, 0) == (prompts, [])
    with pytest.raises(ValueError, match="eval.validation_prompts=50 leaves no training prompts"):
        split_validation(prompts, 50)
