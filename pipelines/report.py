"""The run report: a per-round markdown table, a metrics plot and a before/after image grid.

Where it fits: the driver calls `write_report(store, history, grid)` after every round (cheap, so a
crashed run still has an up-to-date report); the console's stage lines are `rounds.progress`.
Everything is written through the run store (`RunStore.write_bytes`), so s3:// run dirs work.

Inputs:
  history: one record per round, oldest first: flat dicts (or nested {"round", "metrics", "audit"})
    holding `round`, the `eval/...` metrics of `pipelines.evaluate`, the `audit/...` values
    (`audit/promote`, `audit/degraded`, ...: `audit.flat_record` of an `AuditDecision`) plus
    optionally `audit/reason`, and stage times `time/<stage>`.
  grid: None (read round 0's and the best / latest round's `evaluate/samples` table from the store,
    when there) or {round: samples}, e.g. {0: round-0 samples, 3: best-round samples}; each
    samples table is `evaluate_round`'s DataFrame (or a pyarrow Table). Columns of the grid are
    these rounds in ascending order, rows the same held-out prompts (up to `GRID_PROMPTS`, spread
    over categories), the cell shows sample 0 with a green (external judge: correct) or red frame.
Outputs (in the run dir): report.md, report/metrics.png, report/grid.png, report/train.png (the
rounds' per-step training loss, read from `adapters/round_<k>/train_metrics.json`).

Example:
    >>> import tempfile
    >>> from pipelines.config import load_config
    >>> from pipelines.store import RunStore
    >>> store = RunStore(tempfile.mkdtemp(), "demo"); _ = store.init(load_config(None))
    >>> path = write_report(store, [{"round": 0, "eval/gen_accuracy": 0.1}], None)
    >>> path.endswith("report.md")
    True
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipelines.audit import flat_record

HEADLINE = [("gen_accuracy", "Gen. accuracy (external)"), ("und_accuracy", "Und. accuracy"),
            ("nonunified", "Nonunified"), ("und_win_rate", "Und. win rate"),
            ("unicycle", "UniCycle (text-image-text)")]
GRID_PROMPTS = 8
REPORT_MD, METRICS_PNG, GRID_PNG = "report.md", "report/metrics.png", "report/grid.png"
TRAIN_PNG = "report/train.png"


def write_report(store, history: list[dict], grid: Optional[dict] = None) -> str:
    """Write report.md (+ the PNGs) into the run dir; returns report.md's path in the store."""
    records = sorted((flat_record(r) for r in history), key=lambda r: int(r.get("round", 0)))
    store.write_bytes(METRICS_PNG, metrics_plot(records))
    grid = grid if grid is not None else stored_grid(store, records)
    grid_png = image_grid(grid) if grid else None
    if grid_png is not None:
        store.write_bytes(GRID_PNG, grid_png)
    lines = [f"# unigap run `{store.run_name}`", "",
             "External metrics come from a judge that is not the model (shapes oracle or a separate "
             "VLM); the Nonunified score is internal (own judge rejects own generations). Every rate: "
             "value [95% Wilson CI], n; the gain vs base is the paired difference over the same held-out "
             "prompts and seeds, with a bootstrap 95% CI over prompts. A round is promoted when its "
             "external metric is not below the "
             "best promoted round's; degraded when it fell by more than the tolerance.", "",
             round_table(records), "", f"![metrics per round]({METRICS_PNG})", ""]
    curves = train_curves(store, records)
    if curves:
        store.write_bytes(TRAIN_PNG, train_plot(curves))
        lines += ["## Training", "", "Loss per optimizer step of each round's LoRA training (mean over workers).",
                  "", f"![training loss per step]({TRAIN_PNG})", ""]
    if grid_png is not None:
        lines += ["## Before / after (same held-out prompts, same seeds)", "",
                  f"Columns: rounds {', '.join(str(r) for r in sorted(grid))}; frame green = the external "
                  "judge accepts the image, red = rejects; caption = own-judge score.", "",
                  f"![before and after]({GRID_PNG})", ""]
    reasons = [(int(r.get("round", 0)), r.get("audit/reason")) for r in records if r.get("audit/reason")]
    if reasons:
        lines += ["## Audit decisions", ""] + [f"- round {k}: {text}" for k, text in reasons] + [""]
    return store.write_bytes(REPORT_MD, "\n".join(lines).encode())


