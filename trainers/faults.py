"""Fault drills: make one training worker die on purpose, to rehearse (and test) recovery.

Where it fits: a cluster loses nodes; Ray Train then restarts the workers and `trainers.train`
resumes from the last checkpoint (`train.max_failures`, `train.checkpoint_every`). To rehearse that
on a real run without a code change, write a drill file next to the round's training state before
the round trains:

    <storage_path>/<run_name>.fault.json      {"fail_at_step": 6}

(for `unigap run`: `runs/<run>/train/round_<k>.fault.json`). The last rank then exits hard in that
(1-based) step, once: a marker `.<run_name>.failed_once` keeps the restarted worker from failing
again. The test suite drills the same way. Local storage only (a drill file on s3:// is ignored).

Example:
    >>> import json, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> planned_failure(d, "round_1") is None
    True
    >>> with open(os.path.join(d, "round_1.fault.json"), "w") as fh:
    ...     json.dump({"fail_at_step": 6}, fh)
    >>> planned_failure(d, "round_1")
    6
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional


def drill_path(storage_path: str, run_name: str) -> str:
    return os.path.join(storage_path, f"{run_name}.fault.json")


def planned_failure(storage_path: str, run_name: str) -> Optional[int]:
    """The step the drill file asks the last rank to die in (None: no drill, or remote storage)."""
    path = drill_path(storage_path, run_name)
    if "://" in storage_path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            step = json.load(fh)["fail_at_step"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: a fault drill file is {{\"fail_at_step\": N}} ({e})") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{path}: fail_at_step must be an integer >= 1, got {step!r}")
    return step


def maybe_fail(storage_path: str, run_name: str, fail_at: Optional[int], step: int, rank: int, world: int) -> None:
    """Exit hard (like a lost node) when this is the last rank in step `fail_at` (1-based; `step` is
    0-based), once per run. It sleeps 2 s first: a worker dying within one controller poll of a
    checkpoint report can lose that checkpoint (training then resumes from the one before: correct,
    but a drill could not name the step it resumes from)."""
    if fail_at is None or step + 1 != fail_at or rank != world - 1:
        return
    marker = os.path.join(storage_path, f".{run_name}.failed_once")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # the restarted worker: do not fail again
    time.sleep(2.0)
    os._exit(1)
