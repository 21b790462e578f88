"""One seed primitive (models/seeds.py) behind every stable seed, and the values recorded runs used:
these numbers were computed by the code before the helpers were merged (each helper had its own
sha256 expression), so a change to any key format or byte slice fails here."""

from __future__ import annotations

from PIL import Image

from models.janus import derive_seed as sample_stream_seed
from models.seeds import stable_bits, stable_unit
from pipelines.audit import RandomJudge
from pipelines.config import derive_seed
from pipelines.evaluate import select_prompts
from pipelines.pools import _hash32, _unit
from pipelines.stages import sample_seed
from shapes.world import stable_hash


def test_every_seed_helper_gives_the_values_recorded_runs_used():
    assert [derive_seed(s, r, st, sh) for s in (0, 3) for r in (1, 7) for st in ("generate", "pairs")
            for sh in (0, 2)][:6] == [3262205638, 4162772682, 2418244558, 1122052545, 4119238826, 4067524615]
    assert [sample_stream_seed(5, "x", 2), sample_stream_seed(0), sample_seed(1, 2, "p9")] == [
        2072497848826480033, 4066689987807800415, 2207255421090672647]
    assert [_hash32("abc"), _hash32("p1/3")] == [3205920954, 2928060560]
    assert [_unit(1, "p", 2, 3), _unit(0, "q", 0, 0)] == [0.6280834182640591, 0.6178687640069124]
    assert [stable_hash("a red circle"), stable_hash("")] == [11665627608967327067, 16406829232824261652]
    img = Image.new("RGB", (8, 8), (10, 200, 30))
    assert RandomJudge(seed=4).verdicts([img] * 6, list("abcdef")) == [False, False, True, False, True, True]
    picked = select_prompts([{"prompt_id": f"p{i}"} for i in range(20)], 5, seed=3)
    assert [r["prompt_id"] for r in picked] == ["p11", "p12", "p15", "p4", "p8"]


def test_the_primitive_is_sha256_sliced():
    import hashlib

    digest = hashlib.sha256(b"key").digest()
    assert stable_bits("key", 4) == int.from_bytes(digest[:4], "little") == stable_bits(b"key", 4)
    assert stable_bits("key", 8, "big") == int.from_bytes(digest[:8], "big")
    assert 0.0 <= stable_unit("key") < 1.0 and stable_unit("key") == stable_bits("key", 8) / 2.0**64
