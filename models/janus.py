"""Janus / Janus-Pro behind the `models.base.UnifiedModel` contract.

Where it fits: wraps a transformers `JanusForConditionalGeneration` (optionally LoRA-wrapped by peft,
see models/lora.py) and its `JanusProcessor`. Ray Data actors, Ray Train workers and Serve replicas
hold one of these.

Generation is our own loop, not `model.generate(generation_mode="image")`: one batched forward for
the conditional and unconditional CFG branches, a preallocated static KV cache, no logits-processor
chain, `cfg_weight == 1` meaning "no guidance" (HF crashes on it), and per-sample random streams so a
sample depends only on its seed, never on the batch it was drawn in. Greedy decoding equals HF's
token for token (tests/models/test_janus.py).

Example:
    >>> from models.tiny import build_tiny
    >>> m = build_tiny()
    >>> out = m.generate_images(["a red circle", "two blue squares"], num_images=2, seed=7)
    >>> r = m.judge([out.images[0][0]], ["a red circle"], mode="prob")
    >>> 0.0 <= r.score[0] <= 1.0
    True
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, StaticCache
from transformers.generation.utils import GenerationMixin

from models.seeds import stable_bits
from models import decode
from models.base import (DESCRIBE_QUESTION, JUDGE_QUESTION, JUDGE_SYSTEM, PROB_QUESTION, GenerationOutput,  # noqa: F401
                         ImageLogprobs, JudgeResult)

DECODE_CHUNK = 8  # images per VQ-decoder call (fixed, see decode_tokens)
_SCORE_RE = re.compile(r"score\s*is\s*:?\s*\{?\s*([01])\s*\}?(?![\d.]*\d)", re.IGNORECASE)


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any parts (sha256; never Python's salted `hash`)."""
    return stable_bits(":".join(str(p) for p in parts), 8) & (2**63 - 1)


def parse_binary_answer(text: str) -> float | None:
    """1.0 / 0.0 from "The score is 1" style answers; None when it cannot be parsed."""
    found = _SCORE_RE.findall(text)
    if len(set(found)) != 1:  # none, or contradictory scores in one answer
        return None
    return float(found[0])


