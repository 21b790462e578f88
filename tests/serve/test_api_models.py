"""The request models of serve/api_models.py without a server: each rule refuses with a 422 naming
the field (what the HTTP tests see through the routes, here case by case and fast)."""

from __future__ import annotations

import math

import pytest

from serve.chat import parse_chat
from serve.validation import Limits, RequestError, parse_generation, parse_judge
from tests.serve.serve_helpers import png_b64

LIMITS = Limits(max_prompt_chars=64, max_n=4, max_best_of=8)
IMG = "data:image/png;base64," + png_b64()


def _chat(**over):
    body = {"model": "round-1", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Is there a red circle?"}, {"type": "image_url", "image_url": {"url": IMG}}]}]}
    return {**body, **over}


def _refused(parse, body) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse(body, LIMITS)
    assert e.value.status == 422 and e.value.message
    return e.value


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a red circle", "n": True}, "n"),
    ({"prompt": "a red circle", "n": 2.0}, "n"),
    ({"prompt": "a red circle", "seed": 2**63}, "seed"),
    ({"prompt": "a red circle", "cfg_weight": math.nan}, "cfg_weight"),
    ({"prompt": "a red circle", "cfg_weight": math.inf}, "cfg_weight"),
    ({"prompt": "a red circle", "cfg_weight": 10**400}, "cfg_weight"),
    ({"prompt": "a red circle", "cfg_weight": "2"}, "cfg_weight"),
    ({"prompt": "a red circle", "round": 10**6 + 1}, "round"),
    ({"prompt": "a red circle", "best_of": 9}, "best_of"),
    ({"prompt": "x" * 65}, "prompt"),
    ({"prompt": "a tab\there"}, "prompt"),
    ({"promt": "a red circle"}, "promt"),  # the typo is named, not the 'missing' prompt
])
def test_generation_rules_name_the_field(body, field):
    e = _refused(parse_generation, body)
    assert e.field == field
    assert len(e.message) < 200  # a 400-digit number or a long prompt is not echoed back


def test_a_valid_request_comes_back_typed_and_trimmed():
    req = parse_generation({"prompt": "  a red circle ", "n": 2, "cfg_weight": 3, "best_of": 4}, LIMITS)
    assert (req.prompt, req.n, req.cfg_weight, req.best_of, req.round) == ("a red circle", 2, 3.0, 4, None)
    assert parse_generation({"prompt": "a red circle"}, LIMITS, header_round="2").round == 2
    call = parse_judge({"prompt": "a red circle", "image": IMG}, LIMITS)
    assert call.image.mode == "RGB" and call.round is None


@pytest.mark.parametrize("over, field", [
    ({"stream": True}, "stream"),
    ({"temperature": 0.5}, "temperature"),
    ({"n": 2}, "n"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"model": "gpt-4o"}, "model"),
    ({"functions": []}, "functions"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "no image"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                 {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages"),
])
def test_chat_rules_name_the_field(over, field):
    assert _refused(parse_chat, _chat(**over)).field == field


def test_a_chat_request_with_a_system_message_and_logprobs():
    body = _chat(temperature=0, logprobs=True, top_logprobs=2, max_completion_tokens=8, stream=False, user="u1")
    body["messages"] = [{"role": "system", "content": "Answer yes or no."}] + body["messages"]
    req = parse_chat(body, LIMITS)
    assert (req.question, req.system, req.round, req.max_tokens, req.logprobs) == (
        "Is there a red circle?", "Answer yes or no.", 1, 8, True)
    assert parse_chat(_chat(model="unigap"), LIMITS).round is None


def test_content_parts_may_carry_the_other_kinds_key_as_null():
    # What ray.data.llm's HTTP processor sends after the messages went through Arrow.
    body = _chat()
    text, image = body["messages"][0]["content"]
    body["messages"][0]["content"] = [{**text, "image_url": None}, {**image, "text": None}]
    assert parse_chat(body, LIMITS).question == "Is there a red circle?"
    body["messages"][0]["content"][0]["image_url"] = {"url": IMG}  # not null: a part of two kinds
    assert _refused(parse_chat, body).field == "messages"
