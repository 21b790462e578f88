"""The external judge and the audit: a round is promoted only if a judge that is NOT the model agrees.

Where it fits: after `pipelines.evaluate.evaluate_round` (which asks an `ExternalJudge` about the
round's held-out generations) the driver calls `audit(history, candidate, cfg.audit)` and promotes
the round's adapter or rolls back. The Nonunified score alone never decides: with poor supervision
both branches degrade while the internal gap still shrinks (Han et al., "co-degradation").

External judges (all answer "does this image show this prompt?" with a bool):
  * `OracleJudge`   the exact shapes-world oracle (`shapes.oracle.check_many`);
  * `VLMJudge`      any transformers image-text-to-text model (Qwen2.5-VL, LLaVA, ...) asked the
                    same question as our own prob judge (`models.base.PROB_QUESTION`), verdict
                    P(Yes) / (P(Yes) + P(No)) >= 0.5; a Janus checkpoint goes through
                    `models.loading.load_model` and `judge(mode="prob")` instead;
  * `OpenAIHTTPJudge`, `VLLMJudge` (pipelines/http_judge.py)   the same question through
                    ray.data.llm: any OpenAI-compatible endpoint, or vLLM engines in the job;
  * `RandomJudge`, `InvertedJudge`   controls for tests (a broken external judge must be caught).

Decision rule (`audit`, a pure function): the candidate's external metric (`eval/<metric>`) is
compared with the best promoted round so far (round 0, the base model, is the initial best).
  delta = value - best_value
  degraded  when delta < -tolerance          (a drop of exactly `tolerance` is still allowed)
  promote   when delta >= 0                  (ties promote: "not worse" is the paper's bar, and
                                              the newer round has the smaller internal gap)
  hold      otherwise (-tolerance <= delta < 0): neither promoted nor degraded; the best stays.
  With `audit.paired_rollback` (metric gen_accuracy or val_accuracy), a round is also degraded when
  its paired gain over the base model (`eval/gen_gain_vs_base` / `eval/val_gain_vs_base`, same
  prompts and seeds, bootstrap 95% CI over prompts) lies entirely below 0: a slow drift that stays
  inside the tolerance of each comparison is caught once it is significant (the inverted-judge arm:
  round 2 instead of round 4).
  With `audit.max_und_drop`, a round is also degraded when its understanding accuracy
  (`eval/und_accuracy`, the own judge on held-out (image, prompt) pairs) is more than that below the
  base model's: a round must not buy generation with understanding (CPR caption rows did, README
  Experiment 6).
`val_accuracy` audits on the validation slice (`eval.validation_prompts`: training-distribution
prompts never trained on), so which round is promoted is never chosen on the held-out prompts.
Comparisons use a 1e-9 slack so float noise (0.50 - 0.52 = -0.02000000000000002) does not flip a
decision. The reason string, kept in the manifest, says which branch applied and whether the
change is inside the candidate's 95% CI (i.e. within sampling noise). `und_win_rate` is measured
against the base model, so the base's own value is 0.5 by definition (it agrees with itself), and
a round whose understanding verdicts never differ from the base's (n = 0, NaN rate) is also 0.5.

Example:
    >>> from pipelines.config import load_config
    >>> cfg = load_config(None, ["audit.tolerance=0.02"])
    >>> history = [{"round": 0, "eval/gen_accuracy": 0.10, "audit/promote": True}]
    >>> d = audit(history, {"round": 1, "eval/gen_accuracy": 0.09}, cfg.audit)
    >>> d.promote, d.degraded, d.best_round
    (False, False, 0)
    >>> audit(history, {"round": 1, "eval/gen_accuracy": 0.07}, cfg.audit).degraded
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from PIL import Image

from models.seeds import stable_bits

EPS = 1e-9
WIN_RATE_NEUTRAL = 0.5
"""und_win_rate of the base model against itself, and of a round that never disagrees with it."""
PAIRED_GAIN = {"gen_accuracy": "eval/gen_gain_vs_base", "val_accuracy": "eval/val_gain_vs_base"}
"""audit.metric -> its paired gain over the base model (same prompts, same seeds), whose CI
audit.paired_rollback reads."""


@runtime_checkable
class ExternalJudge(Protocol):
    """A judge that is not the model being trained."""

    name: str

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        """True where the image shows its prompt; one verdict per (image, prompt)."""
        ...


def _check_aligned(images: Sequence, prompts: Sequence) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


class OracleJudge:
    """The shapes world's exact oracle (only knows shapes-world prompts)."""

    name = "oracle"

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        from shapes.oracle import check_many

        return [bool(v) for v in check_many(images, prompts)]


