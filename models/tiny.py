"""Tiny random Janus models and an offline word-level tokenizer / processor.

Where it fits: every test builds its model here (no hub, no downloads, well under a second), and the
shapes world builds its from-scratch model with the same functions and its own vocabulary.

The model is the real `transformers.JanusForConditionalGeneration`, only small. The tokenizer is a
word-level `tokenizers` model over a closed vocabulary (the judge prompts' words plus caller words),
with `<image_placeholder>` / `<begin_of_image>` / `<end_of_image>` special tokens and a BOS
post-processor, because Janus' classifier-free guidance keeps only BOS + BOI in the unconditional
branch (shared DESIGN.md section 5).

Example:
    >>> from models.tiny import build_tiny
    >>> m = build_tiny(seed=0)
    >>> m.generate_images(["a red circle"], num_images=1, seed=0).tokens.shape
    torch.Size([1, 1, 16])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    PreTrainedTokenizerFast,
)

from models.base import JUDGE_QUESTION, JUDGE_SYSTEM, PROB_QUESTION

SPECIAL = {
    "bos": "<|begin_of_sentence|>",
    "eos": "<|end_of_sentence|>",
    "pad": "<|pad|>",
    "unk": "<|unk|>",
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
    "user": "<|User|>",
    "assistant": "<|Assistant|>",
}

# The same layout as Janus-Pro's template ("<|User|>: ...\n\n<|Assistant|>:"); images become the
# placeholder the processor expands to BOI + N image tokens + EOI.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}\n\n"
    "{% else %}"
    "{% if m['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image_placeholder>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|end_of_sentence|>{% endif %}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

# Words every tiny model must know: the judge prompts, answers and a few caption words.
BASE_WORDS = sorted(
    set(re.findall(r"\w+|[^\w\s]", " ".join([JUDGE_SYSTEM, JUDGE_QUESTION, PROB_QUESTION])))
    | set("Yes No yes no Answer answer Describe describe the image then a an and of 0 1 2 3 4".split())
    | set("red green blue yellow purple circle square triangle left right above below".split())
)


def build_tokenizer(words: list[str] | tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over BASE_WORDS + `words`; unknown words map to <|unk|>."""
    specials = list(SPECIAL.values())
    vocab_words = specials + sorted(set(BASE_WORDS) | {w for w in words if w not in specials})
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(specials)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
        extra_special_tokens={"image_token": SPECIAL["image"], "boi_token": SPECIAL["boi"],
                              "eoi_token": SPECIAL["eoi"]},
    )


@dataclass
class TinySpec:
    """Sizes of a tiny Janus. Constraints (DESIGN.md section 5) are checked in `janus_config`.

    image_size: pixels of generated and understood images.
    vision_patch: patch of the understanding encoder -> (image_size / vision_patch)**2 vision tokens.
    vq_patch: down-sampling of the VQ-VAE -> (image_size / vq_patch)**2 generated image tokens.
    """

    image_size: int = 32
    vision_patch: int = 8
    vq_patch: int = 8
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 1
    codebook: int = 64
    vq_embed_dim: int = 8
    vq_base_channels: int = 32
    vq_channel_multiplier: list[int] = field(default_factory=list)
    vq_res_blocks: int = 1
    vq_latent_channels: int | None = None  # default 4 * vq_embed_dim
    max_position: int = 1024


def janus_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> JanusConfig:
    """A JanusConfig for `spec` whose special-token ids match `tokenizer`."""
    if spec.image_size % spec.vq_patch or spec.image_size % spec.vision_patch:
        raise ValueError("image_size must be a multiple of vq_patch and vision_patch")
    mult = spec.vq_channel_multiplier or [1] * (int(spec.vq_patch).bit_length())
    if 2 ** (len(mult) - 1) != spec.vq_patch:
        raise ValueError(f"vq_channel_multiplier {mult} down-samples by {2 ** (len(mult) - 1)}, "
                         f"not vq_patch={spec.vq_patch}")
    if any((spec.vq_base_channels * m) % 32 for m in mult):
        raise ValueError("VQ channels must be multiples of 32 (GroupNorm(32))")
    vq_grid = spec.image_size // spec.vq_patch
    # JanusConfig ties the VQ grid to image_size // vision_config.patch_size: build it with the VQ
    # patch, then give the vision encoder its own patch (recorded in `vq_num_patches` so that
    # models.janus.load_janus can restore it on reload).
    cfg = JanusConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=spec.hidden,
            intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_position, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_layers, num_attention_heads=2,
            image_size=spec.image_size, patch_size=spec.vq_patch, projection_dim=spec.hidden,
            num_image_tokens=vq_grid * vq_grid, mlp_ratio=2.0,
        ),
        vq_config=dict(
            num_embeddings=spec.codebook, embed_dim=spec.vq_embed_dim, base_channels=spec.vq_base_channels,
            channel_multiplier=mult, num_res_blocks=spec.vq_res_blocks,
            latent_channels=spec.vq_latent_channels or spec.vq_embed_dim * 4,
            projection_dim=spec.hidden, image_token_embed_dim=spec.hidden,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL["image"]),
        tie_word_embeddings=False,
    )
    cfg.vision_config.patch_size = spec.vision_patch
    cfg.vq_num_patches = vq_grid
    cfg.vision_tokens = (spec.image_size // spec.vision_patch) ** 2
    return cfg


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, vision_tokens: int) -> JanusProcessor:
    """A JanusProcessor with the PIL image backend (no torchvision) and [-1, 1] pixel normalisation."""
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, min_size=4,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        num_image_tokens=vision_tokens,
    )


def _spread_weights(model: JanusForConditionalGeneration, std: float) -> None:
    """Re-draw the language model and generation weights with a larger std.

    At HF's default init (0.02) a random tiny model puts nearly all mass on one token, so greedy
    outputs are constant and tests comparing two decoders would prove little.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and ("language_model" in name or "generation_" in name or "lm_head" in name):
                p.normal_(0.0, std)


def build_tiny_parts(spec: TinySpec | None = None, words: tuple[str, ...] = (), seed: int = 0,
                     init_std: float | None = 0.3):
    """(JanusForConditionalGeneration, JanusProcessor) with random weights, deterministic by seed."""
    spec = spec or TinySpec()
    tokenizer = build_tokenizer(words)
    config = janus_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    if init_std:
        _spread_weights(model, init_std)
    processor = build_processor(tokenizer, spec.image_size, config.vision_tokens)
    return model, processor


def build_tiny(spec: TinySpec | None = None, words: tuple[str, ...] = (), seed: int = 0,
               init_std: float | None = 0.3):
    """A tiny random `models.janus.JanusUnified` (the object every test uses)."""
    from models.janus import JanusUnified

    model, processor = build_tiny_parts(spec, words, seed, init_std)
    return JanusUnified(model, processor)
