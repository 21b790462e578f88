"""Compare finished runs side by side: the experiment table and the gain curves, from run stores only.

Where it fits: after several `unigap run`s (arms of one experiment: own judge, random / inverted /
oracle judge, seeds, recipes), `unigap compare RUN_DIR ...` writes one markdown table (per run and
round: held-out accuracy, the paired gain over the base model by the oracle and by the second
verdict, understanding, Nonunified, Und. win rate, audit decision) and one PNG with each run's gain
curve and its 95% CI. It reads only what the driver stored (manifest metrics), so it works offline
and on any run store (local, s3://, gs://). W&B groups the same runs online (`wandb.group`).

`--arm NAME=DIR,DIR...` (repeated) pools each arm's runs instead: per held-out prompt the mean of
the arm's last rounds, against the shared base model and against each other arm, paired bootstrap
CIs over prompts, by the oracle and by the second verdict (`pooled`). `--split validation` pools the
validation slice instead (training-distribution prompts never trained on, `eval.validation_prompts`,
oracle verdict only): the numbers to choose a recipe on, leaving the held-out ones for the claim.
`--round N` pools every run at round N instead of its last; `--by-category` adds each arm's gain
within each prompt category.

Example:
    $ unigap compare runs/own-s0 runs/oracle-s0 runs/random-s0 --out runs/compare.md
    $ unigap compare --arm own=runs/own-s0,runs/own-s1,runs/own-s2 --arm random=runs/random-s0
    $ unigap compare --split validation --arm lr2e-4=runs/a-s0,runs/a-s1 --arm lr4e-4=runs/b-s0,runs/b-s1
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import pandas as pd

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


SPLITS = {"heldout": "samples", "validation": "validation"}  # split -> the evaluate stage's table


def per_prompt(run_dir: str, round_: Optional[int] = None, verdict: str = "external_verdict",
               split: str = "heldout") -> "pd.Series":
    """Generation accuracy per prompt (mean of `verdict` over its images) at `round_` (None = the
    run's last evaluated round), indexed by prompt_id, on the held-out prompts or the validation
    slice."""
    rows = _generation_rows(run_dir, round_, split)
    if verdict not in rows:
        raise ValueError(f"{run_dir}: the {split} rows have no {verdict}")
    return rows.groupby("prompt_id")[verdict].apply(lambda v: v.astype(float).mean())


def prompt_categories(run_dir: str, split: str = "heldout") -> "pd.Series":
    """The category of each `split` prompt (from the base model's evaluation), indexed by prompt_id."""
    return _generation_rows(run_dir, 0, split).groupby("prompt_id")["category"].first()


def _generation_rows(run_dir: str, round_: Optional[int], split: str) -> "pd.DataFrame":
    from pipelines.store import RunStore, RunStoreError

    root, name = os.path.split(run_dir.rstrip("/"))
    store = RunStore(root or ".", name)
    if not store.exists():
        raise ValueError(f"{run_dir}: not a run dir (no manifest.json)")
    if round_ is None:
        round_ = max(int(k) for k in store.manifest()["rounds"] if store.stage_info(int(k), "evaluate"))
    elif not store.is_done(round_, "evaluate"):
        raise ValueError(f"{run_dir}: round {round_} has not been evaluated")
    try:
        rows = store.read_table(round_, "evaluate", SPLITS[split]).to_pandas()
    except RunStoreError:
        why = " (it ran with eval.validation_prompts=0)" if split == "validation" else ""
        raise ValueError(f"{run_dir}: round {round_} has no {split} rows{why}") from None
    return rows[rows["kind"] == "generation"] if "kind" in rows else rows


def pooled(arms: dict[str, list[str]], verdict: str = "external_verdict", seed: int = 0,
           split: str = "heldout", round_: Optional[int] = None, by_category: bool = False) -> str:
    """Each arm's runs pooled at their last rounds, or all at `round_` (per prompt: the mean over the
    arm's runs) against the base model (round 0 of the first run; every run shares it), and every pair
    of arms against each other: differences in points with a paired bootstrap 95% CI over the `split`
    prompts. by_category: also each arm's gain vs base within each prompt category."""
    import itertools

    import pandas as pd

    from pipelines.stats import paired_bootstrap

    first = next(iter(arms.values()))[0]
    base = per_prompt(first, 0, verdict, split)
    means = {arm: pd.concat([per_prompt(d, round_, verdict, split) for d in dirs], axis=1).mean(axis=1)
             for arm, dirs in arms.items()}
    categories = prompt_categories(first, split) if by_category else None
    lines = []
    for arm, m in means.items():
        common = m.index.intersection(base.index)
        d, lo, hi = paired_bootstrap(m[common], base[common], seed=seed)
        lines.append(f"{arm:<10} {verdict:<17} runs={len(arms[arm])}: {100 * d:+.1f} [{100 * lo:+.1f}, "
                     f"{100 * hi:+.1f}] points vs base ({len(common)} {split} prompts)")
        if categories is not None:
            arm_categories = categories.reindex(common)
            for category in sorted(arm_categories.dropna().unique()):
                ids = arm_categories.index[arm_categories == category]
                d, lo, hi = paired_bootstrap(m[ids], base[ids], seed=seed)
                lines.append(f"  {arm} {category:<12} {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                             f"({len(ids)} prompts)")
    for a, b in itertools.combinations(means, 2):
        common = means[a].index.intersection(means[b].index)
        d, lo, hi = paired_bootstrap(means[a][common], means[b][common], seed=seed)
        lines.append(f"{a} - {b} ({verdict}): {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] points")
    return "\n".join(lines)


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
    if args.arm:
        arms: dict[str, list[str]] = {}
        for spec in args.arm:
            name, _, dirs = spec.partition("=")
            if not name or not dirs:
                raise SystemExit(f"--arm wants NAME=RUN_DIR[,RUN_DIR...], got {spec!r}")
            arms.setdefault(name, []).extend(d for d in dirs.split(",") if d)
        verdicts = ("external_verdict", "second_verdict") if args.split == "heldout" else ("external_verdict",)
        try:
            for verdict in verdicts:
                print(pooled(arms, verdict, split=args.split, round_=args.round, by_category=args.by_category))
        except ValueError as e:
            raise SystemExit(f"unigap compare: {e}") from None
        return 0
    if not args.runs:
        raise SystemExit("unigap compare: give run dirs, or --arm NAME=RUN_DIR[,RUN_DIR...]")
    print(compare(args.runs, args.out))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("compare", help="compare finished runs: experiment table + gain curves (markdown, PNG)")
    p.add_argument("runs", nargs="*", help="run dirs, e.g. runs/own-s0 runs/oracle-s0")
    p.add_argument("--arm", action="append", default=[],
                   help="NAME=RUN_DIR[,RUN_DIR...]: pool an arm's runs (seeds) at their last rounds and print "
                        "paired gains vs base and between arms, by both verdicts (repeat per arm)")
    p.add_argument("--split", choices=sorted(SPLITS), default="heldout",
                   help="with --arm: pool the held-out prompts (the claim) or the validation slice "
                        "(eval.validation_prompts: choose recipe settings on this)")
    p.add_argument("--round", type=int, default=None,
                   help="with --arm: pool every run at this round instead of its last (runs of unequal length)")
    p.add_argument("--by-category", action="store_true",
                   help="with --arm: also each arm's gain vs base within each prompt category")
    p.add_argument("--out", default="compare.md", help="markdown file to write (a PNG is written beside it)")
    p.set_defaults(func=_cmd)