def stored_grid(store, records: list[dict], stage: str = "evaluate", table: str = "samples") -> dict:
    """{0: round-0 samples, k: best (else latest) round's samples} read from the run store, where the
    driver keeps each round's eval samples (`round_<k>/evaluate/samples.parquet`); {} if absent."""
    best = store.pointer("best")
    after = best if best else store.pointer("latest")
    if after is None and records:
        after = max(int(r.get("round", 0)) for r in records)
    out = {}
    for k in sorted({0, after or 0}):
        try:
            out[k] = store.read_table(k, stage, table).to_pandas()
        except (OSError, ValueError, KeyError):  # not evaluated yet / stored under another name
            continue
    return out if 0 in out else {}


def _fmt_rate(r: dict, name: str) -> str:
    """'0.412 [0.38-0.44] n=944', or '—' when absent / NaN."""
    v = r.get(f"eval/{name}")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        n = r.get(f"eval/{name}/n")
        return "—" if n is None else f"— n={int(n)}"
    lo, hi, n = (r.get(f"eval/{name}/{k}") for k in ("ci_low", "ci_high", "n"))
    ci = f" [{lo:.2f}-{hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{v:.3f}{ci}" + (f" n={int(n)}" if n is not None else "")


def _decision(r: dict) -> tuple[str, str]:
    """(audit decision, co-degradation flag) cells."""
    if "audit/promote" not in r and "audit/degraded" not in r:
        return "—", ""
    # "audit/promoted": the key of run dirs written before 2026-12-06
    degraded, promoted = bool(r.get("audit/degraded")), bool(r.get("audit/promote", r.get("audit/promoted")))
    text = "degraded" if degraded else "promote" if promoted else "hold"
    delta = r.get("audit/delta")
    if delta is not None and not (isinstance(delta, float) and math.isnan(delta)):
        text += f" ({delta:+.3f} vs r{int(r.get('audit/best_round', 0))})"
    return text, ("**CO-DEGRADATION**" if r.get("audit/co_degraded") else "")


def _fmt_gain(r: dict, name: str = "gen_gain_vs_base") -> str:
    """'+0.031 [+0.010, +0.052] n=130' (a paired difference over prompts), or '—'."""
    v = r.get(f"eval/{name}")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    lo, hi, n = (r.get(f"eval/{name}/{k}") for k in ("ci_low", "ci_high", "n"))
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}] n={int(n)}"