class RandomJudge:
    """Coin flips fixed by (seed, prompt, image bytes): a useless external judge, for tests."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.name = f"random:{seed}"

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        _check_aligned(images, prompts)
        out = []
        for image, prompt in zip(images, prompts):
            out.append(stable_bits(f"{self.seed}/{prompt}/".encode() + image.convert("RGB").tobytes(), 1) % 2 == 1)
        return out


class InvertedJudge:
    """The opposite of another judge: an adversarial external judge, for tests."""

    def __init__(self, inner: ExternalJudge):
        self.inner = inner
        self.name = f"inverted:{inner.name}"

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        return [not v for v in self.inner.verdicts(images, prompts)]


class VLMJudge:
    """A separate vision-language model answering the P(Yes) judge question.

    `path`: a local dir with safetensors weights or a hub id (never fetched in tests). Janus
    checkpoints (config model_type "janus", or the special paths "tiny"/"shapes") load through
    `models.loading.load_model` so they get the same prompt format as our own judge; anything else
    through `AutoProcessor` + `AutoModelForImageTextToText` (trust_remote_code off). `use_janus`
    forces one route (None = decide from the config).
    """

    def __init__(self, path: str, dtype: str = "float32", device: str = "auto", batch_size: int = 16,
                 use_janus: Optional[bool] = None):
        from models.loading import resolve_device

        self.path, self.batch_size = path, batch_size
        self.name = f"vlm:{path}"
        self.device = resolve_device(device)
        self.janus = _is_janus(path) if use_janus is None else use_janus
        if self.janus:
            from models.loading import load_model

            self.model = load_model(path, dtype, self.device, judge_mode="prob")
        else:
            self._load_hf(path, dtype)

    def _load_hf(self, path: str, dtype: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from models.loading import DTYPES

        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        # Left padding: P(Yes) is read at the last position of every row.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False).to(self.device).eval()
        self.yes_no = _yes_no_ids(self.processor.tokenizer)

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        _check_aligned(images, prompts)
        scores: list[float] = []
        for lo in range(0, len(images), self.batch_size):
            ims, ps = list(images[lo:lo + self.batch_size]), list(prompts[lo:lo + self.batch_size])
            if self.janus:
                scores += self.model.judge(ims, ps, mode="prob").score
            else:
                scores += self._p_yes_hf(ims, ps)
        return [s >= 0.5 for s in scores]  # NaN (never produced in prob mode) would count as "no"

    def _p_yes_hf(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        import torch

        from models.base import PROB_QUESTION

        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": PROB_QUESTION.format(prompt=p)}]}],
            add_generation_prompt=True) for p in prompts]
        enc = self.processor(text=texts, images=[im.convert("RGB") for im in images], padding=True,
                             return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**enc).logits[:, -1].float()  # (B, V)
        probs = torch.softmax(logits, dim=-1)
        yes, no = probs[:, self.yes_no[0]].sum(-1), probs[:, self.yes_no[1]].sum(-1)  # (B,)
        return (yes / (yes + no).clamp_min(1e-30)).tolist()


def _is_janus(path: str) -> bool:
    """Whether `path` names a Janus checkpoint (decides the loading route of `VLMJudge`)."""
    from models.loading import HUB_IDS

    if path == "shapes" or path == "tiny" or path.startswith("tiny:") or path.lower() in HUB_IDS:
        return True
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False).model_type == "janus"


def _yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First-token ids of Yes / No in the spellings a chat model may start its answer with."""
    def ids(words):
        return sorted({t[0] for t in (tokenizer.encode(w, add_special_tokens=False) for w in words)
                       if t and t[0] != tokenizer.unk_token_id})
    yes, no = ids(["Yes", " Yes", "yes", " yes"]), ids(["No", " No", "no", " no"])
    if not yes or not no or set(yes) & set(no):
        raise ValueError("the external judge's tokenizer has no distinct Yes / No tokens")
    return yes, no


