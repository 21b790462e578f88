"""The shapes world: prompts, scenes, rendering and captions with exact symbolic ground truth.

Where it fits: every shapes-world stage (pretraining, generation prompts, the judge's training
pairs, the oracle) takes its prompts and images from here, so the world is defined in one place.

- Canvas: `IMAGE_SIZE` = 32 px RGB uint8 on a black background, a 2x2 grid of 16 px cells
  (cell 0 top left, 1 top right, 2 bottom left, 3 bottom right), at most one object per cell.
- Objects: `SHAPES` x `COLOURS`, 10-12 px, placed with a small deterministic jitter.
- Prompts (mirroring GenEval / T2I-CompBench++), `PromptSpec.text` <-> `parse_prompt`:
  shape "a triangle" · single "a red circle" · two_objects "a red circle and a blue square" ·
  counting "three green triangles" (1-4) · spatial "a red circle left of a blue square".
- Semantics are closed-world: a scene satisfies a prompt when its objects are exactly the
  prompted ones (any cells, unless a relation is named; "a triangle" allows any colour). This
  makes hard negatives (one attribute changed) unsatisfiable by construction.
- `train_prompts()` / `heldout_prompts()`: a fixed split (about 20 % held out per category, by
  SHA-256 of the text). Held-out prompts are never used in pretraining.
- Captions: "red circle top left and blue square bottom right" (objects by cell, 4 words each,
  "nothing" for an empty canvas); counts and relations are derivable from them.

Example:
    >>> import numpy as np
    >>> from shapes.world import parse_prompt, sample_scene, render, caption, satisfies
    >>> spec = parse_prompt("a red circle left of a blue square")
    >>> scene = sample_scene(spec, np.random.default_rng(0))
    >>> render(scene).shape, satisfies(scene, spec)
    ((32, 32, 3), True)
    >>> caption(scene).split(" and ")[0].startswith("red circle")
    True
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Collection, Protocol, Sequence

import numpy as np

from models.seeds import stable_bits

IMAGE_SIZE = 32
CELL_SIZE = 16
NUM_CELLS = 4
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
# Saturated colours, pairwise >= 255 apart in RGB and from the background, so palette
# quantisation of blurry reconstructions stays unambiguous. "purple" is drawn as magenta.
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (255, 0, 255),
}
COLOUR_NAMES = tuple(COLOURS)
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("shape", "single", "two_objects", "counting", "spatial")
CELL_WORDS = ("top left", "top right", "bottom left", "bottom right")
HELDOUT_FRACTION = 0.2

VOCABULARY: list[str] = sorted(
    {"a", "and", "of", "nothing", "top", "bottom", "left", "right", "above", "below"}
    | set(SHAPES) | {s + "s" for s in SHAPES} | set(COLOUR_NAMES) | set(NUMBERS)
)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as data. `colour` is None only for the `shape` category; the second object
    (`colour2`, `shape2`) exists for `two_objects` and `spatial`; `relation` only for `spatial`."""

    category: str
    shape: str
    colour: str | None = None
    count: int = 1
    colour2: str | None = None
    shape2: str | None = None
    relation: str | None = None

    @property
    def text(self) -> str:
        """The canonical prompt text (lowercase, no punctuation)."""
        first = f"a {self.colour} {self.shape}"
        if self.category == "shape":
            return f"a {self.shape}"
        if self.category == "single":
            return first
        if self.category == "counting":
            plural = "s" if self.count > 1 else ""
            return f"{NUMBERS[self.count - 1]} {self.colour} {self.shape}{plural}"
        joiner = "and" if self.category == "two_objects" else self.relation
        return f"{first} {joiner} a {self.colour2} {self.shape2}"

    def objects(self) -> list[tuple[str | None, str]]:
        """The prompted objects as (colour, shape); colour None means any colour."""
        if self.category in ("two_objects", "spatial"):
            return [(self.colour, self.shape), (self.colour2, self.shape2)]
        return [(self.colour, self.shape)] * self.count

    def is_valid(self) -> bool:
        """True when the spec belongs to the prompt universe (see `all_prompts`)."""
        return self in _universe_set()


