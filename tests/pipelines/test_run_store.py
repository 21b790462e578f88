"""Run store: layout, atomic manifest and tables, markers, pointers, config refusal and force."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipelines.store as store_mod
from pipelines.config import load_config
from pipelines.store import RunStore, RunStoreError

ROWS = [{"prompt_id": "p1", "sample_index": 0, "score": 0.9}, {"prompt_id": "p2", "sample_index": 1, "score": 0.1}]


@pytest.fixture
def cfg():
    return load_config(None, ["run.seed=7"])


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_init_writes_layout_and_manifest(tmp_path, cfg):
    store = RunStore(str(tmp_path), "r1")
    manifest = store.init(cfg)
    assert (tmp_path / "r1" / "config.yaml").is_file() and (tmp_path / "r1" / "manifest.json").is_file()
    assert load_config(tmp_path / "r1" / "config.yaml") == cfg  # the resolved config, reloadable
    on_disk = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    assert on_disk["config_hash"] == manifest["config_hash"] and on_disk["seed"] == 7
    assert {"python", "torch", "ray", "pyarrow"} <= set(on_disk["versions"])
    assert "git_sha" in on_disk and on_disk["pointers"] == {"best": None, "latest": None, "head": None}


def test_tables_markers_pointers_and_resume(tmp_path, cfg):
    store = RunStore(str(tmp_path), "r1")
    store.init(cfg)
    path = store.write_table(1, "judge", ROWS)
    assert path.endswith("r1/round_1/judge/data.parquet")
    assert not store.is_done(1, "judge")
    store.mark_done(1, "judge", {"rows": 2, "seed": 123})
    store.set_pointer("latest", 1)
    # a new process (KubeRay retry) sees the same state
    again = RunStore(str(tmp_path), "r1")
    again.init(cfg)
    assert again.is_done(1, "judge") and again.stage_info(1, "judge") == {"rows": 2, "seed": 123}
    assert again.read_table(1, "judge").to_pylist() == ROWS
    assert again.pointer("latest") == 1 and again.pointer("best") is None
    assert not again.is_done(2, "judge") and len(again.manifest()["sessions"]) == 2
    assert again.adapter_dir(3).endswith("r1/adapters/round_3")


def test_read_table_of_a_partitioned_directory(tmp_path, cfg):
    store = RunStore(str(tmp_path), "r1")
    store.init(cfg)
    d = tmp_path / "r1" / "round_0" / "generate" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), d / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[1:]), d / "part-1.parquet")
    (d / ".tmp-abc-part-2.parquet").write_bytes(b"half written")  # ignored
    assert store.read_table(0, "generate").num_rows == 2
    with pytest.raises(RunStoreError, match="no table 'pairs'"):
        store.read_table(0, "generate", name="pairs")


def test_crashed_table_write_leaves_no_table_and_no_marker(tmp_path, cfg, monkeypatch):
    store = RunStore(str(tmp_path), "r1")
    store.init(cfg)

    def crash(table, where, filesystem=None):
        with filesystem.open_output_stream(where) as fh:
            fh.write(b"PAR1 partial")  # a half-written file...
        raise KeyboardInterrupt("killed mid-write")  # ...then the process dies

    monkeypatch.setattr(store_mod.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_table(1, "generate", ROWS)
    monkeypatch.undo()
    assert not store.is_done(1, "generate")
    assert not any(f.endswith("data.parquet") for f in _files(tmp_path))
    assert not any(".tmp-" in f for f in _files(tmp_path))  # temp file cleaned up
    with pytest.raises(RunStoreError):
        store.read_table(1, "generate")
    store.write_table(1, "generate", ROWS)  # the rerun completes normally
    assert store.read_table(1, "generate").num_rows == 2


def test_manifest_write_is_atomic(tmp_path, cfg, monkeypatch):
    store = RunStore(str(tmp_path), "r1")
    store.init(cfg)
    before = (tmp_path / "r1" / "manifest.json").read_text()

    real_put = RunStore._put

    def dying_put(self, path, data):
        real_put(self, path, data[: len(data) // 2])  # half the new manifest reaches the disk...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(RunStore, "_put", dying_put)
    with pytest.raises(OSError):
        store.mark_done(1, "generate", {})
    monkeypatch.undo()
    assert (tmp_path / "r1" / "manifest.json").read_text() == before  # old manifest intact
    assert not store.is_done(1, "generate")
    assert [f for f in _files(tmp_path) if ".tmp-" in f] == []


def test_different_config_refused_then_forced(tmp_path, cfg):
    RunStore(str(tmp_path), "r1").init(cfg)
    store = RunStore(str(tmp_path), "r1")
    store.write_table(1, "judge", ROWS)
    store.mark_done(1, "judge", {})
    changed = load_config(None, ["run.seed=7", "train.lr=1e-3"])
    with pytest.raises(RunStoreError, match=r"train.lr: 0.0003 -> 0.001.*run.force=true"):
        store.init(changed)
    manifest = store.init(changed, force=True)
    assert manifest["config_history"][-1]["forced"] is True
    assert manifest["config_history"][-1]["changed"] == {"train.lr": [0.0003, 0.001]}
    assert store.is_done(1, "judge") and store.read_table(1, "judge").num_rows == 2  # data kept
    assert len(list((tmp_path / "r1" / "configs").iterdir())) == 2  # every config version kept
    # bookkeeping-only changes are the same experiment: no refusal
    store.init(load_config(None, ["run.seed=7", "train.lr=1e-3", "wandb.mode=disabled", "run.rounds=5"]))


def test_from_config_uses_run_section(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=fromcfg"])
    store = RunStore.from_config(cfg)
    assert store.exists() and (tmp_path / "fromcfg" / "manifest.json").is_file()


def test_file_uri_works_like_a_path(tmp_path, cfg):
    store = RunStore(f"file://{tmp_path}", "r1")
    store.init(cfg)
    store.write_table(0, "evaluate", ROWS)
    store.mark_done(0, "evaluate", {"acc": 0.5})
    plain = RunStore(str(tmp_path), "r1")
    assert plain.is_done(0, "evaluate") and plain.read_table(0, "evaluate").num_rows == 2


def test_other_pyarrow_filesystems(tmp_path, cfg):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = RunStore("", "r1", filesystem=sub)
    store.init(cfg)
    store.write_table(1, "pool", ROWS, name="pairs")
    store.mark_done(1, "pool", {})
    assert (tmp_path / "r1" / "round_1" / "pool" / "pairs.parquet").is_file()
    mock = pafs._MockFileSystem()
    mstore = RunStore("bucket/runs", "r1", filesystem=mock)
    mstore.init(cfg)
    mstore.write_table(1, "pool", ROWS)
    mstore.mark_done(1, "pool", {"n": 2})
    assert mstore.is_done(1, "pool") and mstore.read_table(1, "pool").num_rows == 2


def test_bad_names_and_pointers_are_refused(tmp_path, cfg):
    with pytest.raises(RunStoreError):
        RunStore(str(tmp_path), "../escape")
    store = RunStore(str(tmp_path), "r1")
    with pytest.raises(RunStoreError, match="init"):
        store.manifest()
    store.init(cfg)
    with pytest.raises(RunStoreError):
        store.write_table(1, "a/b", ROWS)
    with pytest.raises(RunStoreError):
        store.set_pointer("worst", 1)


def test_clear_stage_only_for_incomplete_stages(tmp_path, cfg):
    store = RunStore(str(tmp_path), "r1")
    store.init(cfg)
    store.write_table(1, "generate", ROWS)
    store.clear_stage(1, "generate")
    assert not (tmp_path / "r1" / "round_1" / "generate").exists()
    store.write_table(1, "generate", ROWS)
    store.mark_done(1, "generate", {})
    with pytest.raises(RunStoreError, match="complete"):
        store.clear_stage(1, "generate")


@pytest.mark.parametrize("continue_from, starts", [("last_kept", [0, 1, 2, 2, 4]), ("best", [0, 1, 1, 1, 4])])
def test_rounds_continue_from_the_last_kept_or_the_best_round(tmp_path, continue_from, starts):
    """Round 1 promoted, 2 held within tolerance, 3 degraded (rolled back), 4 promoted."""
    from pipelines.audit import AuditDecision
    from pipelines.improve import promote, start_model

    cfg = load_config(None, [f"audit.continue_from={continue_from}"])
    store = RunStore(str(tmp_path), "r")
    store.init(cfg)
    for name in ("best", "latest", "head"):
        store.set_pointer(name, 0)
    seen = [start_model(store, cfg)]
    for k, (promoted, degraded) in enumerate([(True, False), (False, False), (False, True), (True, False)], 1):
        promote(store, k, AuditDecision(promoted, degraded, "", 0, round=k))
        seen.append(start_model(store, cfg))
    assert seen == starts
    assert (store.pointer("best"), store.pointer("latest"), store.pointer("head")) == (4, 4, 4)
    promote(store, 5, AuditDecision(False, False, "no new adapter (training skipped)", 4, round=4))
    assert store.pointer("head") == 4 and store.pointer("latest") == 5  # no new model: the chain stays


def test_a_schema_that_grew_a_field_reopens_the_run_without_force(tmp_path, cfg):
    # A run made before a config field existed hashes differently under today's schema (the new field
    # at its default is now part of the tree) but is the same experiment: it resumes, recorded as such.
    import json

    store = RunStore(str(tmp_path), "r1")
    store.init(cfg)
    manifest_path = tmp_path / "r1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config_hash"] = "0123456789abcdef"  # what the older schema's tree hashed to
    manifest_path.write_text(json.dumps(manifest))
    reopened = store.init(cfg)
    assert reopened["config_history"][-1]["schema_only"] is True and not reopened["config_history"][-1]["forced"]
    manifest["config_hash"] = "0123456789abcdef"  # and a real change is still refused
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match="train.lr"):
        store.init(load_config(None, ["train.lr=1e-3"]))
    (tmp_path / "r1" / "config.yaml").write_text("no_such_section: {}\n")  # an old config that no longer parses
    with pytest.raises(RunStoreError, match="see config.yaml"):
        store.init(cfg)
