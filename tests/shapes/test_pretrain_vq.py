"""VQ pretraining on a tiny config: the loss falls, and the module's own encode/decode (the path
Janus' `decode_image_tokens` uses) reproduces the training forward exactly."""

from __future__ import annotations

import json

import numpy as np
import torch

from shapes.pretrain_vq import (
    VQSettings,
    build_vq,
    forward,
    load_checkpoint,
    load_vq,
    make_batch,
    make_optimiser,
    new_ema_state,
    reconstruct,
    save_checkpoint,
    save_vq,
    to_images,
    to_pixels,
    tokens,
    train_step,
)

TINY = VQSettings(base_channels=32, channel_multiplier=(1, 1, 1), latent_channels=32, codebook=32,
                  embed_dim=8, batch_size=8, lr=2e-3, warmup_steps=1, restart_every=5)


def _fresh(settings: VQSettings = TINY):
    torch.manual_seed(0)
    vq = build_vq(settings, seed=0).train()
    optimiser = make_optimiser(vq, settings)
    return vq, optimiser, new_ema_state(vq, settings)


def test_loss_falls_and_codebook_stays_unit_norm():
    torch.set_num_threads(1)
    vq, optimiser, ema = _fresh()
    rng = torch.Generator().manual_seed(0)
    images = make_batch(seed=0, step=0, batch_size=TINY.batch_size)
    losses = [train_step(vq, optimiser, ema, images, TINY, rng)[0]["mse"] for _ in range(25)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert int(ema["step"]) == 25


def test_official_encode_decode_matches_training_forward(tmp_path):
    torch.set_num_threads(1)
    vq, optimiser, ema = _fresh()
    rng = torch.Generator().manual_seed(0)
    for step in range(6):
        train_step(vq, optimiser, ema, make_batch(0, step, TINY.batch_size), TINY, rng)
    save_vq(vq.eval(), tmp_path)
    loaded = load_vq(tmp_path)
    images = make_batch(seed=1, step=0, batch_size=4)
    with torch.no_grad():
        recon, _, ids = forward(loaded, to_pixels(images))
        ids_official = tokens(loaded, images)  # (B, 64) through JanusVQVAE.encode
        decoded = loaded.decode(ids_official)  # JanusVQVAE.decode, as decode_image_tokens uses
    assert ids_official.shape == (4, 64)
    assert torch.equal(ids_official.flatten(), ids)
    assert torch.allclose(decoded, recon, atol=1e-5)
    # Float noise (~1e-5) may flip a rounding: uint8 images agree to within one level.
    diff = reconstruct(loaded, images).astype(int) - to_images(recon).astype(int)
    assert np.abs(diff).max() <= 1


def test_checkpoint_round_trip_restores_model_optimiser_and_ema(tmp_path):
    torch.set_num_threads(1)
    vq, optimiser, ema = _fresh()
    rng = torch.Generator().manual_seed(0)
    for step in range(3):
        train_step(vq, optimiser, ema, make_batch(0, step, TINY.batch_size), TINY, rng)
    save_checkpoint(tmp_path, vq, optimiser, ema, {"elapsed_s": 1.0, "step": 3})
    vq2, optimiser2, ema2 = _fresh()
    progress = load_checkpoint(tmp_path, vq2, optimiser2, ema2)
    assert progress["step"] == 3 and int(ema2["step"]) == 3
    for (name, a), b in zip(vq.state_dict().items(), vq2.state_dict().values()):
        assert torch.equal(a, b), name
    batch = make_batch(0, 3, TINY.batch_size)
    # Identical next step after resume (same data, same optimiser moments).
    s1 = train_step(vq, optimiser, ema, batch, TINY, torch.Generator().manual_seed(1))[0]
    s2 = train_step(vq2, optimiser2, ema2, batch, TINY, torch.Generator().manual_seed(1))[0]
    assert abs(s1["mse"] - s2["mse"]) < 1e-6
    assert torch.allclose(vq.decoder.conv_out.weight, vq2.decoder.conv_out.weight, atol=1e-6)


def test_janus_decode_image_tokens_uses_the_trained_vq():
    """Loaded into a full JanusForConditionalGeneration, `decode_image_tokens` gives our decode."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    torch.set_num_threads(1)
    vq, optimiser, ema = _fresh()
    rng = torch.Generator().manual_seed(0)
    for step in range(3):
        train_step(vq, optimiser, ema, make_batch(0, step, TINY.batch_size), TINY, rng)
    vq_config = {k: v for k, v in vq.config.to_dict().items() if k in type(vq.config).__dataclass_fields__}
    vq_config.update(projection_dim=32, image_token_embed_dim=32)
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=4, projection_dim=32, num_image_tokens=64, mlp_ratio=2.0),
        vq_config=vq_config,
        image_token_id=3,
    )
    model = JanusForConditionalGeneration(config).eval()
    model.model.vqmodel.load_state_dict(vq.state_dict())
    images = make_batch(seed=2, step=0, batch_size=3)
    with torch.no_grad():
        recon, _, _ = forward(vq.eval(), to_pixels(images))
        decoded = model.decode_image_tokens(tokens(vq, images))  # (B, 32, 32, 3)
    assert torch.allclose(decoded.permute(0, 3, 1, 2), recon, atol=1e-5)


def test_train_writes_the_deliverables_and_resumes_exactly(tmp_path):
    from shapes.pretrain_vq import train

    torch.set_num_threads(1)
    straight = train(tmp_path / "a", minutes=10, seed=0, settings=TINY, log_every=2, max_steps=4)
    # An "interrupted" run: a tiny time budget stops it after its first step(s), same schedule.
    train(tmp_path / "b", minutes=1e-4, seed=0, settings=TINY, log_every=2, max_steps=4)
    assert 1 <= json.loads((tmp_path / "b" / "checkpoint" / "progress.json").read_text())["step"] < 4
    resumed = train(tmp_path / "b", minutes=10, seed=0, settings=TINY, log_every=2, max_steps=4)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # identical result after resume
    assert (tmp_path / "b" / "vq.safetensors").exists() and (tmp_path / "b" / "vq_config.json").exists()
    assert load_vq(tmp_path / "b").config.num_embeddings == TINY.codebook
