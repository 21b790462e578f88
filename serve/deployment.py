"""The Ray Serve deployment: a FastAPI ingress around one JanusUnified per served round.

Where it fits: built by `serve.app.build_app` (never import this module for `--help`: it imports
ray). Routes, fields and status codes are listed in serve/app.py; request checks live in
serve/validation.py, the contradiction log in serve/contradictions.py.

How a request flows:
  1. auth (x-api-key or `Authorization: Bearer`, when `serve.api_key_env` is set) -> 401;
  2. body checks -> 400/413/415/422 with {"error", "field", "status", "id"};
  3. the round: body `round`, else the `serve_multiplexed_model_id` header (Ray routes it to a
     replica that has the round loaded), else the run's `best` pointer (re-read every
     POINTER_TTL_S); 0 or no pointer = the base model; a round without an adapter -> 422;
  4. the job joins a `@serve.batch` queue (or runs alone with batching off); a batch is split into
     groups of equal (round, cfg_weight) and each group is ONE `generate_images` call with one seed
     per request and `num_images = max k` (the model draws sample i of a prompt from the stream
     derive_seed(seed, i), so a request gets the same images whatever it is batched with; extra
     samples of a shorter request are dropped) plus ONE judge call over all candidates; if a group's
     call fails, each of its requests is retried alone, so one bad request fails by itself and its
     batch-mates get the images they would have got unbatched;
  5. best_of = k: the n highest own-judge scores are returned, best first (ties: lower index);
  6. served images scoring below `contradiction_threshold` (or unparseable) go to the log, one
     Parquet part per batch, before the responses are sent.

Models: one copy of the base weights per replica; round k is adapters/round_k loaded onto it as a
named peft adapter (checksum verified, `models.lora.AdapterSet`) and made active for the calls of its
request group; round 0 runs with adapters disabled. `@serve.multiplexed` keeps at most
MAX_ROUNDS_PER_REPLICA rounds (LRU; an evicted round's adapter is deleted before the next call).
A round costs its adapter's size (LoRA + the generation-head copy), not a model copy; decoding pays
the unmerged LoRA's extra matmuls (benchmarks/bench_adapters.py). Model calls and adapter loads run
in a worker thread under one lock, so /healthz answers while a batch computes and the weights never
change under a running forward.

Example (what `serve.app.start_local` does):
    from ray import serve
    from serve.app import build_app
    serve.run(build_app({"run_dir": "runs/tiny"}), name="unigap", route_prefix="/")
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI view needs real annotations
# (a string "Request" makes FastAPI treat `request` as a required query parameter).
import asyncio
import base64
import hashlib
import hmac
import io
import logging
import math
import os
import secrets
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from models.loading import load_model
from models.lora import AdapterSet
from serve.api_models import (ERRORS, ChatCompletion, ChatCompletionRequest, GenerationRequest,
                              GenerationResponse, HealthResponse, JudgeRequest, JudgeResponse, ModelList,
                              documented)
from serve.settings import ServerSettings
from serve.contradictions import ContradictionLog, contradiction_row, open_run
from serve.chat import chat_response, models_response, parse_chat
from serve.round_models import RoundModel
from serve.validation import (MULTIPLEX_HEADER, Limits, RequestError, parse_generation, parse_json_body,
                              parse_judge)

log = logging.getLogger("ray.serve")
POINTER_TTL_S = 10.0  # how stale the default round may be after the driver promotes a new one
MAX_ROUNDS_PER_REPLICA = 8
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "SHA256SUMS")

# /openapi.json and /docs come from serve/api_models.py: the models the routes check with and answer in.
api = FastAPI(title="unigap", version="1", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
              description="Generate, judge and ask about images with a unigap run's model (serve/app.py).")


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body(getattr(request.state, "rid", "")))


@api.exception_handler(Exception)
async def _failed(request: Request, exc: Exception) -> JSONResponse:
    # A model-side failure answers 500 for this request only; the replica keeps serving. The
    # exception goes to the replica's log under the request id, never to the client.
    rid = getattr(request.state, "rid", "")
    log.error("request %s failed", rid, exc_info=(type(exc), exc, exc.__traceback__))
    return JSONResponse(status_code=500, content={"error": f"internal error (request id {rid})", "field": None,
                                                  "status": 500, "id": rid})


@dataclass
class GenJob:
    prompt: str
    n: int
    k: int  # candidates sampled (best_of, or n)
    ranked: bool  # best_of given: return the n best, best first
    seed: int
    cfg_weight: float
    round: int
    request_id: str


@dataclass
class JudgeJob:
    prompt: str
    image: object  # PIL image
    round: int


def _unloadable(round_: int, exc: Exception) -> RequestError:
    """A round whose adapter cannot be loaded (missing file, failed checksum): 503 for its requests,
    the cause in the replica's log."""
    log.error("round %d cannot be loaded", round_, exc_info=(type(exc), exc, exc.__traceback__))
    return RequestError(503, f"round {round_} cannot be loaded on this server (its adapter failed to load; "
                        "see the server log)", "round")


