"""Weights & Biases tracking for a self-improvement run: one W&B run per experiment, a step per round.

Where it fits: the driver opens one `Tracker(cfg, run_dir)` per process and calls `log_round`
after each round's evaluate/audit, `log_samples` with the eval samples, `log_train_curve` with the
round's per-step training history, `flag` when the audit reports co-degradation, and `finish` at
the end (or uses it as a context manager).

Mode: `WANDB_MODE` in the environment wins when set, else `cfg.wandb.mode` (offline by default).
  * offline: nothing touches the network (wandb 0.31 checked with strace: no AF_INET connects;
    shared STACK-NOTES.md section 6); the run lands in `<dir>/wandb/offline-run-<time>-<id>/`.
    Upload later from any machine with the hub: `wandb sync <dir>/wandb/offline-run-*` (or
    `wandb sync --sync-all` inside `<dir>`). Each driver process writes its own offline-run dir,
    but all carry the same run id, so after a resume they sync into the same W&B run.
  * online: logs live; `flag` also sends a W&B alert.
  * disabled: every method is a no-op (wandb is not even imported).
Directory: `cfg.wandb.dir`, else the run dir when it is a local path, else a fresh temp dir (an
`s3://` run dir cannot hold W&B's local files).

Identity: the W&B run id is `<run name>-<config hash>`, and `resume="allow"`, so a driver that is
restarted on the same run dir continues the same W&B run (online); a changed config is a new W&B
run. `group` = `cfg.wandb.group`, else the run name's experiment family (the name with a trailing
seed / replicate suffix like `-seed1`, `_r2`, `-3` removed), so replicates group together.
Steps are rounds (`step=round`): W&B ignores a step lower than one already logged, so a resumed
driver's re-logged rounds are dropped rather than duplicated.

Example:
    >>> import os, tempfile
    >>> from pipelines.config import load_config
    >>> os.environ["WANDB_MODE"] = "offline"
    >>> d = tempfile.mkdtemp()
    >>> with Tracker(load_config(None, ["run.name=demo-seed1"]), d) as t:
    ...     t.log_round(0, {"eval/gen_accuracy": 0.1})
    ...     t.group
    'demo'
"""

from __future__ import annotations

import io
import numbers
import os
import re
import tempfile
from typing import Any, Optional

import pandas as pd

from pipelines.config import Config, config_hash, flatten_config

MAX_TABLE_ROWS = 256
"""Images per logged table: keeps offline dirs small when the model draws 384 px images."""
_FAMILY_SUFFIX = re.compile(r"[-_.](seed|rep|r|s)?\d+$")
TABLE_COLUMNS = ["round", "kind", "prompt_id", "prompt", "category", "sample_index", "image",
                 "own_score", "external_verdict", "pool"]
CURVE_COLUMNS = ("round", "step", "loss", "grad_norm", "lr", "tokens_per_s")
CPR_CURVE_COLUMNS = ("gen_loss", "und_loss", "reflection_loss")  # when the round trained CPR rows


def resolve_mode(cfg: Config) -> str:
    """WANDB_MODE wins over cfg.wandb.mode; "dryrun" is W&B's old name for offline."""
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
    return "offline" if mode == "dryrun" else mode


def experiment_family(run_name: str) -> str:
    """'shapes-sft-seed1' -> 'shapes-sft': replicates of one experiment share a W&B group."""
    family = _FAMILY_SUFFIX.sub("", run_name)
    return family or run_name


def wandb_run_id(cfg: Config) -> str:
    """Stable id: the same run name and config continue the same W&B run (ids: <= 64 chars)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", cfg.run.name)[:47]
    return f"{safe}-{config_hash(cfg)}"


def _run_dir_uri(run_dir: Any) -> Optional[str]:
    """A RunStore's dir when it lives on the local filesystem (else None), or the given path."""
    if run_dir is None or isinstance(run_dir, (str, os.PathLike)):
        return None if run_dir is None else os.fspath(run_dir)
    import pyarrow.fs as pafs

    return run_dir.root if isinstance(run_dir.fs, pafs.LocalFileSystem) else None