class HasObject(Protocol):
    """Anything with a colour, a shape and a cell: scene objects and the oracle's parses."""

    colour: str
    shape: str
    cell: int


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: `size` px wide, top-left corner at (`x`, `y`) inside canvas `cell`."""

    shape: str
    colour: str
    cell: int
    size: int
    x: int
    y: int


@dataclass(frozen=True)
class Scene:
    """Objects ordered by cell, at most one per cell."""

    objects: tuple[SceneObject, ...]


# ----------------------------------------------------------------------------- prompts


def parse_prompt(text: str) -> PromptSpec:
    """Inverse of `PromptSpec.text`; raises ValueError for text outside the grammar."""
    words = text.split()
    if words and words[0] in NUMBERS and len(words) == 3:
        count = NUMBERS.index(words[0]) + 1
        shape = words[2][:-1] if count > 1 and words[2].endswith("s") else words[2]
        spec = PromptSpec("counting", shape, words[1], count=count)
    elif words[:1] == ["a"] and len(words) == 2:
        spec = PromptSpec("shape", words[1])
    elif words[:1] == ["a"] and len(words) == 3:
        spec = PromptSpec("single", words[2], words[1])
    elif len(words) in (7, 8) and words[0] == "a" and words[-3] == "a":
        joiner = " ".join(words[3:-3])
        category = "two_objects" if joiner == "and" else "spatial"
        relation = joiner if category == "spatial" else None
        spec = PromptSpec(category, words[2], words[1], 1, words[-2], words[-1], relation)
    else:
        raise ValueError(f"not a shapes-world prompt: {text!r}")
    if not _well_formed(spec) or spec.text != text:
        raise ValueError(f"not a shapes-world prompt: {text!r}")
    return spec


def _well_formed(spec: PromptSpec) -> bool:
    """Grammar rules: two_objects have distinct colours in palette order (one text per meaning);
    spatial objects differ in colour and shape (so 'the red one' / 'the circle' is unambiguous)."""
    colours_ok = all(c in COLOURS for c, _ in spec.objects() if c is not None)
    shapes_ok = all(s in SHAPES for _, s in spec.objects())
    pair = spec.category in ("two_objects", "spatial")
    shape_ok = (spec.colour2 is not None, spec.shape2 is not None, spec.relation is not None) == (
        pair, pair, spec.category == "spatial")
    count_ok = 1 <= spec.count <= 4 if spec.category == "counting" else spec.count == 1
    if not (colours_ok and shapes_ok and shape_ok and count_ok):
        return False
    if spec.category == "two_objects":
        return COLOUR_NAMES.index(spec.colour) < COLOUR_NAMES.index(spec.colour2)
    if spec.category == "spatial":
        return spec.colour != spec.colour2 and spec.shape != spec.shape2 and spec.relation in RELATIONS
    return spec.category in CATEGORIES and (spec.colour is None) == (spec.category == "shape")


def all_prompts() -> list[PromptSpec]:
    """The full prompt universe in a deterministic order (category, then palette/shape order)."""
    objs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    specs = [PromptSpec("shape", s) for s in SHAPES]
    specs += [PromptSpec("single", s, c) for c, s in objs]
    specs += [PromptSpec("two_objects", s1, c1, 1, c2, s2) for c1, s1 in objs for c2, s2 in objs]
    specs += [PromptSpec("counting", s, c, n) for c, s in objs for n in range(1, 5)]
    specs += [
        PromptSpec("spatial", s1, c1, 1, c2, s2, r) for c1, s1 in objs for r in RELATIONS for c2, s2 in objs
    ]
    return [s for s in specs if _well_formed(s)]


_UNIVERSE: frozenset[PromptSpec] | None = None


def _universe_set() -> frozenset[PromptSpec]:
    global _UNIVERSE
    if _UNIVERSE is None:
        _UNIVERSE = frozenset(all_prompts())
    return _UNIVERSE


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's `hash()` is salted per process)."""
    return stable_bits(text, 8, "big")


