"""Ray Serve app end to end: a real local Serve on 127.0.0.1, the tiny model, a two-adapter run dir.

One app for the whole module (fixtures `server`, `http`: tests/serve/conftest.py; the run dir:
serve_helpers.make_run -- adapters for rounds 1 and 2 that change outputs, a corrupt round 3,
`best` -> 1, and an API key, so every call but /healthz sends it). The OpenAI-compatible routes
are tested in test_openai_api.py.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from serve.client import UnigapClient, UnigapHTTPError
from tests.serve.serve_helpers import KEY, PROMPT, THRESHOLD, pixels, png_b64

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


# --------------------------------------------------------------------------- endpoints

def test_healthz_is_open_and_reports_the_promoted_round(server, http):
    r = http.get("/healthz")  # no API key: health checks must not need the secret
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["round"] == 1 and body["rounds"] == [0, 1, 2, 3]
    assert body["batching"] is True


def test_generate_returns_n_images_with_own_scores(server):
    c = server["client"]
    r = c.generate(PROMPT, n=3, seed=11)
    assert r.round == 1 and r.seed == 11 and r.n == 3 and r.mode == "prob"
    assert [im.index for im in r.images] == [0, 1, 2]
    assert len({im.seed for im in r.images}) == 3
    for im in r.images:
        assert im.image().size == (32, 32)
        assert im.valid and 0.0 <= im.score <= 1.0
    # The judge route scores the same pixels the same way (PNG is lossless).
    verdict = c.judge(PROMPT, r.images[0].png())
    assert verdict.round == 1 and verdict.valid and verdict.mode == "prob"
    assert verdict.score == pytest.approx(r.images[0].score, abs=1e-4)


def test_no_seed_draws_one_and_returns_it(server):
    c = server["client"]
    r = c.generate(PROMPT)
    again = c.generate(PROMPT, seed=r.seed)
    assert r.images[0].b64_png == again.images[0].b64_png


def test_same_round_and_seed_reproduce_and_rounds_differ(server, http):
    c = server["client"]
    a, b = c.generate(PROMPT, n=2, seed=5, round=1), c.generate(PROMPT, n=2, seed=5, round=1)
    assert [i.b64_png for i in a.images] == [i.b64_png for i in b.images]
    default = c.generate(PROMPT, n=2, seed=5)  # no round: the promoted best (1)
    assert default.round == 1 and [i.b64_png for i in default.images] == [i.b64_png for i in a.images]
    other = {k: c.generate(PROMPT, n=2, seed=5, round=k) for k in (0, 2)}
    for k, r in other.items():
        assert r.round == k
        assert not all(np.array_equal(pixels(x.b64_png), pixels(y.b64_png)) for x, y in zip(r.images, a.images))
    # Serve's multiplexing header selects the round like the body field does.
    via_header = http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "seed": 5},
                           headers={"x-api-key": KEY, "serve_multiplexed_model_id": "2"}).json()
    assert via_header["round"] == 2
    assert [i["b64_png"] for i in via_header["images"]] == [i.b64_png for i in other[2].images]


def test_best_of_returns_the_highest_judged_candidates(server):
    from models.loading import load_model
    from models.lora import load_adapter  # unmerged, as the server computes (one base, named adapters)
    from serve.contradictions import open_run

    k, n, seed = 6, 2, 21
    r = server["client"].generate(PROMPT, n=n, best_of=k, seed=seed, round=1)
    # Score all k candidates ourselves with the same round's model.
    m = load_adapter(load_model("tiny"), open_run(server["run_dir"]).adapter_dir(1))
    out = m.generate_images([PROMPT], num_images=k, seed=[seed], cfg_weight=r.cfg_weight)
    scores = m.judge(out.images[0], [PROMPT] * k, mode="prob").score
    expected = sorted(range(k), key=lambda i: -scores[i])[:n]
    assert [im.index for im in r.images] == expected
    assert [im.score for im in r.images] == pytest.approx([scores[i] for i in expected], abs=1e-4)
    assert r.images[0].score >= r.images[1].score >= sorted(scores)[-n]
    for im in r.images:
        assert np.array_equal(pixels(im.b64_png), np.asarray(out.images[0][im.index]))


def test_concurrent_mixed_requests_match_requests_sent_alone(server):
    c = server["client"]
    asks = [dict(n=1, seed=1), dict(n=3, seed=2), dict(n=2, seed=3, round=2), dict(n=1, best_of=4, seed=4),
            dict(n=2, seed=5, cfg_weight=1.0), dict(n=1, seed=6, round=0)]
    with ThreadPoolExecutor(len(asks)) as pool:  # arrive together: batched and grouped by round/cfg
        together = list(pool.map(lambda kw: c.generate(PROMPT, **kw), asks))
    alone = [c.generate(PROMPT, **kw) for kw in asks]
    for t, a, kw in zip(together, alone, asks):
        assert len(t.images) == kw["n"] and t.round == a.round
        assert [i.index for i in t.images] == [i.index for i in a.images]
        for x, y in zip(t.images, a.images):
            assert x.seed == y.seed
            # Same tokens; the VQ decoder's float output differs in the last bits with the batch
            # size, so a pixel may round to a neighbouring level.
            assert np.abs(pixels(x.b64_png).astype(int) - pixels(y.b64_png)).max() <= 2
            assert x.score == pytest.approx(y.score, abs=1e-3)


def test_a_corrupt_adapter_fails_only_its_own_requests(server):
    c = server["client"]
    with ThreadPoolExecutor(2) as pool:  # arrive together: one batch, two round groups
        bad = pool.submit(c.generate, PROMPT, seed=1, round=3)
        good = pool.submit(c.generate, PROMPT, seed=1, round=1)
        with pytest.raises(UnigapHTTPError) as e:
            bad.result()
        assert good.result().round == 1
    assert e.value.status == 503 and "round 3 cannot be loaded" in e.value.message
    assert c.health().status == "ok"


def test_judge_route_per_round(server):
    c = server["client"]
    img = Image.open(io.BytesIO(base64.b64decode(png_b64())))
    scores = {k: c.judge("a red square", img, round=k) for k in (0, 1, 2)}
    for k, v in scores.items():
        assert v.round == k and v.valid and 0.0 <= v.score <= 1.0
    assert len({round(v.score, 6) for v in scores.values()}) > 1  # the rounds' judges differ


# --------------------------------------------------------------------------- bad input

def _gen(**body):
    return ("/v1/images/generations", {"json": body})


BAD = {
    "prompt missing": (_gen(n=1), 422, "prompt"),
    "prompt empty": (_gen(prompt="   "), 422, "prompt"),
    "prompt not a string": (_gen(prompt=123), 422, "prompt"),
    "prompt too long": (_gen(prompt="x" * 65), 422, "prompt"),
    "n zero": (_gen(prompt=PROMPT, n=0), 422, "n"),
    "n over max_n": (_gen(prompt=PROMPT, n=5), 422, "n"),
    "n a string": (_gen(prompt=PROMPT, n="2"), 422, "n"),
    "n a bool": (_gen(prompt=PROMPT, n=True), 422, "n"),
    "best_of below n": (_gen(prompt=PROMPT, n=3, best_of=2), 422, "best_of"),
    "best_of over max": (_gen(prompt=PROMPT, n=1, best_of=9), 422, "best_of"),
    "seed negative": (_gen(prompt=PROMPT, seed=-1), 422, "seed"),
    "seed a float": (_gen(prompt=PROMPT, seed=1.5), 422, "seed"),
    "cfg_weight below 1": (_gen(prompt=PROMPT, cfg_weight=0.5), 422, "cfg_weight"),
    "cfg_weight NaN": (("/v1/images/generations", {"content": b'{"prompt": "a", "cfg_weight": NaN}'}), 422, "cfg_weight"),  # noqa: E501
    "cfg_weight Infinity": (("/v1/images/generations", {"content": b'{"prompt": "a", "cfg_weight": Infinity}'}), 422, "cfg_weight"),  # noqa: E501
    "unknown round": (_gen(prompt=PROMPT, round=7), 422, "round"),
    "negative round": (_gen(prompt=PROMPT, round=-1), 422, "round"),
    "bad round header": (("/v1/images/generations", {"json": {"prompt": PROMPT}, "headers": {"serve_multiplexed_model_id": "best"}}), 422, "serve_multiplexed_model_id"),  # noqa: E501
    "round header disagrees": (("/v1/images/generations", {"json": {"prompt": PROMPT, "round": 1}, "headers": {"serve_multiplexed_model_id": "2"}}), 422, "round"),  # noqa: E501
    "unknown field": (_gen(prompt=PROMPT, num_images=2), 422, "num_images"),
    "malformed JSON": (("/v1/images/generations", {"content": b'{"prompt": "a",'}), 400, "body"),
    "empty body": (("/v1/images/generations", {"content": b""}), 400, "body"),
    "JSON array body": (("/v1/images/generations", {"json": [PROMPT]}), 422, "body"),
    "wrong content type": (("/v1/images/generations", {"content": b'{"prompt": "a"}', "headers": {"content-type": "text/plain"}}), 415, "content-type"),  # noqa: E501
    "body too large": (("/v1/images/generations", {"content": b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}'}), 413, "body"),  # noqa: E501
    "judge image missing": (("/v1/judge", {"json": {"prompt": PROMPT}}), 422, "image"),
    "judge image not base64": (("/v1/judge", {"json": {"prompt": PROMPT, "image": "not base64 !!"}}), 422, "image"),
    "judge base64 not an image": (("/v1/judge", {"json": {"prompt": PROMPT, "image": base64.b64encode(b"hello world").decode()}}), 422, "image"),  # noqa: E501
    "judge image too many pixels": (("/v1/judge", {"json": {"prompt": PROMPT, "image": png_b64((2100, 2100))}}), 413, "image"),  # noqa: E501
    "judge image too many bytes": (("/v1/judge", {"json": {"prompt": PROMPT, "image": "A" * (6 * 2**20)}}), 413, "image"),  # noqa: E501
    "judge prompt missing": (("/v1/judge", {"json": {"image": png_b64()}}), 422, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_stays_healthy(server, http, case):
    (path, spec), status, field = BAD[case]
    kwargs = dict(spec)
    headers = {"x-api-key": KEY, **kwargs.pop("headers", {})}
    if "content" in kwargs:  # raw bytes: say JSON unless the case sets its own content type
        headers.setdefault("content-type", "application/json")
    r = http.post(path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and body["status"] == status and body["error"]
    assert http.get("/healthz").json()["status"] == "ok"


def test_wrong_method_and_unknown_route_are_4xx(server, http):
    assert http.get("/v1/images/generations").status_code == 405
    assert http.post("/v1/nothing", json={}).status_code == 404
    assert http.get("/healthz").status_code == 200


def test_client_raises_with_the_server_message(server, http):
    # A rule of the shared request model: refused by the client's copy, with the server's own words.
    with pytest.raises(UnigapHTTPError) as local:
        server["client"].generate(PROMPT, n=2, best_of=1)
    sent = http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "best_of": 1},
                     headers={"x-api-key": KEY})
    assert local.value.status == sent.status_code == 422 and local.value.field == sent.json()["field"] == "best_of"
    assert local.value.message == sent.json()["error"]
    # A limit of the run's config (serve.max_n) only the server knows: its 422 reaches the caller.
    with pytest.raises(UnigapHTTPError) as e:
        server["client"].generate(PROMPT, n=5)
    assert e.value.status == 422 and e.value.field == "n" and "serve.max_n" in e.value.message


def test_the_openapi_page_documents_what_the_routes_check(server, http):
    from serve.api_models import ChatCompletionRequest, GenerationRequest, JudgeRequest

    spec = http.get("/openapi.json").json()  # open, like /healthz: it holds no secret
    assert http.get("/docs").status_code == 200
    paths = spec["paths"]
    assert set(paths) >= {"/healthz", "/v1/images/generations", "/v1/judge", "/v1/chat/completions", "/v1/models"}
    for path, model in (("/v1/images/generations", GenerationRequest), ("/v1/judge", JudgeRequest),
                        ("/v1/chat/completions", ChatCompletionRequest)):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["properties"]) == set(model.model_fields)
        assert body["required"] == [k for k, f in model.model_fields.items() if f.is_required()]
        assert body["additionalProperties"] is False  # unknown fields are refused, and documented so
        assert "422" in paths[path]["post"]["responses"]
    gen = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert gen["required"] == ["prompt"]
    assert gen["properties"]["n"]["minimum"] == 1
    assert max(b.get("maximum", 0) for b in gen["properties"]["cfg_weight"]["anyOf"]) == 20.0
    components = spec["components"]["schemas"]
    assert {"GenerationResponse", "GeneratedImage", "JudgeResponse", "ErrorBody", "ChatCompletion"} <= set(components)
    # What the schema says is what the server does: a body the schema forbids is refused.
    r = http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 0}, headers={"x-api-key": KEY})
    assert r.status_code == 422 and r.json()["field"] == "n"


# --------------------------------------------------------------------------- auth

def test_api_key_is_required_except_for_healthz(server, http):
    body = {"prompt": PROMPT, "seed": 1}
    assert http.post("/v1/images/generations", json=body).status_code == 401
    assert http.post("/v1/images/generations", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    assert http.post("/v1/judge", json={"prompt": PROMPT, "image": png_b64()},
                     headers={"authorization": "Bearer wrong"}).status_code == 401
    # Auth comes first: a bad body without a key is still a 401, and says nothing about the body.
    r = http.post("/v1/images/generations", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["field"] == "api_key"
    ok = http.post("/v1/images/generations", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["round"] == 1
    with pytest.raises(UnigapHTTPError) as e:
        UnigapClient(server["url"]).generate(PROMPT)
    assert e.value.status == 401
    assert UnigapClient(server["url"]).health().status == "ok"


# --------------------------------------------------------------------------- contradiction log

def test_contradiction_log_holds_the_low_scored_served_images(server):
    from pipelines.prompts import load_prompts
    from serve.app import contradiction_log_path, read_contradictions

    c = server["client"]
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    responses = [c.generate(p, n=4, seed=s) for s in (100, 101) for p in prompts]
    low = {(r.id, im.seed) for r in responses for im in r.images if im.score < THRESHOLD}
    assert low, "seeded requests should include some low self-scores"
    log = read_contradictions(server["run_dir"]).to_pylist()
    ids = {r.id for r in responses}
    mine = {(row["request_id"], row["seed"]): row for row in log if row["request_id"] in ids}
    assert set(mine) == low  # exactly the served images below the threshold
    for row in mine.values():
        assert row["score"] < THRESHOLD and row["round"] == 1 and row["prompt"] in prompts
        assert Image.open(io.BytesIO(row["png"])).size == (32, 32)
        assert row["time"] is not None
    rows, report = load_prompts(contradiction_log_path(server["run_dir"]), max_tokens=64)
    assert {r["prompt"] for r in rows} >= {row["prompt"] for row in mine.values()}
    assert all(r["category"] == "contradiction_log" for r in rows) and report.kept == len(rows)


# --------------------------------------------------------------------------- CLI and builder (no Ray)

def test_cli_has_serve_and_builder_checks_its_args(tmp_path):
    from pipelines.cli import build_parser
    from serve.app import build_app

    args = build_parser().parse_args(["serve", "runs/x", "--port", "9001", "--no-batching", "--set", "serve.max_n=2"])
    assert args.command == "serve" and args.port == 9001 and args.no_batching and args.overrides == ["serve.max_n=2"]
    with pytest.raises(ValueError, match="run_dir"):
        build_app({"model": "tiny"})
    with pytest.raises(ValueError, match="not a run directory"):
        build_app({"run_dir": str(tmp_path / "nothing")})
