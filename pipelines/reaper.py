"""A local Ray must not outlive the command that started it, even after `kill -9`.

Where it fits: `unigap run` and `unigap serve` start a local Ray when they join no cluster. On a clean
exit `ray.shutdown()` stops it; after `kill -9` of the driver alone, Ray's dashboard and runtime-env
agents were measured to keep running for good (reparented to init; issue 14). `start_reaper()`
launches this module as a tiny watchdog in its own session (so a kill of the driver's process group
does not take it along): every POLL_S it records the driver's descendants (pid + start time, from
/proc), and once the driver is gone it SIGKILLs every recorded process still alive, then exits.
Processes started in the last POLL_S before the kill can be missed. Linux only (needs /proc); a
no-op elsewhere. Joining an existing cluster (`ray.address`, RAY_ADDRESS, `ray job submit`) starts
no reaper: that cluster's processes are not ours to stop.

Example (what the driver does after ray.init of a local cluster):
    from pipelines.reaper import start_reaper
    start_reaper()        # returns the watchdog's Popen, or None where /proc is missing
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

POLL_S = 0.5
REPO_ROOT = Path(__file__).resolve().parent.parent


def _stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time in clock ticks) of `pid`, or None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces or ')'
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # exited, not yet reaped by its parent
        return None
    return int(fields[1]), int(fields[19])  # fields 4 and 22 of proc(5), counted after the name


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every living descendant of `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out[child] = starts[child]
                todo.append(child)
    return out


def watch(parent: int, parent_start: int) -> int:
    """Record `parent`'s descendants until it dies, then kill those still alive; returns the count."""
    seen: dict[int, int] = {}
    while (_stat(parent) or (None, None))[1] == parent_start:
        seen.update(descendants(parent))
        time.sleep(POLL_S)
    killed = 0
    for pid, start in seen.items():
        if pid != os.getpid() and (_stat(pid) or (None, None))[1] == start:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def start_reaper() -> Optional[subprocess.Popen]:
    """Watch this process from a detached child (module docstring); None where /proc is missing."""
    me = os.getpid()
    st = _stat(me)
    if st is None:
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "pipelines.reaper", str(me), str(st[1])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env, close_fds=True)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1]), int(sys.argv[2])) >= 0 else 1)
