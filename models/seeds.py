"""The one way this project turns keys into seeds and stable pseudo-random numbers.

Where it fits: every seed that must be the same on every machine, process and run (a sample's seed, a
stage's seed, the evaluation subset, a control arm's coin) comes from `stable_bits` of a text key;
never Python's `hash()` (salted per process). The call sites keep their own key formats, so the
seeds recorded runs used are unchanged. No torch import: the config and the data plane use it too.

Example:
    >>> stable_bits("0/1/generate/0", 4)
    3262205638
    >>> stable_bits("a", 8, "big") == stable_bits("a", 8, "big") and stable_unit("x") < 1.0
    True
"""

from __future__ import annotations

import hashlib
from typing import Literal


def stable_bits(key: str | bytes, nbytes: int = 8, byteorder: Literal["little", "big"] = "little") -> int:
    """The first `nbytes` bytes of sha256(key) as an unsigned integer."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha256(data).digest()[:nbytes], byteorder)


def stable_unit(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key`."""
    return stable_bits(key, 8) / 2.0**64
