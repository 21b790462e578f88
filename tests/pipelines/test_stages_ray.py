"""Ray Data stages on real local Ray with the tiny model: determinism, schemas, a killed actor."""

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from pipelines import stages
from pipelines.config import config_from_dict
from pipelines.schemas import SchemaError
from pipelines.rounds import run_stage
from pipelines.stages import generate_table, judge_table
from pipelines.store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

PROMPTS = [{"prompt_id": f"p{i}", "prompt": p, "category": c} for i, (p, c) in enumerate([
    ("a red circle", "single"), ("two blue squares", "counting"), ("a green triangle", "single"),
    ("a yellow circle left of a red square", "spatial"), ("a square", "shape")])]


def make_cfg(**sections):
    base = {"model": {"path": "tiny", "device": "cpu"}, "prompts": {"source": "prompts.jsonl"},
            "audit": {"backend": "vlm", "vlm_path": "unused"},
            "generate": {"num_images": 2, "batch_size": 2}, "judge": {"mode": "prob", "batch_size": 4}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base)


@pytest.fixture(scope="module")
def reference(ray_session):
    cfg = make_cfg()
    samples = generate_table(PROMPTS, cfg, round_=1)
    return cfg, samples, judge_table(samples, cfg)


def test_generate_rows_are_complete_and_typed(reference):
    _, samples, _ = reference
    assert len(samples) == len(PROMPTS) * 2
    assert samples.groupby("prompt_id")["sample_index"].apply(sorted).tolist() == [[0, 1]] * len(PROMPTS)
    assert all(len(t) == 16 for t in samples["image_tokens"])
    assert all(bytes(p[:8]) == b"\x89PNG\r\n\x1a\n" for p in samples["png"])
    assert samples["seed"].nunique() == len(samples)


