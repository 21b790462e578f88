"""The model a Serve replica hands a request group: one round of the run, on the replica's shared weights.

Where it fits: `serve/deployment.py`'s `get_model` (multiplexed by round) returns a `RoundModel`; the
routes call its `generate_images` / `judge` / `answer` / `p_yes` under the replica's model lock, each
call with the round's peft adapter active on the one copy of the base weights
(`models.lora.AdapterSet`; round 0 = adapters off).

Example:
    >>> import tempfile
    >>> from models.lora import AdapterSet, LoraSpec, attach_lora, save_adapter
    >>> from models.tiny import build_tiny
    >>> d = tempfile.mkdtemp(); _ = save_adapter(attach_lora(build_tiny(), LoraSpec(r=4)), d)
    >>> s = AdapterSet(build_tiny()); r1 = RoundModel(s, "round_1", s.add("round_1", d))
    >>> len(r1.generate_images(["a red circle"], num_images=2, seed=0).images[0])
    2
"""

from __future__ import annotations

from models.lora import AdapterSet


class RoundModel:
    """What `get_model` hands out: the calls the routes make, each with this round's adapter active
    (`AdapterSet.active`; callers hold the replica's model lock). Evicted by Serve's multiplexing
    LRU through `__del__`, which only marks the adapter for deletion (AdapterSet.retire)."""

    def __init__(self, adapters: AdapterSet, name, token: int):
        self.adapters, self.name, self.token = adapters, name, token

    def _call(self, fn: str, *args, **kwargs):
        with self.adapters.active(self.name) as m:
            return getattr(m, fn)(*args, **kwargs)

    def generate_images(self, *args, **kwargs):
        return self._call("generate_images", *args, **kwargs)

    def judge(self, *args, **kwargs):
        return self._call("judge", *args, **kwargs)

    def answer(self, *args, **kwargs):
        return self._call("answer", *args, **kwargs)

    def p_yes(self, *args, **kwargs):
        return self._call("p_yes", *args, **kwargs)

    def __del__(self):
        if self.name is not None:
            self.adapters.retire(self.name, self.token)
