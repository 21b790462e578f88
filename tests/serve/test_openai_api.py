"""The OpenAI-compatible routes of a real local Serve app (fixtures: conftest.py): chat completions
answered by a round's understanding branch, the `openai` client, and the audit's HTTP judge
(`audit.backend=openai_http` through ray.data.llm) against this server."""

from __future__ import annotations

import base64
import io
import math
import os

import pytest
from PIL import Image

from pipelines.config import load_config
from tests.serve.serve_helpers import KEY, KEY_ENV, REPO, png_b64

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _chat_body(question="Is there a red circle?", model="round-1", **extra):
    content = [{"type": "text", "text": question},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def test_openai_chat_completions_answer_with_the_rounds_understanding_branch(server, http):
    from models.loading import load_model
    from models.lora import load_adapter  # unmerged, as the server computes (one base, named adapters)
    from serve.contradictions import open_run

    auth = {"authorization": f"Bearer {KEY}"}
    ids = [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]]
    assert ids == ["unigap", "round-0", "round-1", "round-2", "round-3"]
    r = http.post("/v1/chat/completions", json=_chat_body(logprobs=True, top_logprobs=2, max_tokens=8), headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    m = load_adapter(load_model("tiny"), open_run(server["run_dir"]).adapter_dir(1))
    img = Image.open(io.BytesIO(base64.b64decode(png_b64())))
    assert body["object"] == "chat.completion" and body["model"] == "round-1"
    assert body["choices"][0]["message"]["content"] == m.answer([img], ["Is there a red circle?"], max_new_tokens=8)[0]
    top = {t["token"]: math.exp(t["logprob"]) for t in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    assert top["Yes"] == pytest.approx(m.p_yes([img], ["Is there a red circle?"])[0], abs=1e-4)
    assert top["Yes"] + top["No"] == pytest.approx(1.0, abs=1e-6)
    default = http.post("/v1/chat/completions", json=_chat_body(model="unigap", max_tokens=8), headers=auth).json()
    assert default["model"] == "unigap" and default["system_fingerprint"] == "unigap-round-1"  # the promoted round
    assert http.post("/v1/chat/completions", json=_chat_body()).status_code == 401
    for bad, field in [(_chat_body(temperature=0.7), "temperature"), (_chat_body(model="gpt-4o"), "model"),
                       (_chat_body(max_tokens=1000), "max_tokens"), (_chat_body(stream=True), "stream"),
                       ({**_chat_body(), "messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
                       (_chat_body(question="a\x00b"), "messages"), (_chat_body(model="round-9"), "round")]:
        r = http.post("/v1/chat/completions", json=bad, headers=auth)
        assert r.status_code == 422 and r.json()["field"] == field, (bad, r.text)
    url_body = _chat_body()
    url_body["messages"][0]["content"][1]["image_url"]["url"] = "http://example.com/x.png"
    assert http.post("/v1/chat/completions", json=url_body, headers=auth).json()["field"] == "messages"


def test_the_openai_client_talks_to_unigap_serve(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()][:2] == ["unigap", "round-0"]
    out = client.chat.completions.create(model="round-2", max_tokens=8, logprobs=True, top_logprobs=2,
                                         **{"messages": _chat_body()["messages"]})
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert {t.token for t in out.choices[0].logprobs.content[0].top_logprobs} == {"Yes", "No"}


def test_an_audit_judge_over_http_matches_the_same_checkpoint_in_process(server):
    """audit.backend=openai_http through ray.data.llm against this live server (round 2 as the judge)
    gives the verdicts the round-2 model gives in process: same images, same question."""
    from models.loading import load_model
    from models.lora import load_adapter  # unmerged, as the server computes (one base, named adapters)
    from pipelines.audit import make_external_judge
    from pipelines.http_judge import ExternalJudgeError
    from serve.contradictions import open_run

    m = load_adapter(load_model("tiny"), open_run(server["run_dir"]).adapter_dir(2))
    prompts = ["a red circle", "two blue squares", "a green triangle", "a red square"] * 2
    out = m.generate_images(prompts[:4], num_images=2, seed=list(range(4)))
    images = [im for row in out.images for im in row]
    prompts = [p for p in prompts[:4] for _ in range(2)]
    expected = [s >= 0.5 for s in m.judge(images, prompts, mode="prob").score]
    assert True in expected and False in expected  # a judge that always says one thing would fail
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        "audit.backend=openai_http", f"audit.http_url={server['url']}/v1/chat/completions",
        "audit.http_model=round-2", f"audit.http_api_key_env={KEY_ENV}", "audit.http_concurrency=1"])
    judge = make_external_judge(cfg.audit)
    assert judge.verdicts(images, prompts) == expected and judge.unparseable == 0
    wrong = make_external_judge(load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        "audit.backend=openai_http", f"audit.http_url={server['url']}/v1/chat/completions",
        "audit.http_model=round-99", f"audit.http_api_key_env={KEY_ENV}"]).audit)
    with pytest.raises(ExternalJudgeError, match="no yes/no verdict"):  # a 422 body is not a "no"
        wrong.verdicts(images[:2], prompts[:2])
