"""Config tree: defaults, YAML round-trip, overrides, and validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import (Config, ConfigError, config_docs, config_hash, derive_seed, dump_config,
                              flatten_config, load_config)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_empty_yaml_is_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config(None) == Config()


def test_every_field_is_documented():
    docs = config_docs()
    assert "train.beta" in docs and "model.lora.target_modules" in docs
    assert all(text.strip() for text in docs.values()), [k for k, v in docs.items() if not v.strip()]


@pytest.mark.parametrize("name", ["shapes.yaml", "tiny.yaml"])
def test_shipped_yamls_mirror_the_tree(name):
    cfg = load_config(REPO / "configs" / name)
    import yaml

    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    listed = {f"{s}.{k}" for s, sec in raw.items() for k in sec}
    leaves = {k.split(".")[0] + "." + k.split(".")[1] for k in flatten_config(cfg)}
    assert listed == leaves  # every section key listed, nothing extra (1:1 mirror)


def test_tiny_yaml_is_tiny():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert (cfg.model.path, cfg.prompts.limit, cfg.generate.num_images, cfg.run.rounds) == ("tiny", 4, 2, 1)
    assert cfg.generate.num_actors == cfg.judge.num_actors == 1


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.objective=dpo", "model.lora.target_modules=[q_proj,v_proj]",
                             "wandb.tags=[a,b]", "prompts.limit=7", "ray.address=auto"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_overrides_parse_as_yaml_literals_and_check_types():
    cfg = load_config(None, ["judge.mode=prob", "train.beta=0.2", "train.lr=3e-4", "train.epochs=2",
                             "model.lora.target_modules=[q_proj,v_proj]", "generate.top_k=null",
                             "run.name=2024", "pools.accept_threshold=1", "train.use_gpu=false"])
    assert cfg.judge.mode == "prob" and cfg.train.beta == 0.2 and cfg.train.lr == 3e-4
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.run.name == "2024"  # a string key keeps the raw text
    assert isinstance(cfg.pools.accept_threshold, float)  # ints accepted for floats
    assert cfg.generate.top_k is None and cfg.train.use_gpu is False


def test_override_beats_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 0.5\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.beta=0.3"])
    assert cfg.train.beta == 0.3 and cfg.train.lr == 1e-3


@pytest.mark.parametrize("override, key, words", [
    (["train.bta=0.2"], "train.bta", "did you mean 'train.beta'"),
    (["judge.beta=0.2"], "judge.beta", "did you mean 'train.beta'"),
    (["trian.beta=0.2"], "trian.beta", "did you mean 'train'"),
    (["train.beta=abc"], "train.beta", "expected float"),
    (["train.epochs=1.5"], "train.epochs", "expected int"),
    (["train.use_gpu=1"], "train.use_gpu", "expected bool"),
    (["judge.mode=maybe"], "judge.mode", "not one of"),
    (["wandb.tags=a"], "wandb.tags", "expected list[str]"),
    (["train.lr=0"], "train.lr", "must be > 0"),
    (["pools.accept_threshold=1.5"], "pools.accept_threshold", "must be <= 1"),
    (["generate.num_images=0"], "generate.num_images", "must be >= 1"),
    (["serve.port=70000"], "serve.port", "must be <= 65535"),
    (["train.beta"], "train.beta", "section.key=value"),
    (["run.name.x=1"], "run.name.x", "not a section"),
])
def test_override_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert err.value.key == key and words in str(err.value)
    assert str(err.value).startswith(key + ":")


@pytest.mark.parametrize("key", ["train.lr", "audit.tolerance", "generate.cfg_weight", "generate.temperature",
                                 "pools.accept_threshold", "train.beta"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_non_finite_floats_are_refused(key, value, tmp_path):
    # A NaN tolerance makes every "is this round worse?" comparison False: nothing is ever flagged.
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    assert err.value.key == key and "finite" in str(err.value)
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match="finite"):
        load_config(path)


def test_huge_integers_for_floats_are_refused():
    with pytest.raises(ConfigError, match="too large"):
        load_config(None, ["train.lr=" + "9" * 400])


def test_unknown_yaml_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pools:\n  accept_treshold: 0.7\n")
    with pytest.raises(ConfigError,
                       match=r"pools.accept_treshold: unknown key \(did you mean 'pools.accept_threshold'\?\)"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    (["pools.accept_threshold=0.3", "pools.reject_threshold=0.5"], "pools.accept_threshold"),
    (["train.objective=dpo", "pairs.max_pairs_per_prompt=0"], "pairs.max_pairs_per_prompt"),
    (["curriculum.enabled=true", "curriculum.start_round=4", "run.rounds=3"], "curriculum.start_round"),
    (["audit.backend=vlm"], "audit.vlm_path"),
    (["audit.metric=val_accuracy"], "audit.metric"),
    (["train.loss_type=ipo", "train.label_smoothing=0.1"], "train.label_smoothing"),
    (["train.steps=5", "train.warmup_steps=10"], "train.warmup_steps"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], "serve.min_replicas"),
    (["serve.max_n=9"], "serve.max_n"),
    (["model.device=cpu", "model.dtype=float16"], "model.dtype"),
    (["model.device=cpu", "train.use_gpu=true"], "train.use_gpu"),
    (["ray.num_cpus=2", "train.num_workers=3"], "train.num_workers"),
    (["ray.num_cpus=1", "generate.num_actors=2"], "generate.num_actors"),
    (["prompts.source=prompts.txt", "audit.backend=vlm", "audit.vlm_path=x"], "prompts.source"),
    (["model.lora.target_modules=\"(\""], "model.lora.target_modules"),
    (["run.name=a/b"], "run.name"),
    (["train.logprob_branch=conditional", "generate.cfg_weight=2.0"], "train.logprob_branch"),
])
def test_impossible_combinations_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert err.value.key == key


def test_conditional_training_only_where_it_is_what_is_sampled_or_forced():
    load_config(None, ["train.logprob_branch=conditional", "generate.cfg_weight=1.0"])
    cfg = load_config(None, ["train.logprob_branch=conditional", "train.allow_cfg_mismatch=true"])
    assert cfg.generate.cfg_weight != 1.0 and cfg.train.logprob_branch == "conditional"


def test_curriculum_start_round_ok_when_disabled_and_dpo_with_pairs_ok():
    load_config(None, ["curriculum.start_round=9"])  # disabled: no constraint
    load_config(None, ["train.objective=dpo", "pairs.max_pairs_per_prompt=1"])
    load_config(None, ["ray.address=auto", "ray.num_cpus=1", "train.num_workers=4"])  # remote cluster


def test_config_hash_stable_and_excludes_bookkeeping():
    base = load_config(None)
    assert config_hash(base) == config_hash(load_config(None)) and len(config_hash(base)) == 16
    same = load_config(None, ["run.name=other", "run.root=s3://b/x", "wandb.mode=disabled",
                              "serve.port=9000", "run.rounds=5", "generate.num_actors=2"])
    assert config_hash(same) == config_hash(base)
    for change in (["train.lr=1e-3"], ["run.seed=1"], ["judge.mode=prob"], ["generate.batch_size=4"]):
        assert config_hash(load_config(None, change)) != config_hash(base), change


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, "generate") == derive_seed(0, 1, "generate")
    seeds = {derive_seed(s, r, st, sh) for s in (0, 1) for r in (1, 2) for st in ("generate", "judge")
             for sh in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**32 for s in seeds)


def test_config_sections_are_pydantic_models_with_a_json_schema():
    from pydantic import BaseModel

    cfg = load_config(None)
    assert isinstance(cfg.model.lora, BaseModel) and cfg.model.lora.modules_to_save == ["generation_head"]
    schema = Config.model_json_schema()
    lora = schema["$defs"]["LoraSection"]
    assert lora["additionalProperties"] is False and lora["properties"]["r"]["minimum"] == 1
    assert lora["properties"]["r"]["description"] == config_docs()["model.lora.r"]
    a, b = Config(), Config()
    a.wandb.tags.append("x")
    assert b.wandb.tags == []


def test_the_config_command_prints_the_checked_tree_and_its_schema(capsys, tmp_path):
    import json

    from pipelines.cli import main

    shapes = str(REPO / "configs" / "shapes.yaml")
    assert main(["config", shapes, "train.lr=1e-4"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "printed.yaml") == load_config(shapes, ["train.lr=1e-4"])
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["train"]["description"] and "TrainSection" in schema["$defs"]
    assert main(["config", str(REPO / "configs" / "shapes.yaml"), "train.lrr=1"]) == 2
    assert "train.lrr: unknown key (did you mean 'train.lr'?)" in capsys.readouterr().err


def test_the_trainer_and_lora_interfaces_default_to_the_configs_values():
    # trainers/ and models/ keep their own argument classes (they do not import pipelines/), but a
    # field they share with the config must not drift from it (it did: lr 1e-3 vs 3e-4, r 8 vs 16).
    import dataclasses

    from models.lora import LoraSpec
    from trainers.train import TrainArgs

    cfg = Config()
    pairs = [(TrainArgs(), cfg.train, {"max_steps": "steps"}), (LoraSpec(), cfg.model.lora, {})]
    for mirror, section, renamed in pairs:
        shared = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(mirror)
                  if renamed.get(f.name, f.name) in type(section).model_fields}
        assert len(shared) >= 5
        for mine, theirs in shared.items():
            assert getattr(mirror, mine) == getattr(section, theirs), (type(mirror).__name__, mine)


MIRRORS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "extends:" not in p.read_text())


@pytest.mark.parametrize("path", MIRRORS, ids=lambda p: p.name)
def test_shipped_yaml_comments_are_the_field_docs(path):
    # The full YAML mirrors (not the `extends:` deltas) are documented by the models: each key's
    # comment is its Field description (plus an optional "  [note]" for this file);
    # `unigap config FILE --commented` regenerates them.
    from pipelines.typed_config import yaml_comment_drift

    assert len(MIRRORS) >= 4
    assert yaml_comment_drift(path.read_text(), config_docs()) == []


def test_the_commented_yaml_is_generated_from_the_models_and_reads_back(tmp_path):
    from pipelines.typed_config import commented_yaml, yaml_comment_drift

    cfg = load_config(REPO / "configs" / "shapes.yaml", ["model.lora.target_modules=[q_proj,v_proj]",
                                                         "prompts.limit=7"])
    text = commented_yaml(cfg)
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml_comment_drift(text, config_docs()) == []
    assert yaml_comment_drift(text.replace("# LoRA rank.", "# rank"), config_docs()) == ["model.lora.r"]
