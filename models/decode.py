"""Lean incremental decoding for the Llama backbone of Janus (image-token generation hot loop).

Where it fits: `models.janus.JanusUnified._sample` prefills with the transformers forward, then
calls `KVDecoder.step` once per image token. A step runs the model's *own* modules (norms,
projections -- LoRA-wrapped ones included -- rotary embedding, MLP) on a preallocated KV buffer, and
skips what dominates a 1-token step in the generic forward: building a 4-D causal mask, cache
objects, output-capturing wrappers. Greedy decoding stays equal to HF's token for token
(tests/models/test_janus.py).

Example:
    >>> import torch
    >>> from models.tiny import build_tiny
    >>> m = build_tiny()
    >>> lm = m.janus.model.language_model
    >>> dec = KVDecoder(lm, rows=2, max_len=8)
    >>> emb = torch.randn(2, 3, lm.config.hidden_size)
    >>> h = dec.prefill(emb, torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3))
    >>> dec.step(torch.randn(2, 1, lm.config.hidden_size), torch.full((2, 1), 3)).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def supports(lm) -> bool:
    """True when `lm` is a plain Llama stack this decoder reproduces exactly."""
    cfg = lm.config
    return (
        getattr(cfg, "model_type", "") == "llama"
        and getattr(cfg, "sliding_window", None) is None
        and (cfg.rope_parameters or {}).get("rope_type", "default") != "dynamic"
        and hasattr(lm, "rotary_emb")
    )


class KVDecoder:
    """A preallocated KV cache (layers, rows, kv_heads, max_len, head_dim) and a 1-token step."""

    def __init__(self, lm, rows: int, max_len: int):
        cfg = lm.config
        p = next(lm.parameters())
        self.lm = lm
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.valid = torch.zeros(rows, 1, 1, max_len, dtype=torch.bool, device=p.device)  # key mask
        self.length = 0
        self.gqa = cfg.num_attention_heads != cfg.num_key_value_heads

    def prefill(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run the prompt (R, L, D) through the transformers forward; keep its K/V. Returns (R, D)."""
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        L = emb.shape[1]
        for i, layer in enumerate(cache.layers):
            self.k[i, :, :, :L] = layer.keys  # (R, kvh, L, hd)
            self.v[i, :, :, :L] = layer.values
        self.valid[:, 0, 0, :L] = mask.bool()
        self.length = L
        return out.last_hidden_state[:, -1]

    @torch.no_grad()
    def step(self, emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One new token per row: emb (R, 1, D), pos (R, 1) -> last hidden state (R, D)."""
        t = self.length
        self.valid[:, 0, 0, t] = True
        keys_mask = self.valid[..., : t + 1]  # (R, 1, 1, t+1)
        x = emb
        cos, sin = self.lm.rotary_emb(x, pos)  # (R, 1, hd)
        for i, layer in enumerate(self.lm.layers[: self.lm.config.num_hidden_layers]):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(h.shape[0], 1, -1, self.head_dim).transpose(1, 2)  # (R, H, 1, hd)
            k = attn.k_proj(h).view(h.shape[0], 1, -1, self.head_dim).transpose(1, 2)  # (R, kvh, 1, hd)
            v = attn.v_proj(h).view(h.shape[0], 1, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i, :, :, t : t + 1] = k
            self.v[i, :, :, t : t + 1] = v
            o = F.scaled_dot_product_attention(
                q, self.k[i, :, :, : t + 1], self.v[i, :, :, : t + 1], attn_mask=keys_mask,
                scale=attn.scaling, enable_gqa=self.gqa,
            )  # (R, H, 1, hd)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(h.shape[0], 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.length = t + 1
        return self.lm.norm(x)[:, -1]
