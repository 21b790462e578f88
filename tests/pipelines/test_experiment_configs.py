"""configs/experiments/*.yaml: each extends shapes.yaml and changes only what its name says."""

from pathlib import Path

import pytest

from pipelines.config import ConfigError, flatten_config, load_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "configs" / "experiments"
EXPECTED = {
    "sft": {"train.objective": "sft"},
    "dpo": {"train.objective": "dpo"},
    "c-sft": {"train.objective": "sft", "curriculum.enabled": True, "curriculum.start_round": 2},
    "c-dpo": {"train.objective": "dpo", "curriculum.enabled": True, "curriculum.start_round": 2},
    "judge-random": {"judge.corrupt": "random"},
    "judge-inverted": {"judge.corrupt": "inverted"},
    "judge-oracle": {"judge.corrupt": "oracle"},
    "proposer": {"prompts.proposer": "describe"},
    "unicorn": {"prompts.proposer": "describe", "prompts.proposal_target": "nonunified", "cpr.caption": 1.0,
                "cpr.judgement": 0.6, "cpr.reflection": 0.2},
    "dose": {"generate.num_images": 24, "train.epochs": 1},
    "binding": {"prompts.per_round": 125, "pools.sft_select": "best_of_n", "pools.category_cap": 0.4,
                "prompts.category_mix": {"spatial": 65.0, "two_objects": 45.0, "counting": 12.0, "single": 2.0,
                                         "shape": 1.0},
                "generate.num_images_by_category": {"spatial": 16, "two_objects": 16}},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_extends_the_default(name):
    base = flatten_config(load_config(REPO / "configs" / "shapes.yaml"))
    cfg = flatten_config(load_config(EXPERIMENTS / f"{name}.yaml"))
    changed = {k: v for k, v in cfg.items() if base.get(k) != v}
    assert cfg["run.name"] == name and cfg["wandb.group"] == "shapes-experiments"
    for key, value in EXPECTED[name].items():
        assert cfg[key] == value
    allowed = set(EXPECTED[name]) | {"run.name", "wandb.group", "wandb.tags"}
    assert set(changed) <= allowed, set(changed) - allowed


def test_every_experiment_file_is_tested():
    assert {p.stem for p in EXPERIMENTS.glob("*.yaml")} == set(EXPECTED)


def test_extends_errors_name_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("extends: ../nope/x.yaml\ntrain:\n  bta: 1\n")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "e.yaml")
