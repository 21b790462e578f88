"""LoRA adapters: attach, save with checksums, load verified, merge; loading models from disk."""

import json

import pytest
import torch

from models.loading import ModelLoadError, load_model, save_model
from models.lora import AdapterError, LoraSpec, attach_lora, load_adapter, merge_adapter, save_adapter, verify_adapter
from models.tiny import TinySpec, build_tiny

P = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    m = attach_lora(build_tiny(), LoraSpec(r=4))
    with torch.no_grad():  # a trained-looking adapter (fresh LoRA B is zero, a no-op)
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("adapter")
    save_adapter(m, d)
    return d, m.generate_images(P, 2, seed=3).tokens


def test_save_load_gives_identical_outputs(adapter_dir):
    d, tokens = adapter_dir
    loaded = load_adapter(build_tiny(), d)
    assert torch.equal(loaded.generate_images(P, 2, seed=3).tokens, tokens)
    assert not torch.equal(build_tiny().generate_images(P, 2, seed=3).tokens, tokens)
    merged = merge_adapter(loaded)
    assert not hasattr(merged.model, "disable_adapter")
    assert torch.equal(merged.generate_images(P, 2, seed=3).tokens, tokens)


def test_load_model_merges_an_adapter_with_its_generation_head_copy(tmp_path):
    # the inference path of the stages: adapter + trained generation-head copy folded into plain weights
    m = attach_lora(build_tiny(), LoraSpec(r=4, modules_to_save=["generation_head"]))
    with torch.no_grad():
        for name, p in m.model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "generation_head" in name):
                p.add_(torch.randn_like(p) * 0.5)
    save_adapter(m, tmp_path)
    tokens = m.generate_images(P, 2, seed=3).tokens
    merged = load_model("tiny", adapter=str(tmp_path), merge=True)
    assert not hasattr(merged.model, "disable_adapter") and not hasattr(merged.model, "peft_config")
    assert torch.equal(merged.generate_images(P, 2, seed=3).tokens, tokens)
    assert not torch.equal(load_model("tiny").generate_images(P, 2, seed=3).tokens, tokens)


def test_tampered_adapter_is_refused(adapter_dir, tmp_path):
    d, _ = adapter_dir
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    blob = bytearray((tmp_path / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(AdapterError, match="checksum mismatch for adapter_model.safetensors"):
        load_adapter(build_tiny(), tmp_path)
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(AdapterError, match="missing SHA256SUMS"):
        verify_adapter(tmp_path)


def test_lora_targets_must_match(tmp_path):
    with pytest.raises(ValueError, match="matches no module"):
        attach_lora(build_tiny(), LoraSpec(target_modules=r".*no_such_proj"))
    with pytest.raises(ValueError, match="modules_to_save"):
        attach_lora(build_tiny(), LoraSpec(modules_to_save=["no_such_head"]))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_adapter(build_tiny(), tmp_path)


def test_lora_trains_only_adapter_and_generation_head():
    m = attach_lora(build_tiny(), LoraSpec(r=2))
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "generation_head" in n for n in trainable)
    assert any("generation_head" in n for n in trainable)


def test_model_round_trips_through_disk(tmp_path):
    spec = TinySpec(vq_patch=4, vq_channel_multiplier=[1, 1, 1])  # 64 generated tokens, 16 vision tokens
    m = build_tiny(spec, seed=2)
    m.default_judge_mode = "describe_prob"
    save_model(m, tmp_path)
    back = load_model(str(tmp_path))
    assert back.num_image_tokens == 64 and back.default_judge_mode == "describe_prob"
    assert torch.equal(back.generate_images(P, 1, seed=1).tokens, m.generate_images(P, 1, seed=1).tokens)


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus"}))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither an existing directory nor a hub id"):
        load_model("./does/not/exist")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny", dtype="float64")


def test_adapter_uri_is_fetched_and_verified(adapter_dir, monkeypatch, tmp_path):
    d, tokens = adapter_dir
    monkeypatch.setenv("HOME", str(tmp_path))  # the local adapter cache lives under ~/.cache
    loaded = load_adapter(build_tiny(), f"file://{d}")
    assert torch.equal(loaded.generate_images(P, 2, seed=3).tokens, tokens)
    with pytest.raises(AdapterError, match="does not exist"):
        verify_adapter(f"file://{tmp_path}/nothing-here")


def test_one_base_many_adapters_each_round_computes_as_if_loaded_alone(adapter_dir, tmp_path):
    from models.lora import AdapterSet

    d1, tokens1 = adapter_dir
    m2 = attach_lora(build_tiny(), LoraSpec(r=4))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m2.model.named_parameters():
            if "lora_B" in name or "generation_head" in name and "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(m2, tmp_path / "r2")
    tokens2 = m2.generate_images(P, 2, seed=3).tokens
    base_tokens = build_tiny().generate_images(P, 2, seed=3).tokens
    s = AdapterSet(build_tiny())
    t1, t2 = s.add("round_1", d1), s.add("round_2", tmp_path / "r2")
    for _ in range(2):  # switching back and forth changes nothing
        for name, want in (("round_2", tokens2), (None, base_tokens), ("round_1", tokens1)):
            with s.active(name) as m:
                assert torch.equal(m.generate_images(P, 2, seed=3).tokens, want), name
    s.retire("round_2", t2 - 1)  # a stale handle: nothing happens
    with s.active("round_1"):
        pass
    assert s.names() == ["round_1", "round_2"]
    s.retire("round_2", t2)
    with s.active(None) as m:
        assert torch.equal(m.generate_images(P, 2, seed=3).tokens, base_tokens)
    assert s.names() == ["round_1"]
    with pytest.raises(AdapterError, match="not loaded"):
        with s.active("round_2"):
            pass
    tampered = tmp_path / "bad"
    __import__("shutil").copytree(tmp_path / "r2", tampered)
    (tampered / "adapter_model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(AdapterError):
        s.add("round_3", tampered)
    assert t1 < t2
