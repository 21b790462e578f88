"""JanusUnified against transformers' own Janus: generation, log-probs, judge, input checks."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from models.base import UnifiedModel
from models.janus import JanusUnified, parse_binary_answer


def hf_generate(m: JanusUnified, prompts, cfg):
    ids, mask = m.encode_generation_prompts(prompts)
    gc = GenerationConfig(bos_token_id=m.bos_id, pad_token_id=m.pad_id, eos_token_id=m.tokenizer.eos_token_id,
                          generation_kwargs={"boi_token_id": m.boi_id}, do_sample=False, guidance_scale=cfg)
    return m.janus.generate(input_ids=ids, attention_mask=mask, generation_mode="image", generation_config=gc)


def test_satisfies_protocol(tiny):
    assert isinstance(tiny, UnifiedModel)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("cfg", [5.0, 1.5])
def test_greedy_equals_transformers_generate(tiny, prompts, cfg, fast):
    tiny.fast_decode = fast
    try:
        ours = tiny.generate_images(prompts, num_images=1, seed=0, cfg_weight=cfg, greedy=True).tokens[:, 0]
    finally:
        tiny.fast_decode = True
    theirs = hf_generate(tiny, prompts, cfg)
    assert ours.shape == (3, tiny.num_image_tokens)
    assert len(set(ours.flatten().tolist())) > 3, "degenerate random model: the comparison would prove little"
    assert torch.equal(ours, theirs)


def test_cfg_one_means_no_guidance(tiny, prompts):
    """cfg_weight == 1 (which HF's image generation crashes on) equals the conditional branch alone."""
    out = tiny.generate_images(prompts, num_images=1, seed=0, cfg_weight=1.0, greedy=True)
    logits = tiny.image_logits(*tiny.encode_generation_prompts(prompts), out.tokens[:, 0])
    assert torch.equal(out.tokens[:, 0], logits.argmax(-1))


@pytest.mark.parametrize("cfg", [None, 1.0, 3.0])
def test_image_logprobs_reproduce_generation(tiny, prompts, cfg):
    out = tiny.generate_images(prompts, num_images=2, seed=11, cfg_weight=cfg or 1.0, temperature=1.0,
                               return_logprobs=True)
    flat_prompts = [p for p in prompts for _ in range(2)]
    lp = tiny.image_logprobs(flat_prompts, out.tokens.reshape(6, -1), cfg_weight=cfg)
    torch.testing.assert_close(lp.per_token, out.logprobs.reshape(6, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.total, lp.per_token.sum(-1))
    assert (lp.per_token <= 0).all()


def test_image_logprobs_have_gradients(tiny, prompts):
    toks = torch.randint(0, 64, (3, tiny.num_image_tokens))
    lp = tiny.image_logprobs(prompts, toks)
    lp.total.sum().backward()
    grad = tiny.janus.model.generation_head.vision_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny.janus.zero_grad(set_to_none=True)


def test_seed_reproducible_regardless_of_batch(tiny, prompts):
    a = tiny.generate_images(prompts, num_images=3, seed=[5, 6, 7])
    b = tiny.generate_images(prompts, num_images=3, seed=[5, 6, 7], batch_size=1)
    c = tiny.generate_images(prompts[1:], num_images=3, seed=[6, 7])
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[1:], c.tokens)
    d = tiny.generate_images(prompts, num_images=3, seed=[5, 6, 8])
    assert not torch.equal(a.tokens[2], d.tokens[2]), "a different seed must give different samples"
    assert len({tuple(t.tolist()) for t in a.tokens[0]}) == 3, "samples of one prompt must differ"


def test_generation_outputs_images(tiny, prompts):
    out = tiny.generate_images(prompts, num_images=2, seed=0, top_k=5, temperature=0.7)
    assert out.tokens.shape == (3, 2, tiny.num_image_tokens) and out.seeds.shape == (3, 2)
    assert all(len(row) == 2 for row in out.images)
    img = out.images[0][0]
    assert isinstance(img, Image.Image) and img.size == (tiny.image_size, tiny.image_size) and img.mode == "RGB"
    redecoded = tiny.decode_tokens(out.tokens[0])
    assert np.array_equal(np.asarray(redecoded[0]), np.asarray(img))


def test_top_k_restricts_tokens(tiny, prompts):
    out = tiny.generate_images(prompts, num_images=4, seed=1, top_k=1)
    greedy = tiny.generate_images(prompts, num_images=1, seed=0, greedy=True)
    assert torch.equal(out.tokens, greedy.tokens.expand(-1, 4, -1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts="a red circle"), "not a single string"),
        (dict(prompts=["ok", ""]), r"prompts\[1\]"),
        (dict(num_images=0), "num_images"),
        (dict(cfg_weight=-1.0), "cfg_weight"),
        (dict(cfg_weight=float("nan")), "cfg_weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(seed=[1, 2, 3]), "seed has 3 entries"),
    ],
)
def test_generation_rejects_bad_input(tiny, kwargs, message):
    args = dict(prompts=["a red circle", "blue"], num_images=1, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny.generate_images(**args)


def test_logprobs_and_judge_reject_mismatched_lengths(tiny, prompts):
    with pytest.raises(ValueError, match="rows of image_tokens"):
        tiny.image_logprobs(prompts, torch.zeros(2, tiny.num_image_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        tiny.image_logprobs(prompts, torch.zeros(3, 5, dtype=torch.long))
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        tiny.judge([img, img], prompts)
    with pytest.raises(ValueError, match="judge mode"):
        tiny.judge([img], ["a"], mode="vibes")


def test_prob_judge_is_one_forward_in_unit_interval(tiny, prompts):
    imgs = tiny.generate_images(prompts, num_images=1, seed=0).images
    r = tiny.judge([row[0] for row in imgs], prompts, mode="prob")
    assert len(r.score) == 3 and all(0.0 <= s <= 1.0 for s in r.score) and all(r.valid)
    assert len(set(round(s, 6) for s in r.score)) > 1, "different inputs should give different P(Yes)"
    # P(Yes) is the normalised Yes/No mass at the answer position
    inputs = tiny._understanding_inputs([imgs[0][0]], ["Does this image describe a red circle? Answer Yes or No."])
    probs = torch.softmax(tiny.janus(**inputs).logits[0, -1], -1)
    yes, no = probs[tiny._yes_no[0]].sum(), probs[tiny._yes_no[1]].sum()
    assert math.isclose(r.score[0], (yes / (yes + no)).item(), rel_tol=1e-5)


def test_binary_judge_marks_unparseable_answers_invalid(tiny, prompts):
    imgs = [row[0] for row in tiny.generate_images(prompts, num_images=1, seed=0).images]
    r = tiny.judge(imgs, prompts, mode="binary")
    # a random model writes noise: every answer it cannot parse is invalid with a NaN score, never 0
    for score, valid, answer in zip(r.score, r.valid, r.answer):
        assert valid == (parse_binary_answer(answer) is not None)
        assert (not valid and math.isnan(score)) or (valid and score in (0.0, 1.0))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The score is 1", 1.0),
        ("The score is 0.", 0.0),
        ("the score is: 1", 1.0),
        ("The score is {1}", 1.0),
        ("The score is 1 . The score is 1", 1.0),
        ("The score is 2", None),
        ("The score is 10", None),
        ("The score is 0.5", None),
        ("The score is 1 . The score is 0", None),
        ("Yes", None),
        ("", None),
    ],
)
def test_parse_binary_answer(text, expected):
    assert parse_binary_answer(text) == expected


def test_describe_prob_and_answer(tiny, prompts):
    imgs = [row[0] for row in tiny.generate_images(prompts, num_images=1, seed=0).images]
    r = tiny.judge(imgs, prompts, mode="describe_prob")
    assert all(0.0 <= s <= 1.0 for s in r.score) and len(r.answer) == 3
    answers = tiny.answer(imgs, ["What is this?"] * 3, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert tiny.describe(imgs[:1], max_new_tokens=4)[0] == r.answer[0][: len(tiny.describe(imgs[:1], 4)[0])]


def test_fast_understanding_inputs_equal_the_processor(tiny, prompts):
    imgs = [row[0] for row in tiny.generate_images(prompts, num_images=1, seed=0).images]
    questions = ["Does this image describe a red circle? Answer Yes or No.", "x", "Describe the image."]
    ours = tiny._understanding_inputs(imgs, questions)
    texts = [tiny._chat([{"type": "image"}, {"type": "text", "text": " " + q}]) for q in questions]
    theirs = tiny.processor(text=texts, images=imgs, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    other_size = [im.resize((40, 40)) for im in imgs]  # falls back to the processor, which resizes
    assert tiny._understanding_inputs(other_size, questions)["pixel_values"].shape == theirs["pixel_values"].shape


def test_decoded_pixels_do_not_depend_on_the_batch(tiny):
    tokens = torch.randint(0, 64, (11, tiny.num_image_tokens), generator=torch.Generator().manual_seed(0))
    together = [np.asarray(im) for im in tiny.decode_tokens(tokens)]
    alone = [np.asarray(tiny.decode_tokens(tokens[i:i + 1])[0]) for i in range(11)]
    shifted = [np.asarray(im) for im in tiny.decode_tokens(tokens[3:])]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    assert all(np.array_equal(a, b) for a, b in zip(together[3:], shifted))