def _is_heldout() -> dict[PromptSpec, bool]:
    """Per category, the ~20 % of prompts with the smallest text hash are held out (at least one
    and never all, so every category appears on both sides)."""
    held: dict[PromptSpec, bool] = {}
    for category in CATEGORIES:
        specs = sorted((s for s in all_prompts() if s.category == category), key=lambda s: stable_hash(s.text))
        k = min(len(specs) - 1, max(1, round(HELDOUT_FRACTION * len(specs))))
        held.update({s: i < k for i, s in enumerate(specs)})
    return held


def train_prompts() -> list[PromptSpec]:
    """Prompts usable for pretraining and self-improvement rounds (universe order)."""
    held = _is_heldout()
    return [s for s in all_prompts() if not held[s]]


def heldout_prompts() -> list[PromptSpec]:
    """Evaluation-only prompts: never used in pretraining or in training rounds."""
    held = _is_heldout()
    return [s for s in all_prompts() if held[s]]


# ----------------------------------------------------------------------------- scenes


def _place(shape: str, colour: str, cell: int, rng: np.random.Generator) -> SceneObject:
    """Size 10-12 px and a jitter that keeps >= 2 px from the cell border, so neighbouring
    objects are >= 4 px apart and never merge in the oracle's connected components."""
    size = int(rng.integers(10, 13))
    slack = CELL_SIZE - size - 4
    dx, dy = (2 + int(rng.integers(0, slack + 1)) for _ in range(2))
    row, col = divmod(cell, 2)
    return SceneObject(shape, colour, cell, size, col * CELL_SIZE + dx, row * CELL_SIZE + dy)


def _relation_holds(relation: str, cell_a: int, cell_b: int) -> bool:
    """Cell-level relations: 'left of' compares grid columns, 'above' compares rows."""
    (row_a, col_a), (row_b, col_b) = divmod(cell_a, 2), divmod(cell_b, 2)
    return {
        "left of": col_a < col_b,
        "right of": col_a > col_b,
        "above": row_a < row_b,
        "below": row_a > row_b,
    }[relation]


def _scene(objects: list[SceneObject]) -> Scene:
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)))


