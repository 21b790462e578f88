"""Compare finished runs side by side: the experiment table and the gain curves, from run stores only.

Where it fits: after several `unigap run`s (arms of one experiment: own judge, random / inverted /
oracle judge, seeds, recipes), `unigap compare RUN_DIR ...` writes one markdown table (per run and
round: held-out accuracy, the paired gain over the base model by the oracle and by the second
verdict, understanding, Nonunified, Und. win rate, audit decision) and one PNG with each run's gain
curve and its 95% CI. It reads only what the driver stored (manifest metrics), so it works offline
and on any run store (local, s3://, gs://). W&B groups the same runs online (`wandb.group`).

Example:
    $ unigap compare runs/own-s0 runs/oracle-s0 runs/random-s0 --out runs/compare.md
"""

from __future__ import annotations

import math
import os
from typing import Optional

GAIN = "gen_gain_vs_base"


def load_run(run_dir: str) -> list[dict]:
    """[{round, metrics..., audit/decision, pool/...}] for every evaluated round of one run dir."""
    from pipelines.store import RunStore

    root, name = os.path.split(run_dir.rstrip("/"))
    store = RunStore(root or ".", name)
    rows = []
    for k in sorted(int(r) for r in store.manifest()["rounds"]):
        ev = store.stage_info(k, "evaluate")
        if ev is None:
            continue
        row = {"run": name, "round": k, **ev["result"]["metrics"]}
        audit = store.stage_info(k, "audit")
        row["audit"] = "base" if k == 0 else (audit or {}).get("decision", "—")
        pool = store.stage_info(k, "pool") or {}
        row["train_rows"] = pool.get("sft_rows", pool.get("accepted"))
        rows.append(row)
    return rows


def _num(r: dict, key: str) -> Optional[float]:
    v = r.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _rate(r: dict, name: str) -> str:
    v = _num(r, f"eval/{name}")
    if v is None:
        return "—"
    lo, hi, n = (_num(r, f"eval/{name}/{s}") for s in ("ci_low", "ci_high", "n"))
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}] n={int(n)}" if lo is not None else f"{v:.3f}"


def _gain(r: dict, name: str) -> str:
    v = _num(r, f"eval/{name}")
    if v is None:
        return "—"
    lo, hi = _num(r, f"eval/{name}/ci_low"), _num(r, f"eval/{name}/ci_high")
    return f"{100 * v:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _win(r: dict) -> str:
    k, n = _num(r, "eval/und_win_rate/k"), _num(r, "eval/und_win_rate/n")
    return "—" if not n else f"{k / n:.2f} ({int(k)}/{int(n)})"


def table(runs: list[list[dict]]) -> str:
    """One markdown row per (run, round). Gains in points, paired over the same prompts and seeds."""
    head = ["run", "round", "gen. accuracy (oracle)", "gain vs base, points [95% CI]", "gain, 2nd verdict",
            "category-mean gain", "und. accuracy", "Nonunified", "Und. win rate", "train rows", "audit"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows in runs:
        for r in rows:
            cm = _num(r, f"eval/{GAIN}/category_mean")
            cells = [r["run"], str(r["round"]), _rate(r, "gen_accuracy"), _gain(r, GAIN), _gain(r, GAIN + "_second"),
                     "—" if cm is None else f"{100 * cm:+.1f}", _rate(r, "und_accuracy"), _rate(r, "nonunified"),
                     _win(r), "—" if r.get("train_rows") is None else str(r["train_rows"]), str(r["audit"])]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(runs: list[list[dict]]) -> str:
    """Per run: the last round's and the best-promoted round's paired gain (the best is chosen on the
    same evaluation, so its gain is optimistic; the last round's is not selected)."""
    out = ["| run | rounds | last round gain, points [95% CI] | best promoted round | its gain |",
           "|---|---|---|---|---|"]
    for rows in runs:
        if len(rows) < 2:
            continue
        last = rows[-1]
        promoted = [r for r in rows[1:] if r["audit"] == "promote"]
        best = max(promoted, key=lambda r: _num(r, f"eval/{GAIN}") or -1.0) if promoted else None
        out.append(f"| {last['run']} | {last['round']} | {_gain(last, GAIN)} | "
                   f"{best['round'] if best else 'none (base kept)'} | {_gain(best, GAIN) if best else '—'} |")
    return "\n".join(out)


def gain_plot(runs: list[list[dict]]) -> bytes:
    """PNG: paired gain over the base model per round, one line per run, 95% CI bars."""
    from pipelines.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for rows in runs:
        pts = [(r["round"], 100 * (_num(r, f"eval/{GAIN}") or 0.0), 100 * (_num(r, f"eval/{GAIN}/ci_low") or 0.0),
                100 * (_num(r, f"eval/{GAIN}/ci_high") or 0.0)) for r in rows]
        if pts:
            k, v, lo, hi = zip(*pts)
            ax.errorbar(k, v, yerr=[[a - b for a, b in zip(v, lo)], [b - a for a, b in zip(v, hi)]], marker="o",
                        capsize=3, label=rows[0]["run"])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="round", ylabel="held-out gain vs base (points)", title="paired gain over the base model (oracle)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, plt)


def compare(run_dirs: list[str], out: str) -> str:
    """Write `out` (markdown) and `<out stem>.png`; returns the markdown."""
    runs = [load_run(d) for d in run_dirs]
    png = os.path.splitext(out)[0] + ".png"
    with open(png, "wb") as fh:
        fh.write(gain_plot(runs))
    text = "\n".join(["# unigap runs compared", "", summary(runs), "", table(runs), "",
                      f"![gain per round]({os.path.basename(png)})", ""])
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    return text


def _cmd(args) -> int:
    print(compare(args.runs, args.out))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("compare", help="compare finished runs: experiment table + gain curves (markdown, PNG)")
    p.add_argument("runs", nargs="+", help="run dirs, e.g. runs/own-s0 runs/oracle-s0")
    p.add_argument("--out", default="compare.md", help="markdown file to write (a PNG is written beside it)")
    p.set_defaults(func=_cmd)