def test_same_output_with_two_actors_and_other_batch_sizes(reference):
    cfg, samples, judged = reference
    cfg2 = make_cfg(generate={"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 3},
                    judge={"batch_size": 3})
    samples2 = generate_table(PROMPTS, cfg2, round_=1)
    pd.testing.assert_frame_equal(samples[["prompt_id", "sample_index", "seed"]],
                                  samples2[["prompt_id", "sample_index", "seed"]])
    assert samples["image_tokens"].tolist() == samples2["image_tokens"].tolist()
    assert samples["png"].tolist() == samples2["png"].tolist()
    judged2 = judge_table(samples2, cfg2)
    np.testing.assert_allclose(judged["score"], judged2["score"], atol=1e-5)
    # another round draws other samples
    other = generate_table(PROMPTS[:1], cfg, round_=2)
    assert other["image_tokens"].tolist() != samples["image_tokens"].tolist()[:2]


def test_more_samples_for_named_categories_extend_the_same_streams(reference):
    cfg, samples, _ = reference
    more = generate_table(PROMPTS, make_cfg(generate={"num_images_by_category": {"spatial": 4, "counting": 3}}),
                          round_=1)
    n = more.groupby("prompt_id")["sample_index"].max() + 1
    assert n.to_dict() == {"p0": 2, "p1": 3, "p2": 2, "p3": 4, "p4": 2}
    # sample i of a prompt is the same whatever N: the first two of every prompt are the reference's
    head = more[more["sample_index"] < 2].reset_index(drop=True)
    assert head["image_tokens"].tolist() == samples["image_tokens"].tolist()
    assert head["seed"].tolist() == samples["seed"].tolist()


def test_fused_generate_judge_gives_the_two_pool_rows(reference):
    """judge.fused: the generating actors judge their own samples; same rows as generate then judge."""
    cfg, _, judged = reference
    fused = generate_table(PROMPTS, make_cfg(generate={"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 3},
                                             judge={"batch_size": 2}), round_=1, judge=True)
    same = ["prompt_id", "sample_index", "seed", "valid", "judge_mode"]
    pd.testing.assert_frame_equal(judged[same], fused[same])
    assert fused["image_tokens"].tolist() == judged["image_tokens"].tolist()
    assert fused["png"].tolist() == judged["png"].tolist()
    np.testing.assert_allclose(judged["score"], fused["score"], atol=1e-5)
    assert set(fused.columns) == set(judged.columns)


def _forbid(*args, **kwargs):
    raise AssertionError("the driver collected a Dataset's rows")


@pytest.fixture
def no_driver_collect(monkeypatch):
    """Every way of pulling a Dataset's rows into the driver fails the test while it is active."""
    import ray

    for name in ("to_pandas", "take_all", "take", "iter_rows", "iter_batches", "to_arrow_refs"):
        monkeypatch.setattr(ray.data.Dataset, name, _forbid)


@pytest.mark.parametrize("fused,corrupt", [(False, "none"), (True, "inverted")])
def test_stages_stream_rows_from_the_workers_to_storage(reference, tmp_path, no_driver_collect, fused, corrupt):
    """The driver's generate and judge stages: the workers write the rows (Parquet part files), the
    driver collects none; they equal the collected tables (generate_table / judge_table); a fused judge
    with nothing to add keeps the generate stage's rows instead of copying them."""
    from types import SimpleNamespace

    from pipelines import rounds

    cfg, samples, judged = reference
    cfg = make_cfg(judge={"fused": fused, "corrupt": corrupt})
    store = RunStore(str(tmp_path), "s")
    store.init(cfg)
    ctx = SimpleNamespace(cfg=cfg, store=store)
    gen, info = rounds.generate(ctx, PROMPTS, 1, None)
    assert gen.rows == info["rows"] == len(samples)
    parts = os.listdir(tmp_path / "s" / "round_1" / "generate" / "data")
    assert parts and all(p.endswith(".parquet") for p in parts)
    got = gen.frame(store, images=True)
    assert got["image_tokens"].map(list).tolist() == samples["image_tokens"].tolist()
    assert got["png"].tolist() == samples["png"].tolist()
    assert "png" not in gen.frame(store).columns
    out, info = rounds.judge(ctx, gen, 1, None, PROMPTS)
    assert out.rows == len(samples) and info["fused"] == fused
    rows = out.frame(store)
    assert rows[["prompt_id", "sample_index"]].values.tolist() == judged[["prompt_id", "sample_index"]].values.tolist()
    own = judged["score"].to_numpy()
    np.testing.assert_allclose(rows["score"], 1.0 - own if corrupt == "inverted" else own, atol=1e-5)
    if corrupt == "inverted":
        np.testing.assert_allclose(rows["raw_score"], own, atol=1e-5)
    assert info["nonunified"] == pytest.approx(stages_nonunified(rows))


def test_the_driver_reads_at_most_one_chunk_of_rows_per_stage(reference, tmp_path, no_driver_collect,
                                                              counting_store):
    """generate -> judge (a separate judge pool) -> pool with pools.chunk_prompts=2: the driver's
    exactly-once checks, Nonunified counts and pooling read 2 prompts x 2 samples at a time, never the
    round's 10 rows, and the counts still cover every row; the train stage reads none on the driver
    (a Ray task reads, checks and packs them for the training workers)."""
    from types import SimpleNamespace

    from pipelines import improve, rounds

    _, samples, judged = reference
    cfg = make_cfg(judge={"fused": False}, pools={"chunk_prompts": 2, "review_sample": 1, "accept_threshold": 0.0,
                                                  "reject_threshold": 0.0},
                   train={"epochs": 1, "batch_size": 2, "num_workers": 2})
    store = counting_store(str(tmp_path), "c")
    store.init(cfg)
    ctx = SimpleNamespace(cfg=cfg, store=store)
    gen, _ = rounds.generate(ctx, PROMPTS, 1, None)
    out, info = rounds.judge(ctx, gen, 1, None, PROMPTS)
    pooled, pinfo = rounds.pool(ctx, 1, out, PROMPTS)
    assert 0 < store.most <= 2 * 2 < len(samples)
    assert pooled.counts["samples"] == len(samples) == sum(pinfo[x] for x in ("accepted", "rejected", "uncertain"))
    assert info["nonunified"] == pytest.approx(stages_nonunified(judged))
    assert pooled.nonunified["nonunified/rate"] == pytest.approx(info["nonunified"])
    store.most = 0
    trained, tinfo = improve.train(ctx, 1, pooled, None)
    assert store.most == 0 and trained.adapter_round == 1
    assert tinfo["rows"] == pooled.counts["sft"] == len(samples) and tinfo["steps"] == 3  # ceil(5 rows per rank / 2)
    assert (tmp_path / "c" / "adapters" / "round_1" / "adapter_model.safetensors").is_file()


def stages_nonunified(rows):
    from pipelines.pools import nonunified_score

    return nonunified_score(rows).overall.rate


def test_a_retried_write_replaces_its_part_and_a_row_written_twice_fails_the_stage(reference, tmp_path):
    """Part files are named by their rows' keys: writing the same batches again (a retried task)
    replaces them, so each row is there once; the same rows under another batching are a second copy,
    and write_rows' exactly-once check fails the stage."""
    import ray

    cfg, samples, _ = reference
    store = RunStore(str(tmp_path), "d")
    store.init(cfg)
    ds = ray.data.from_pandas(samples)
    ids = sorted(set(samples["prompt_id"]))
    stages.write_rows(ds, store, 1, "generate", len(samples), "sample", ids)
    parts = sorted(os.listdir(tmp_path / "d" / "round_1" / "generate" / "data"))
    stages.write_rows(ds, store, 1, "generate", len(samples), "sample", ids)  # the retry: same parts, once each
    assert sorted(os.listdir(tmp_path / "d" / "round_1" / "generate" / "data")) == parts
    with pytest.raises(RuntimeError, match=r"found 10 \(0 duplicated, 2 of other prompts\)"):
        stages.write_rows(ds, store, 1, "generate", len(samples) - 2, "sample", ids[1:])  # a stray prompt's rows
    with pytest.raises(RuntimeError, match=r"exactly once .* \(10 duplicated, 0 of other prompts\)"):
        stages.write_rows(ds.repartition(3), store, 1, "generate", len(samples), "sample", ids)


def test_judge_adds_scores(reference):
    _, samples, judged = reference
    assert len(judged) == len(samples) and judged["valid"].all()
    assert judged["score"].between(0, 1).all() and judged["score"].nunique() > 1
    assert (judged["judge_mode"] == "prob").all()


def test_schema_violations_fail_loudly_naming_stage_and_column(reference):
    cfg, samples, _ = reference
    with pytest.raises(SchemaError, match="stage 'generate': missing column 'category'"):
        generate_table([{"prompt_id": "x", "prompt": "a red circle"}], cfg, round_=1)
    bad = samples.copy()
    bad["png"] = "not an image"
    with pytest.raises(SchemaError, match="stage 'judge': column 'png' has type .*string, expected binary"):
        judge_table(bad, cfg)


def _worker_pids(class_name):
    """PIDs of this session's Ray actor processes running `class_name` (Ray titles them ray::...)."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):  # only our own Ray, never another's
        try:
            if class_name in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


class SlowGenerateUDF(stages.GenerateUDF):
    """The real generation actor, slowed down so the test can kill it mid-stage."""

    def generate(self, batch):
        out = super().generate(batch)
        time.sleep(1.0)
        return out


@pytest.fixture
def slow_generation(monkeypatch):
    import sys

    import ray.cloudpickle

    monkeypatch.setattr(stages, "GenerateUDF", SlowGenerateUDF)
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the actors cannot import this test file
    yield
    ray.cloudpickle.unregister_pickle_by_value(module)


def test_killed_actor_loses_and_duplicates_nothing(reference, tmp_path, slow_generation):
    from types import SimpleNamespace

    from pipelines import rounds

    _, samples, _ = reference
    cfg = make_cfg(judge={"fused": False})  # the generate stage's actors are GenerateUDF (slowed)
    store = RunStore(str(tmp_path), "killed")
    store.init(cfg)
    ctx = SimpleNamespace(cfg=cfg, store=store)
    killed = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pids = _worker_pids("GenerateUDF")
            if pids:
                time.sleep(1.5)  # let it take a batch or two first
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    compute = lambda: rounds.generate(ctx, PROMPTS, 1, None)  # noqa: E731  (the actors write to the store)
    try:
        out = run_stage(store, 1, "generate", compute)
    except Exception:  # failing loudly is allowed; then a rerun must complete
        assert not store.is_done(1, "generate")
        out = run_stage(store, 1, "generate", compute)
    t.join()
    assert killed, "the test never saw a generate actor to kill"
    assert store.is_done(1, "generate")
    rows = out.frame(store, images=True)
    assert rows[["prompt_id", "sample_index"]].value_counts().max() == 1
    assert rows["image_tokens"].map(list).tolist() == samples["image_tokens"].tolist()
    again = run_stage(store, 1, "generate", lambda: pytest.fail("a finished stage must not recompute"))
    assert again.frame(store, images=True)["png"].tolist() == samples["png"].tolist()


def test_sharded_evaluation_gives_the_same_rows_and_metrics(ray_session):
    """eval.num_shards: the held-out generations (and validation rows) made in parallel tasks equal
    one task's, so the metrics and the paired comparisons do not depend on the shard count."""
    from pipelines.improve import evaluate_model
    from pipelines.prompts import load_prompts

    heldout, _ = load_prompts("shapes", split="heldout")
    train, _ = load_prompts("shapes", split="train", limit=5)
    runs = {}
    for shards in (1, 3):
        cfg = make_cfg(audit={"backend": "oracle", "vlm_path": None}, prompts={"source": "shapes"},
                       eval={"num_prompts": 7, "num_images": 2, "understanding_pairs": 6, "num_shards": shards,
                             "validation_images": 2})
        runs[shards] = evaluate_model(cfg, None, heldout, validation=train)
    (one, val1), (three, val3) = runs[1], runs[3]
    gen = one.samples["kind"] == "generation"
    assert gen.sum() == 14 and one.samples["prompt_id"][gen].nunique() == 7
    cols = ["kind", "prompt_id", "sample_index", "seed", "png", "own_valid", "external_verdict", "second_verdict",
            "own_answer", "cycle_ok", "cycle_failure", "caption_faithful"]
    pd.testing.assert_frame_equal(one.samples[cols], three.samples[cols])
    np.testing.assert_allclose(one.samples["own_score"], three.samples["own_score"], atol=1e-5)
    pd.testing.assert_frame_equal(val1, val3)
    assert len(val1) == 10 and "eval/val_accuracy" in one.metrics
    for key in ("eval/gen_accuracy", "eval/und_accuracy", "eval/gen_accuracy_second", "eval/verdict_agreement",
                "eval/val_accuracy", "eval/near_threshold/n", "eval/unicycle", "eval/unicycle/understood_wrong",
                "eval/caption_faithful/n"):
        assert one.metrics[key] == three.metrics[key], key