def sample_scene(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A distractor-free scene that satisfies `spec` (random cells, sizes, jitter; random colour
    for the `shape` category)."""
    wanted = [(c if c is not None else COLOUR_NAMES[rng.integers(len(COLOURS))], s) for c, s in spec.objects()]
    if spec.category == "spatial":
        pairs = [(a, b) for a in range(NUM_CELLS) for b in range(NUM_CELLS) if _relation_holds(spec.relation, a, b)]
        cells = list(pairs[rng.integers(len(pairs))])
    else:
        cells = [int(c) for c in rng.permutation(NUM_CELLS)[: len(wanted)]]
    return _scene([_place(s, c, cell, rng) for (c, s), cell in zip(wanted, cells)])


def random_scene(rng: np.random.Generator, max_objects: int = NUM_CELLS) -> Scene:
    """An unconstrained scene: 1..`max_objects` objects, random shapes, colours and cells."""
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(NUM_CELLS)[:n]
    return _scene(
        [_place(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))], int(c), rng)
         for c in cells]
    )


def shape_mask(shape: str, size: int) -> np.ndarray:
    """A crisp (size, size) boolean mask; pixel centres are tested against the ideal shape.
    Fill ratios of the bounding box: square 1.0, circle ~0.78, triangle ~0.5."""
    centres = np.arange(size) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        r = size / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base along the bottom row
        return np.abs(xx - size / 2) <= yy / 2
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """The (32, 32, 3) uint8 image of `scene`: flat colours on black, no anti-aliasing."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.size)
        image[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size][mask] = COLOURS[obj.colour]
    return image


def caption(scene: Scene | Sequence[HasObject]) -> str:
    """'red circle top left and blue square bottom right': every object by cell, 4 words each."""
    objects = scene.objects if isinstance(scene, Scene) else scene
    parts = [f"{o.colour} {o.shape} {CELL_WORDS[o.cell]}" for o in sorted(objects, key=lambda o: o.cell)]
    return " and ".join(parts) if parts else "nothing"


def parse_caption(text: str) -> list[tuple[str, str, int]]:
    """Inverse of `caption`: [(colour, shape, cell)]; raises ValueError on malformed text."""
    if text == "nothing":
        return []
    out = []
    for part in text.split(" and "):
        words = part.split()
        if len(words) != 4 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(f"not a caption: {text!r}")
        out.append((words[0], words[1], CELL_WORDS.index(" ".join(words[2:]))))
    return out


# ----------------------------------------------------------------------------- ground truth


def matches(objects: Sequence[HasObject], spec: PromptSpec) -> bool:
    """Closed-world truth: the objects are exactly the prompted ones (as a multiset of
    colour+shape; any colour for the `shape` category) and any named relation holds by cell."""
    wanted = spec.objects()
    if len(objects) != len(wanted):
        return False
    if spec.category == "shape":
        return objects[0].shape == spec.shape
    have = sorted((o.colour, o.shape) for o in objects)
    if have != sorted(wanted):  # type: ignore[arg-type]
        return False
    if spec.category == "spatial":
        first = next(o for o in objects if (o.colour, o.shape) == (spec.colour, spec.shape))
        second = next(o for o in objects if (o.colour, o.shape) == (spec.colour2, spec.shape2))
        return _relation_holds(spec.relation, first.cell, second.cell)
    return True


def satisfies(scene: Scene, spec: PromptSpec) -> bool:
    """Whether `scene` satisfies `spec` at the symbolic level (see `matches`)."""
    return matches(scene.objects, spec)


def _one_attribute_changes(spec: PromptSpec) -> list[PromptSpec]:
    """Every valid prompt that differs from `spec` in exactly one field."""
    options: dict[str, Sequence[object]] = {
        "shape": SHAPES,
        "colour": COLOUR_NAMES if spec.colour is not None else (),
        "count": range(1, 5) if spec.category == "counting" else (),
        "colour2": COLOUR_NAMES if spec.colour2 is not None else (),
        "shape2": SHAPES if spec.shape2 is not None else (),
        "relation": RELATIONS if spec.relation is not None else (),
    }
    out = []
    for name, values in options.items():
        for value in values:
            if value != getattr(spec, name):
                candidate = replace(spec, **{name: value})
                if candidate.is_valid():
                    out.append(candidate)
    return out


def attribute_diff(a: PromptSpec, b: PromptSpec) -> list[str]:
    """Names of the fields in which two specs differ."""
    return [f.name for f in fields(PromptSpec) if getattr(a, f.name) != getattr(b, f.name)]


def hard_negative(
    spec: PromptSpec,
    rng: np.random.Generator,
    scene: Scene | None = None,
    allowed: Collection[PromptSpec] | None = None,
) -> PromptSpec:
    """A valid prompt differing from `spec` in exactly one attribute (colour, shape, count or
    relation) that a scene satisfying `spec` does not satisfy.

    Without `scene`, a changed relation is always the opposite one (an orthogonal relation may
    still hold for a diagonal placement); with `scene`, any change it does not satisfy is a
    candidate. `allowed` (e.g. `set(train_prompts())`) keeps held-out texts out of training data.
    """
    candidates = []
    for neg in _one_attribute_changes(spec):
        if allowed is not None and neg not in allowed:
            continue
        if scene is not None:
            ok = not satisfies(scene, neg)
        else:
            ok = neg.relation == spec.relation or neg.relation == OPPOSITE[spec.relation]
        if ok:
            candidates.append(neg)
    if not candidates:
        raise ValueError(f"no hard negative for {spec.text!r}")
    return candidates[int(rng.integers(len(candidates)))]