def round_table(records: list[dict]) -> str:
    """The markdown table: one row per round."""
    header = ["round", HEADLINE[0][1], "Gen. gain vs base (paired over prompts)"] + \
        [label for _, label in HEADLINE[1:]] + ["audit", "co-degradation", "stage times (s)"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        decision, co = _decision(r)
        times = ", ".join(f"{k.split('/', 1)[1]} {v:.1f}" for k, v in r.items()
                          if k.startswith("time/") and isinstance(v, (int, float)))
        rates = [_fmt_rate(r, n) for n, _ in HEADLINE]
        cells = [str(int(r.get("round", 0))), rates[0], _fmt_gain(r)] + rates[1:] + [decision, co, times or "—"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: the driver runs on cluster nodes without a display
    import matplotlib.pyplot as plt

    return plt


def metrics_plot(records: list[dict]) -> bytes:
    """PNG: the four headline rates per round with 95% CI error bars; degraded rounds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    rounds = [int(r.get("round", 0)) for r in records]
    for name, label in HEADLINE:
        v = np.array([float(r.get(f"eval/{name}", np.nan)) for r in records])
        lo = np.array([float(r.get(f"eval/{name}/ci_low", np.nan)) for r in records])
        hi = np.array([float(r.get(f"eval/{name}/ci_high", np.nan)) for r in records])
        if np.all(np.isnan(v)):
            continue
        err = np.nan_to_num(np.vstack([v - lo, hi - v]).clip(min=0))  # (2, R); no CI -> no bar
        ax.errorbar(rounds, v, yerr=err, marker="o", capsize=3, label=label)
    bad = [k for k, r in zip(rounds, records) if r.get("audit/degraded")]
    for k in bad:
        ax.axvline(k, color="red", alpha=0.25, linewidth=6)
    ax.set(xlabel="round", ylabel="rate", ylim=(-0.02, 1.02), title="held-out metrics (red band: degraded)")
    ax.set_xticks(rounds or [0])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, plt)


def train_curves(store, records: list[dict]) -> dict[int, list[dict]]:
    """{round: per-step training history} for the rounds in `records` that trained an adapter."""
    from pipelines.improve import train_curve

    curves = {int(r["round"]): train_curve(store, int(r["round"])) for r in records if int(r.get("round", 0)) > 0}
    return {k: v for k, v in curves.items() if v}


def train_plot(curves: dict[int, list[dict]]) -> bytes:
    """PNG: training loss per step, one line per round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for k, history in sorted(curves.items()):
        ax.plot([h["step"] for h in history], [h.get("loss", np.nan) for h in history], label=f"round {k}")
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, plt)


def _save(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _grid_prompts(frames: dict[int, pd.DataFrame], k: int) -> list[str]:
    """Prompt ids present in every round, round-robin over categories so all of them show."""
    common = set.intersection(*(set(f["prompt_id"]) for f in frames.values()))
    first = next(iter(frames.values()))
    by_cat = (first[first["prompt_id"].isin(common)].drop_duplicates("prompt_id")
              .sort_values(["category", "prompt_id"]).groupby("category")["prompt_id"].apply(list))
    out: list[str] = []
    while len(out) < k and any(len(v) for v in by_cat):
        for ids in by_cat:
            if ids and len(out) < k:
                out.append(ids.pop(0))
    return out


def image_grid(grid: dict[int, Any], max_prompts: int = GRID_PROMPTS) -> Optional[bytes]:
    """PNG: rows = held-out prompts, columns = rounds; sample 0 of each prompt (same seed every round)."""
    frames = {int(k): _generation_rows(v) for k, v in sorted(grid.items())}
    ids = _grid_prompts(frames, max_prompts) if frames else []
    if not ids:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(ids), len(frames), figsize=(1.9 * len(frames) + 2.2, 1.6 * len(ids)),
                             dpi=100, squeeze=False)
    for i, pid in enumerate(ids):
        for j, (round_, df) in enumerate(frames.items()):
            row = df[df["prompt_id"] == pid].sort_values("sample_index").iloc[0]
            ax = axes[i][j]
            ax.imshow(_decode(row["png"]), interpolation="nearest")
            ok = bool(row.get("external_verdict", False))
            for spine in ax.spines.values():
                spine.set(color="green" if ok else "red", linewidth=3)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(f"own {float(row.get('own_score', np.nan)):.2f}", fontsize=7)
            if i == 0:
                ax.set_title(f"round {round_}", fontsize=9)
            if j == 0:
                ax.set_ylabel(_wrap(str(row["prompt"])), fontsize=7, rotation=0, ha="right", va="center")
    return _save(fig, plt)


def _generation_rows(samples: Any) -> pd.DataFrame:
    df = samples if isinstance(samples, pd.DataFrame) else samples.to_pandas()
    return df[df["kind"] == "generation"] if "kind" in df else df


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _wrap(text: str, width: int = 22) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])