def _draw(logp: torch.Tensor, u: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Inverse-CDF sampling: row r takes the token where its CDF first reaches u[r] (R,) in [0, 1)."""
    probs = logp.double().exp()  # (R, V)
    if top_k is not None and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)


def _check_prompts(prompts: Sequence[str], name: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        raise ValueError(f"{name} must be a sequence of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty string, got {p!r}")
    return prompts


def _check_float(name: str, value: float, low: float, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (value == low and not low_inclusive):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    return float(value)


class JanusUnified:
    """Generation + understanding of one Janus model (the same weights judge what they generate)."""

    def __init__(self, model, processor, judge_mode: str = "prob", fast_decode: bool = True):
        self.model = model  # JanusForConditionalGeneration, or a peft PeftModel around it
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.default_judge_mode = judge_mode
        self.fast_decode = fast_decode
        cfg = self.janus.config
        self.num_image_tokens = int(cfg.vq_config.num_patches) ** 2
        self.image_size = int(cfg.vision_config.image_size)
        self.boi_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        self.bos_id = self.tokenizer.bos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self._yes_no = self._answer_token_ids()

    # ------------------------------------------------------------------ plumbing
    @property
    def janus(self):
        """The JanusForConditionalGeneration inside (LoRA layers, if any, are injected in place)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def device(self) -> torch.device:
        return next(self.janus.parameters()).device

    def _answer_token_ids(self) -> tuple[list[int], list[int]]:
        """First-token ids of the Yes / No answers in every spelling the tokenizer has."""
        def ids(words):
            out = set()
            for w in words:
                toks = self.tokenizer.encode(w, add_special_tokens=False)
                if toks and toks[0] != self.tokenizer.unk_token_id:
                    out.add(toks[0])
            return sorted(out)
        yes, no = ids(["Yes", " Yes", "yes", " yes"]), ids(["No", " No", "no", " no"])
        if not yes or not no or set(yes) & set(no):
            raise ValueError("tokenizer has no distinct Yes / No tokens; the prob judge cannot work")
        return yes, no

    def _chat(self, user_content: list[dict], system: str | None = None) -> str:
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
        messages.append({"role": "user", "content": user_content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode_generation_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input_ids, attention_mask) ending in <begin_of_image>, shape (B, L)."""
        texts = [self._chat([{"type": "text", "text": p}]) for p in prompts]
        enc = self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _uncond_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The CFG unconditional prompt: everything but BOS and BOI becomes pad (as HF Janus does)."""
        keep = (ids == self.bos_id) | (ids == self.boi_id)
        return ids.masked_fill(~keep, self.pad_id)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_images(self, prompts, num_images=1, seed=0, cfg_weight=5.0, temperature=1.0,
                        top_k=None, greedy=False, batch_size=None, return_logprobs=False) -> GenerationOutput:
        """Draw `num_images` images per prompt. `seed`: one int, or one int per prompt.

        Sample (b, n) uses the random stream `derive_seed(prompt_seed[b], n)`, so it is the same
        whatever the batch it is drawn in. `batch_size` caps prompts per forward (default: all).
        """
        prompts = _check_prompts(prompts)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        cfg_weight = _check_float("cfg_weight", cfg_weight, 0.0)
        temperature = _check_float("temperature", temperature, 0.0, low_inclusive=False)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            prompt_seeds = [derive_seed(int(seed), b) for b in range(len(prompts))]
        else:
            prompt_seeds = [int(s) for s in seed]
            if len(prompt_seeds) != len(prompts):
                raise ValueError(f"seed has {len(prompt_seeds)} entries for {len(prompts)} prompts")
        seeds = torch.tensor([[derive_seed(s, n) for n in range(num_images)] for s in prompt_seeds])
        step = batch_size or len(prompts)
        toks, lps = [], []
        for lo in range(0, len(prompts), step):
            t, lp = self._sample(prompts[lo:lo + step], seeds[lo:lo + step], cfg_weight, temperature, top_k, greedy)
            toks.append(t)
            lps.append(lp)
        tokens = torch.cat(toks)  # (B, N, T)
        flat = self.decode_tokens(tokens.reshape(-1, self.num_image_tokens))
        images = [flat[b * num_images:(b + 1) * num_images] for b in range(len(prompts))]
        out = GenerationOutput(tokens=tokens, images=images, seeds=seeds)
        out.logprobs = torch.cat(lps) if return_logprobs else None
        return out

    def _sample(self, prompts, seeds, cfg_weight, temperature, top_k, greedy):
        """Tokens and their log-probs (B, N, T) for one batch of prompts."""
        B, N, T = len(prompts), seeds.shape[1], self.num_image_tokens
        ids, mask = self.encode_generation_prompts(prompts)
        ids, mask = ids.repeat_interleave(N, 0), mask.repeat_interleave(N, 0)  # (R, L), R = B*N
        guided = cfg_weight != 1.0
        if guided:  # one batched forward for both branches: rows [cond; uncond]
            ids, mask = torch.cat([ids, self._uncond_ids(ids)]), torch.cat([mask, mask])
        # Each sample's uniforms come from its own generator: batch-independent randomness.
        u = torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                         for s in seeds.reshape(-1)]).to(self.device)  # (R, T)
        head = self.janus.model.generation_head
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        step = self._stepper(ids.shape[0], ids.shape[1] + T)
        h = step(self.janus.get_input_embeddings()(ids), pos, mask)  # (rows, D)
        R = B * N
        tokens = torch.empty(R, T, dtype=torch.long, device=self.device)
        logps = torch.empty(R, T, dtype=torch.float32, device=self.device)
        next_pos = pos[:, -1:] + 1
        for t in range(T):
            logits = head(h).float()  # (rows, V)
            if guided:
                cond, uncond = logits[:R], logits[R:]
                logits = uncond + cfg_weight * (cond - uncond)  # (R, V), raw-logit CFG as HF does
            logp = torch.log_softmax(logits / temperature, dim=-1)  # (R, V)
            tok = logp.argmax(-1) if greedy else _draw(logp, u[:, t], top_k)
            tokens[:, t], logps[:, t] = tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            if t == T - 1:
                break  # the last token needs no forward (HF does one more)
            step_tok = torch.cat([tok, tok]) if guided else tok
            emb = self.janus.prepare_embeddings_for_image_generation(step_tok.unsqueeze(-1))  # (rows, 1, D)
            h = step(emb, next_pos, None)
            next_pos = next_pos + 1
        return tokens.view(B, N, T).cpu(), logps.view(B, N, T).cpu()

    def _stepper(self, rows: int, max_len: int):
        """step(emb, pos, prompt_mask | None) -> last hidden (rows, D): prefill, then 1-token steps.

        The lean KVDecoder when the backbone is a plain Llama (Janus, Janus-Pro), else the
        transformers forward over a preallocated StaticCache.
        """
        lm = self.janus.model.language_model
        if self.fast_decode and decode.supports(lm):
            dec = decode.KVDecoder(lm, rows, max_len)
            return lambda emb, pos, mask: dec.prefill(emb, mask, pos) if mask is not None else dec.step(emb, pos)
        cache = StaticCache(config=self.janus.config.text_config, max_cache_len=max_len)
        state = {}

        def hf_step(emb, pos, mask):
            state["mask"] = mask if mask is not None else torch.cat(
                [state["mask"], state["mask"].new_ones(state["mask"].shape[0], 1)], dim=-1)
            return lm(inputs_embeds=emb, attention_mask=state["mask"], position_ids=pos,
                      past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        return hf_step

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        """(M, T) codebook ids -> M RGB images (the VQ decoder's [-1, 1] output mapped to uint8)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.ndim != 2 or tokens.shape[1] != self.num_image_tokens:
            raise ValueError(f"image tokens must have shape (M, {self.num_image_tokens}), got {tuple(tokens.shape)}")
        out, chunk = [], DECODE_CHUNK
        for lo in range(0, tokens.shape[0], chunk):
            part = tokens[lo:lo + chunk]
            # Always decode exactly `chunk` images (pad the last chunk): convolution kernels can pick
            # other algorithms for other batch sizes, and an image's pixels must not depend on the
            # batch it was generated in (1 vs 2 actors, batch sizes, serve batching).
            padded = (torch.cat([part, part.new_zeros(chunk - part.shape[0], part.shape[1])])
                      if part.shape[0] < chunk else part)
            pix = self.janus.decode_image_tokens(padded)[: part.shape[0]].float()  # (m, H, W, C)
            arr = ((pix.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            out.extend(Image.fromarray(a) for a in arr)
        return out

    # ------------------------------------------------------------------ teacher forcing
    def image_logprobs(self, prompts, image_tokens, cfg_weight=None, temperature=1.0) -> ImageLogprobs:
        """log p(token_t | prompt, tokens_<t) in one teacher-forced pass (gradients flow).

        cfg_weight None (or 1): the conditional branch alone. A number: the guided distribution
        that generation samples from (cond and uncond in one batched pass) -- what training uses.
        """
        prompts = _check_prompts(prompts)
        image_tokens = torch.as_tensor(image_tokens, dtype=torch.long, device=self.device)
        if image_tokens.ndim != 2 or image_tokens.shape[1] != self.num_image_tokens:
            raise ValueError(f"image_tokens must have shape (B, {self.num_image_tokens}), "
                             f"got {tuple(image_tokens.shape)}")
        if image_tokens.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {image_tokens.shape[0]} rows of image_tokens")
        weight = 1.0 if cfg_weight is None else _check_float("cfg_weight", cfg_weight, 0.0)
        ids, mask = self.encode_generation_prompts(prompts)
        per_token = self.token_logprobs(ids, mask, image_tokens, weight, temperature)  # (B, T)
        return ImageLogprobs(per_token=per_token, total=per_token.sum(-1))

    def token_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor,
                       cfg_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
        """(B, T) log-probs of `image_tokens` under the sampler's distribution: raw-logit CFG
        u + w (c - u) at `cfg_weight` (1 = the conditional branch alone), then / temperature.

        Both branches run in one batched pass and both get gradient, so a loss on these log-probs
        trains the distribution that `generate_images` samples from (SHAPES-NOTES: a conditional-only
        loss under guided sampling made every round worse).
        """
        B, guided = ids.shape[0], cfg_weight != 1.0
        if guided:  # rows [cond; uncond], as _sample runs them
            ids, mask = torch.cat([ids, self._uncond_ids(ids)]), torch.cat([mask, mask])  # (2B, L)
        logits = self.image_logits(ids, mask, image_tokens.repeat(2 if guided else 1, 1))  # (rows, T, V)
        if guided:
            logits = logits[B:] + cfg_weight * (logits[:B] - logits[B:])  # (B, T, V), as _sample does
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
        return logp.gather(-1, image_tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)

    def image_logits(self, ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Generation-head logits (B, T, V) for each image position, from prompt ids ending in BOI."""
        P = ids.shape[1]
        emb = torch.cat([self.janus.get_input_embeddings()(ids),
                         self.janus.prepare_embeddings_for_image_generation(image_tokens[:, :-1])], 1)
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], image_tokens.shape[1] - 1)], 1)
        pos = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.janus.model.language_model(inputs_embeds=emb, attention_mask=full_mask,
                                            position_ids=pos).last_hidden_state  # (B, P+T-1, D)
        return self.janus.model.generation_head(h[:, P - 1:])

    # ------------------------------------------------------------------ understanding
    def _understanding_inputs(self, images, questions, system=None, suffixes=None):
        texts = [self._chat([{"type": "image"}, {"type": "text", "text": " " + q}], system) for q in questions]
        if suffixes is not None:
            texts = [t + s for t, s in zip(texts, suffixes)]
        images = [im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
                  for im in images]
        pixels = self._fast_pixels(images)
        if pixels is None:
            enc = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        else:  # same tensors as the processor (tests/models), without its per-image PIL pipeline
            p = self.processor
            expanded = p.image_start_token + p.image_token * p.num_image_tokens + p.image_end_token
            enc = dict(self.tokenizer([t.replace(p.image_token, expanded) for t in texts], padding=True,
                                      return_tensors="pt"), pixel_values=pixels)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _fast_pixels(self, images) -> torch.Tensor | None:
        """(B, 3, H, W) normalised pixels when every image already has the processor's size, else None."""
        ip = self.processor.image_processor
        size = (ip.size["width"], ip.size["height"]) if isinstance(ip.size, dict) else None
        if size is None or any(im.size != size for im in images) or not (ip.do_rescale and ip.do_normalize):
            return None
        arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))  # (B, H, W, 3)
        mean = torch.tensor(ip.image_mean, dtype=torch.float32)
        std = torch.tensor(ip.image_std, dtype=torch.float32)
        arr = (arr * float(ip.rescale_factor) - mean) / std
        return arr.permute(0, 3, 1, 2).contiguous().to(self.janus.dtype)

    def understanding_batch(self, images, questions, targets, system=None, suffixes=None) -> dict:
        """Model inputs + `labels` for teacher-forced training of the understanding branch.

        Row i is the judge/answer prompt for (images[i], questions[i]) exactly as `answer`, `judge`
        and `p_yes` build it (plus suffixes[i], e.g. a description), followed by targets[i]; labels
        are -100 everywhere except on the target tokens. `self.janus(**batch).loss` is their NLL.
        """
        texts = [self._chat([{"type": "image"}, {"type": "text", "text": " " + q}], system) for q in questions]
        if suffixes is not None:
            texts = [t + s for t, s in zip(texts, suffixes)]
        n_target = [len(self.tokenizer(t + y).input_ids) - len(self.tokenizer(t).input_ids)
                    for t, y in zip(texts, targets)]
        if min(n_target) < 1:
            raise ValueError("every target must add at least one token")
        batch = self._understanding_inputs(images, questions, system, [(s if suffixes else "") + y
                                           for s, y in zip(suffixes or [""] * len(targets), targets)])
        labels = torch.full_like(batch["input_ids"], -100)
        for i, k in enumerate(n_target):  # left padding: each row's target is its last k tokens
            labels[i, -k:] = batch["input_ids"][i, -k:]
        batch["labels"] = labels
        return batch

    @torch.no_grad()
    def answer(self, images, questions, max_new_tokens: int = 32, system: str | None = None) -> list[str]:
        """Greedy free-text answers, one per (image, question)."""
        questions = _check_prompts(questions, "questions")
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        inputs = self._understanding_inputs(images, questions, system)
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                   eos_token_id=self.tokenizer.eos_token_id, bos_token_id=self.bos_id)
        # GenerationMixin.generate is what Janus' text mode calls; going direct avoids its CFG-argument noise
        out = GenerationMixin.generate(self.janus, **inputs, generation_config=gen_cfg)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def describe(self, images, max_new_tokens: int = 32) -> list[str]:
        """A short description of each image."""
        return self.answer(images, ["Describe the image."] * len(images), max_new_tokens)

    @torch.no_grad()
    def p_yes(self, images, questions, suffixes=None, system=None) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) at the answer position, one forward pass, `logits_to_keep=1`."""
        inputs = self._understanding_inputs(images, questions, system, suffixes)
        logits = self.janus(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V)
        probs = torch.softmax(logits, dim=-1)
        yes, no = probs[:, self._yes_no[0]].sum(-1), probs[:, self._yes_no[1]].sum(-1)  # (B,)
        return (yes / (yes + no).clamp_min(1e-30)).tolist()

    def judge(self, images, prompts, mode: str | None = None) -> JudgeResult:
        """The model's own verdict: does each image describe its prompt?"""
        mode = mode or self.default_judge_mode
        prompts = _check_prompts(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if mode == "binary":
            answers = self.answer(images, [JUDGE_QUESTION.format(prompt=p) for p in prompts], 16, JUDGE_SYSTEM)
            scores = [parse_binary_answer(a) for a in answers]
            return JudgeResult([math.nan if s is None else s for s in scores], [s is not None for s in scores], answers)
        if mode == "prob":
            scores = self.p_yes(images, [PROB_QUESTION.format(prompt=p) for p in prompts])
            return JudgeResult(scores, [True] * len(scores), [""] * len(scores))
        if mode == "describe_prob":
            descriptions = self.describe(images)
            questions = [DESCRIBE_QUESTION.format(prompt=p) for p in prompts]
            scores = self.p_yes(images, questions, suffixes=[f" {d} . Answer :" for d in descriptions])
            return JudgeResult(scores, [True] * len(scores), descriptions)
        raise ValueError(f"judge mode must be one of binary, prob, describe_prob; got {mode!r}")