def make_external_judge(audit_cfg, dtype: str = "float32", device: str = "auto") -> ExternalJudge:
    """The external judge named by `cfg.audit`: oracle, a VLM at `audit.vlm_path` (in process, or in
    vLLM engines), or an OpenAI-compatible endpoint at `audit.http_url` (pipelines/http_judge.py)."""
    if audit_cfg.backend == "oracle":
        return OracleJudge()
    if audit_cfg.backend == "vlm":
        if not audit_cfg.vlm_path:
            raise ValueError("audit.backend=vlm needs audit.vlm_path")
        return VLMJudge(audit_cfg.vlm_path, dtype=dtype, device=device)
    if audit_cfg.backend == "openai_http":
        from pipelines.http_judge import OpenAIHTTPJudge

        return OpenAIHTTPJudge(audit_cfg.http_url, audit_cfg.http_model, audit_cfg.http_api_key_env,
                               audit_cfg.http_concurrency, audit_cfg.http_qps, audit_cfg.http_max_retries)
    if audit_cfg.backend == "vllm":
        from pipelines.http_judge import VLLMJudge

        return VLLMJudge(audit_cfg.vlm_path, audit_cfg.vllm_replicas, audit_cfg.vllm_tensor_parallel_size,
                         audit_cfg.vllm_max_model_len, audit_cfg.vllm_accelerator)
    raise ValueError(f"unknown audit backend {audit_cfg.backend!r}")


# ---------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class AuditDecision:
    """Promote or not, and why. `value`/`best_value` are the external metric; `delta` their difference."""

    promote: bool
    degraded: bool
    reason: str
    best_round: int
    metric: str = ""
    value: Optional[float] = None
    best_value: Optional[float] = None
    delta: Optional[float] = None
    round: int = 0
    """The round whose new model was audited (a round that trained nothing audits no new model)."""
    tolerance: float = 0.0
    co_degraded: bool = False
    """Degraded externally while the internal gap (Nonunified) shrank: the paper's warning sign."""

    def as_dict(self) -> dict[str, Any]:
        """For the manifest (JSON-able)."""
        return asdict(self)

def flat_record(record: dict) -> dict:
    """A round record as one flat dict: accepts flat keys or nested {"metrics": ..., "audit": ...}."""
    flat = {k: v for k, v in record.items() if k not in ("metrics", "audit", "decision")}
    flat.update(record.get("metrics") or {})
    audit_part = record.get("audit") or record.get("decision") or {}
    if isinstance(audit_part, AuditDecision):
        audit_part = audit_part.as_dict()
    flat.update({f"audit/{k}": v for k, v in audit_part.items()})
    return flat


def _value(record: dict, metric: str) -> Optional[float]:
    """The record's external metric; NaN / missing -> None, except the win-rate neutral point."""
    key = f"eval/{metric}"
    raw = record.get(key)
    value = None if raw is None or (isinstance(raw, float) and math.isnan(raw)) else float(raw)
    if metric == "und_win_rate":
        # measured against the base: the base itself, and a round with no disagreement, are 0.5
        if int(record.get("round", 0)) == 0 or (key in record and value is None):
            return WIN_RATE_NEUTRAL
    return value


def _best(history: list[dict], metric: str) -> tuple[int, Optional[float], dict]:
    """The best promoted round: highest value, latest on ties. Round 0 is always promoted."""
    # "audit/promoted": the key of run dirs written before 2026-12-06
    promoted = [r for r in history if int(r.get("round", 0)) == 0
                or bool(r.get("audit/promote", r.get("audit/promoted")))]
    scored = [(v, int(r["round"]), r) for r in promoted if (v := _value(r, metric)) is not None]
    if not scored:
        return (int(promoted[0]["round"]) if promoted else 0), None, (promoted[0] if promoted else {})
    value, round_, record = max(scored, key=lambda t: (t[0], t[1]))
    return round_, value, record


def audit(history: list[dict], candidate: dict, audit_cfg) -> AuditDecision:
    """Promote / hold / degraded for `candidate` against the best promoted round in `history`.

    history: earlier round records (flat metric dicts with "round" and "audit/promote", or nested
    {"round", "metrics", "audit" | "decision"}); candidate: this round's record (module docstring).
    """
    cand = flat_record(candidate)
    round_ = int(cand.get("round", 0))
    past = [flat_record(r) for r in history if int(flat_record(r).get("round", 0)) < round_]
    if not past:
        return audit_vs_best(None, None, round_, cand, audit_cfg)
    best_round, _, best_rec = _best(past, audit_cfg.metric)
    base = next((r for r in past if int(r.get("round", 0)) == 0), None)
    return audit_vs_best(best_round, best_rec, round_, cand, audit_cfg, base)