def _local_dir(uri: Optional[str]) -> Optional[str]:
    """A local filesystem path for `uri`, or None when it is remote (s3://, gs://, ...)."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else uri


class Tracker:
    """One W&B run for the experiment (see the module docstring); a no-op when disabled."""

    def __init__(self, cfg: Config, run_dir: Any = None):
        """run_dir: the run dir as a path / URI, or the `RunStore` (its dir is used when local)."""
        self.mode = resolve_mode(cfg)
        self.group = cfg.wandb.group or experiment_family(cfg.run.name)
        self.run = None
        self.dir: Optional[str] = None
        self.flags: list[str] = []
        if self.mode == "disabled":
            return
        import wandb

        self.dir = cfg.wandb.dir or _local_dir(_run_dir_uri(run_dir)) or tempfile.mkdtemp(prefix="unigap-wandb-")
        os.makedirs(self.dir, exist_ok=True)
        config = dict(flatten_config(cfg), config_hash=config_hash(cfg))
        self.run = wandb.init(
            project=cfg.wandb.project, id=wandb_run_id(cfg), name=cfg.run.name, group=self.group,
            tags=list(cfg.wandb.tags), config=config, dir=self.dir, mode=self.mode, resume="allow",
            job_type="self-improvement", settings=wandb.Settings(silent=True))

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log_round(self, round_: int, metrics: dict[str, Any]) -> None:
        """Numeric metrics at step = round (strings and None are skipped; bools become 0/1)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        clean["round"] = float(round_)
        self.run.log(clean, step=int(round_))

    def log_samples(self, round_: int, samples: pd.DataFrame, key: str = "eval/samples",
                    max_rows: int = MAX_TABLE_ROWS) -> None:
        """A `wandb.Table` of samples: prompt, image, own score, external verdict, pool, round."""
        if not self.enabled or samples is None or len(samples) == 0:
            return
        import wandb

        table = wandb.Table(columns=TABLE_COLUMNS)
        for row in table_rows(samples, max_rows):
            table.add_data(round_, row["kind"], row["prompt_id"], row["prompt"], row["category"],
                           int(row["sample_index"]), wandb.Image(_image(row["png"])),
                           float(row["own_score"]), _bool(row["external_verdict"]), str(row["pool"]))
        self.run.log({key: table}, step=int(round_))

    def log_train_curve(self, round_: int, history: list[dict]) -> None:
        """The round's per-step training curve (loss, grad-norm, lr, tokens/s per worker; with CPR rows
        also the image, understanding and reflection losses) as a table `train/steps` and a line chart
        `train/loss_curve`, at step = round (the run's step axis)."""
        if not self.enabled or not history:
            return
        import wandb

        columns = CURVE_COLUMNS + tuple(c for c in CPR_CURVE_COLUMNS if c in history[0])
        table = wandb.Table(columns=list(columns),
                            data=[[round_] + [float(h.get(c, float("nan"))) for c in columns[1:]] for h in history])
        chart = wandb.plot.line(table, "step", "loss", title=f"round {round_}: training loss per step")
        self.run.log({"train/steps": table, "train/loss_curve": chart}, step=int(round_))

    def flag(self, round_: int, text: str) -> None:
        """Co-degradation (or any audit warning): a metric + summary text, and an alert when online."""
        self.flags.append(f"round {round_}: {text}")
        if not self.enabled:
            return
        self.run.log({"audit/degraded": 1.0}, step=int(round_))
        self.run.summary["audit/flags"] = "\n".join(self.flags)
        if self.mode == "online":  # alerts go through the W&B server; offline they'd be dropped
            import wandb

            self.run.alert(title=f"unigap round {round_}: co-degradation", text=text,
                           level=wandb.AlertLevel.WARN)

    def summary(self, values: dict[str, Any]) -> None:
        """Final values (e.g. best round, final decision) on the run's overview page."""
        if self.enabled:
            self.run.summary.update(values)

    def finish(self) -> None:
        """Close the W&B run (flushes the offline dir); safe to call twice."""
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def table_rows(samples: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS) -> list[dict]:
    """Rows for the samples table: every prompt's first image before any prompt's second (so a
    capped table still covers all prompts), generation rows before understanding rows."""
    df = samples.copy()
    for col, default in (("kind", "generation"), ("pool", ""), ("external_verdict", None),
                         ("own_score", float("nan")), ("category", "")):
        if col not in df:
            df[col] = default
    if "score" in samples and "own_score" not in samples:  # judge-stage tables call it `score`
        df["own_score"] = samples["score"]
    df["_gen_first"] = df["kind"] != "generation"
    df = df.sort_values(["_gen_first", "sample_index", "prompt_id"], kind="stable").head(max_rows)
    return df.to_dict("records")


def _bool(v: Any) -> Optional[bool]:
    return None if v is None or (isinstance(v, float) and v != v) else bool(v)


def _image(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")