def _score(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


@serve.deployment(name="UnigapServer")
@serve.ingress(api)
class UnigapServer:
    def __init__(self, settings: dict):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.s = ServerSettings(**settings)
        self.limits = Limits(self.s.max_prompt_chars, self.s.max_n, self.s.max_best_of)
        self.key_hash = self._api_key_hash()
        self.store = open_run(self.s.run_dir)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else uuid.uuid4().hex[:8]
        self.log = ContradictionLog(self.store, self.replica)
        self.base = load_model(self.s.model_path, self.s.dtype, self.s.device, judge_mode=self.s.judge_mode)
        self.mode = self.s.judge_mode or self.base.default_judge_mode
        self.adapters = AdapterSet(self.base)  # every round's adapter on this one copy of the weights
        self.lock = asyncio.Lock()
        self._pointer = (-math.inf, 0)  # (read at, default round)
        self._rounds = self._list_rounds()
        self.stats = {"model_calls": 0, "requests": 0, "model_s": 0.0}  # batching at work, in /healthz
        self._generate_batched.set_max_batch_size(self.s.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)
        self._judge_batched.set_max_batch_size(self.s.max_batch_size)
        self._judge_batched.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    # ------------------------------------------------------------------ auth, rounds, models
    def _api_key_hash(self) -> str | None:
        name = self.s.api_key_env
        if not name:
            return None
        if os.environ.get(name):  # the replica's own environment (e.g. a Kubernetes secret) wins
            return hashlib.sha256(os.environ[name].encode()).hexdigest()
        if self.s.api_key_sha256:
            return self.s.api_key_sha256
        # Refuse to start open when auth was asked for: a missing secret must not disable it.
        raise RuntimeError(f"serve.api_key_env={name!r} but ${name} is set neither here nor where the app was built")

    def _authorize(self, request: Request) -> None:
        if self.key_hash is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        digest = hashlib.sha256(given.encode()).hexdigest()
        if not given or not hmac.compare_digest(digest, self.key_hash):
            raise RequestError(401, "missing or wrong API key (x-api-key or Authorization: Bearer)", "api_key")

    def _list_rounds(self) -> set[int]:
        selector = pafs.FileSelector(self.store.path("adapters"), allow_not_found=True)
        names = [i.base_name for i in self.store.fs.get_file_info(selector) if i.type == pafs.FileType.Directory]
        return {0} | {int(n[6:]) for n in names if n.startswith("round_") and n[6:].isdigit()}

    def _default_round(self) -> int:
        at, value = self._pointer
        if time.monotonic() - at > POINTER_TTL_S:
            best = self.store.pointer("best")
            value = best if best and best in self._list_rounds() else 0
            self._pointer = (time.monotonic(), value)
        return value

    def _resolve_round(self, requested: int | None) -> int:
        if requested is None:
            return self._default_round()
        if requested not in self._rounds:
            self._rounds = self._list_rounds()  # a round trained since startup
        if requested not in self._rounds:
            raise RequestError(422, f"round {requested} has no adapter in {self.s.run_dir} "
                               f"(available: {sorted(self._rounds)})", "round")
        return requested

    @serve.multiplexed(max_num_models_per_replica=MAX_ROUNDS_PER_REPLICA)
    async def get_model(self, model_id: str):
        round_ = int(model_id)
        if round_ == 0:
            return RoundModel(self.adapters, None, 0)
        path = await asyncio.to_thread(self._local_adapter, round_)
        async with self.lock:  # peft injects layers: never while a forward runs
            token = await asyncio.to_thread(self.adapters.add, f"round_{round_}", path)
        return RoundModel(self.adapters, f"round_{round_}", token)

    def _local_adapter(self, round_: int) -> str:
        src = self.store.adapter_dir(round_)
        if isinstance(self.store.fs, pafs.LocalFileSystem):
            return src
        import tempfile  # object stores: peft reads local files, so copy the three files down

        dst = tempfile.mkdtemp(prefix=f"unigap-round{round_}-")
        for name in ADAPTER_FILES:
            with self.store.fs.open_input_stream(f"{src}/{name}") as fh, open(os.path.join(dst, name), "wb") as out:
                out.write(fh.read())
        return dst

    # ------------------------------------------------------------------ routes
    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        st = self.stats
        return HealthResponse(status="ok", round=self._default_round(), rounds=sorted(self._rounds),
                              batching=self.s.batching, replica=self.replica,
                              stats={**st, "mean_batch": st["requests"] / max(1, st["model_calls"])})

    async def _body(self, request: Request) -> dict:
        request.state.rid = uuid.uuid4().hex[:16]
        self._authorize(request)
        try:  # the proxy guard (serve/guard.py) already bounds this; the replica does too without it
            body = await asyncio.wait_for(request.body(), self.s.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"request body not received within {self.s.body_timeout_s:g} s", "body") from None
        return parse_json_body(request.headers.get("content-type"), body)

    @api.post("/v1/images/generations", response_model=GenerationResponse, **documented(GenerationRequest))
    async def generate(self, request: Request) -> GenerationResponse:
        req = parse_generation(await self._body(request), self.limits, request.headers.get(MULTIPLEX_HEADER))
        round_ = self._resolve_round(req.round)
        seed = req.seed if req.seed is not None else secrets.randbits(31)  # returned: reproducible
        cfg = req.cfg_weight if req.cfg_weight is not None else self.s.cfg_weight
        job = GenJob(req.prompt, req.n, req.best_of or req.n, req.best_of is not None, seed, cfg, round_,
                     request.state.rid)
        if self.s.batching:
            images = await self._generate_batched(job)
        else:  # the comparison arm: one model call per request
            images = (await self._generate_jobs([job]))[0]
        if isinstance(images, Exception):
            raise images
        return GenerationResponse(id=job.request_id, round=round_, seed=seed, n=req.n, best_of=req.best_of,
                                  cfg_weight=cfg, mode=self.mode, images=images)

    @api.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        self._rounds = self._list_rounds()
        return models_response(sorted(self._rounds))

    @api.post("/v1/chat/completions", response_model=ChatCompletion, **documented(ChatCompletionRequest))
    async def chat(self, request: Request) -> ChatCompletion:
        """OpenAI-compatible: one question about one image, answered by the understanding branch
        (serve/chat.py). Not batched across requests: each answer is a short greedy decode."""
        req = parse_chat(await self._body(request), self.limits)
        round_ = self._resolve_round(req.round)
        try:
            model = await self.get_model(str(round_))
        except Exception as e:
            raise _unloadable(round_, e) from None
        answer, p_yes = await self._locked_call(1, self._chat_one, model, req)
        return chat_response(req, answer, p_yes, round_)

    def _chat_one(self, model, req) -> tuple[str, float | None]:
        answer = model.answer([req.image], [req.question], max_new_tokens=req.max_tokens, system=req.system)[0]
        p_yes = model.p_yes([req.image], [req.question], system=req.system)[0] if req.logprobs else None
        return answer, p_yes

    @api.post("/v1/judge", response_model=JudgeResponse, **documented(JudgeRequest))
    async def judge(self, request: Request) -> JudgeResponse:
        req = parse_judge(await self._body(request), self.limits, request.headers.get(MULTIPLEX_HEADER))
        job = JudgeJob(req.prompt, req.image, self._resolve_round(req.round))
        result = await self._judge_batched(job) if self.s.batching else (await self._judge_jobs([job]))[0]
        if isinstance(result, Exception):
            raise result
        score, valid, answer = result
        return JudgeResponse(id=request.state.rid, round=job.round, score=score, answer=answer, valid=valid,
                             mode=self.mode)

    # ------------------------------------------------------------------ batching
    def _count(self, requests: int, seconds: float) -> None:
        self.stats["model_calls"] += 1
        self.stats["requests"] += requests
        self.stats["model_s"] += seconds

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # real values: set in __init__
    async def _generate_batched(self, jobs: list[GenJob]) -> list[list[dict]]:
        return await self._generate_jobs(jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _judge_batched(self, jobs: list[JudgeJob]) -> list[tuple]:
        return await self._judge_jobs(jobs)

    async def _generate_jobs(self, jobs: list[GenJob]) -> list[list[dict]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.round, job.cfg_weight)].append(i)
        results: list = [None] * len(jobs)
        for (round_, cfg), idx in groups.items():
            try:
                model = await self.get_model(str(round_))
            except Exception as e:  # e.g. a corrupt adapter: fails its group only, not the batch
                for i in idx:
                    results[i] = _unloadable(round_, e)
                continue
            for i, images in zip(idx, await self._isolated(model, [jobs[i] for i in idx], cfg)):
                results[i] = images
        return results

    async def _isolated(self, model, jobs: list[GenJob], cfg: float) -> list:
        """One model call for the group; if it fails, each job alone (its images do not depend on
        its batch-mates), so only the job that fails alone gets the exception."""
        try:
            return await self._locked_call(len(jobs), self._generate_group, model, jobs, cfg)
        except Exception as e:
            if len(jobs) == 1:
                return [e]
        out = []
        for job in jobs:
            try:
                out += await self._locked_call(1, self._generate_group, model, [job], cfg)
            except Exception as e:
                out.append(e)
        return out

    async def _locked_call(self, requests: int, fn, *args):
        async with self.lock:
            t0 = time.perf_counter()
            out = await asyncio.to_thread(fn, *args)
            self._count(requests, time.perf_counter() - t0)
        return out

    def _generate_group(self, model, jobs: list[GenJob], cfg: float) -> list[list[dict]]:
        """One generate call and one judge call for requests sharing (round, cfg_weight)."""
        k_max = max(j.k for j in jobs)
        out = model.generate_images([j.prompt for j in jobs], num_images=k_max, seed=[j.seed for j in jobs],
                                    cfg_weight=cfg, temperature=self.s.temperature, top_k=self.s.top_k)
        cands = [(b, i) for b, j in enumerate(jobs) for i in range(j.k)]
        verdict = model.judge([out.images[b][i] for b, i in cands], [jobs[b].prompt for b, _ in cands], mode=self.mode)
        by_job: dict[int, list] = defaultdict(list)
        for (b, i), score, valid in zip(cands, verdict.score, verdict.valid):
            by_job[b].append((i, score, valid))
        results, log_rows = [], []
        for b, job in enumerate(jobs):
            picked = by_job[b]
            if job.ranked:  # invalid (NaN) scores rank last
                picked = sorted(picked, key=lambda t: (-(t[1] if t[2] and not math.isnan(t[1]) else -1.0), t[0]))
            images = []
            for i, score, valid in picked[:job.n]:
                buf = io.BytesIO()
                out.images[b][i].save(buf, format="PNG")
                seed = int(out.seeds[b, i])
                images.append({"b64_png": base64.b64encode(buf.getvalue()).decode(), "score": _score(score),
                               "valid": bool(valid), "seed": seed, "index": i})
                if not valid or score < self.s.contradiction_threshold:
                    log_rows.append(contradiction_row(job.prompt, buf.getvalue(), score, job.round,
                                                      job.request_id, seed, self.replica))
            results.append(images)
        self.log.write(log_rows)  # before the responses: a client that saw the image finds the row
        return results

    async def _judge_jobs(self, jobs: list[JudgeJob]) -> list[tuple]:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.round].append(i)
        results: list = [None] * len(jobs)
        for round_, idx in groups.items():
            try:
                model = await self.get_model(str(round_))
            except Exception as e:  # fails this round's requests only
                for i in idx:
                    results[i] = _unloadable(round_, e)
                continue
            parts = [idx]
            try:
                verdicts = [await self._locked_call(len(idx), self._judge_group, model, [jobs[i] for i in idx])]
            except Exception:  # one bad job must not fail its batch-mates: each alone
                parts, verdicts = [[i] for i in idx], []
                for i in idx:
                    try:
                        verdicts.append(await self._locked_call(1, self._judge_group, model, [jobs[i]]))
                    except Exception as e:
                        verdicts.append(e)
            for part, verdict in zip(parts, verdicts):
                for j, i in enumerate(part):
                    results[i] = verdict if isinstance(verdict, Exception) else verdict[j]
        return results

    def _judge_group(self, model, jobs: list[JudgeJob]) -> list[tuple]:
        verdict = model.judge([j.image for j in jobs], [j.prompt for j in jobs], self.mode)
        return [(_score(verdict.score[j]), bool(verdict.valid[j]), verdict.answer[j] if verdict.answer else "")
                for j in range(len(jobs))]