def audit_vs_best(best_round: Optional[int], best_metrics: Optional[dict], round_: int, metrics: dict,
                  audit_cfg, base_metrics: Optional[dict] = None) -> AuditDecision:
    """The same rule when the caller already knows the best round (e.g. the store's `best` pointer).

    best_round None: `round_` is the base model, the initial best. Metrics are flat `eval/...` dicts;
    base_metrics: round 0's, for `audit.max_und_drop` (None: not checked).
    """
    metric, tol = audit_cfg.metric, float(audit_cfg.tolerance)
    cand = {**flat_record(metrics), "round": round_}
    if f"eval/{metric}" not in cand:
        raise ValueError(f"round {round_} has no eval/{metric}; evaluate before auditing")
    value = _value(cand, metric)
    common = dict(metric=metric, value=value, round=round_, tolerance=tol)
    if best_round is None:
        return AuditDecision(True, False, f"round {round_} is the base model: the initial best "
                             f"({metric}={_fmt(value)})", round_, best_value=value, delta=0.0, **common)
    best_rec = {**flat_record(best_metrics or {}), "round": best_round}
    best_value = _value(best_rec, metric)
    if value is None or best_value is None:
        return AuditDecision(False, False, f"no {metric} measurement to compare (candidate "
                             f"{_fmt(value)}, best {_fmt(best_value)}): not promoted",
                             best_round, best_value=best_value, delta=None, **common)
    delta = value - best_value
    degraded = delta < -tol - EPS
    paired = PAIRED_GAIN.get(metric)  # the paired gain over the base on the metric's own prompts
    paired_hi = cand.get(f"{paired}/ci_high") if paired else None
    below_base = (bool(getattr(audit_cfg, "paired_rollback", False)) and paired_hi is not None
                  and not math.isnan(paired_hi) and paired_hi < 0)
    und_drop = _und_drop(cand, base_metrics, getattr(audit_cfg, "max_und_drop", None))
    promote = not degraded and not below_base and und_drop is None and delta >= -EPS
    co = (degraded or below_base) and _nonunified_shrank(cand, best_rec)
    verdict = ("DEGRADED: drop beyond tolerance" if degraded else
               f"DEGRADED: significantly below the base model (paired gain "
               f"{cand.get(paired, math.nan) * 100:+.1f} points, "
               f"95% CI high {paired_hi * 100:+.1f})" if below_base else
               f"DEGRADED: understanding accuracy {und_drop * 100:.1f} points below the base model "
               f"(audit.max_und_drop={audit_cfg.max_und_drop:g})" if und_drop is not None else
               "promote: tie with the best (not worse)" if abs(delta) <= EPS else
               "promote: better than the best" if promote else
               "hold: below the best but within tolerance (best kept)")
    reason = (f"{verdict}; {metric} {_fmt(value)}{_ci_text(cand, metric)} vs best round {best_round} "
              f"{_fmt(best_value)}: delta {delta:+.4f}, tolerance {tol:g}{_noise_text(cand, metric, best_value)}"
              f"{_paired_text(cand, metric)}")
    if co:
        reason += "; CO-DEGRADATION: Nonunified improved while the external metric fell"
    return AuditDecision(promote, degraded or below_base or und_drop is not None, reason, best_round,
                         best_value=best_value, delta=delta, co_degraded=co, **common)


def _und_drop(cand: dict, base: Optional[dict], limit: Optional[float]) -> Optional[float]:
    """How far the candidate's understanding accuracy lies below the base's, when beyond `limit`."""
    if limit is None or not base:
        return None
    a, b = cand.get("eval/und_accuracy"), flat_record(base).get("eval/und_accuracy")
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return b - a if b - a > limit + EPS else None


def _nonunified_shrank(cand: dict, best: dict) -> bool:
    a, b = cand.get("eval/nonunified"), best.get("eval/nonunified")
    return a is not None and b is not None and not (math.isnan(a) or math.isnan(b)) and a < b


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _ci_text(rec: dict, metric: str) -> str:
    lo, hi, n = (rec.get(f"eval/{metric}/{k}") for k in ("ci_low", "ci_high", "n"))
    return "" if lo is None or hi is None else f" [95% CI {lo:.3f}-{hi:.3f}, n={n}]"


def _paired_text(rec: dict, metric: str) -> str:
    """The paired (same prompts, same seeds) difference to the round's start model, when measured."""
    key = "eval/gen_gain_vs_start"
    if metric != "gen_accuracy" or rec.get(key) is None:
        return ""
    return (f"; paired vs its start model {rec[key]:+.4f} [95% CI {rec[key + '/ci_low']:+.3f}, "
            f"{rec[key + '/ci_high']:+.3f}] over {int(rec[key + '/n'])} prompts")


def _noise_text(rec: dict, metric: str, best_value: float) -> str:
    """Whether the best value lies inside the candidate's CI: the change may be sampling noise."""
    lo, hi = rec.get(f"eval/{metric}/ci_low"), rec.get(f"eval/{metric}/ci_high")
    if lo is None or hi is None:
        return ""
    return ("; best inside the candidate's CI (change within noise)" if lo <= best_value <= hi
            else "; best outside the candidate's CI (change beyond noise)")
