"""The exact oracle of the shapes world: parse any image into objects and check it against a prompt.

Where it fits: the external judge of every shapes-world experiment (the role Qwen2.5-VL plays in
the paper): it scores generations, audits the model's own judge and labels evaluation sets.
Inputs: an image as PIL or numpy ((H, W, 3) uint8, or float in [0, 1]); other sizes are resized
to 32x32. Outputs: `ParsedObject`s, and booleans from `check` / `check_many`.

Pipeline (pure numpy, no scipy):
1. palette quantisation: every pixel goes to the nearest world colour or the background; pixels
   farther than `MAX_COLOUR_DISTANCE` from every colour (muddy blends) become background;
2. 4-connected components per colour; components under `MIN_PIXELS` px are noise and dropped;
3. shape from two blur-robust features of the component: *taper* (mean row width of the top
   third / bottom third: triangle ~0.3, circle and square ~1) and *fill* (area / bounding box:
   square ~1.0, circle ~0.78). Blobs whose box is not roughly a 6-16 px square are "unknown",
   which matches no prompt (a smear is not a shape);
4. the object's centre of mass gives its cell; relations compare cells (`world.matches`).

Rules are the world's closed-world semantics (`shapes.world.matches`): the image must show
exactly the prompted objects and nothing else. Counting: exactly n objects, all of the prompted
colour and shape. Spatial: exactly the two objects, related by their cells' row/column.

Example:
    >>> import numpy as np
    >>> from shapes.world import parse_prompt, render, sample_scene
    >>> from shapes.oracle import check, parse
    >>> image = render(sample_scene(parse_prompt("two blue squares"), np.random.default_rng(0)))
    >>> [(o.colour, o.shape) for o in parse(image)]
    [('blue', 'square'), ('blue', 'square')]
    >>> check(image, "two blue squares"), check(image, "three blue squares")
    (True, False)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from shapes.world import BACKGROUND, CELL_SIZE, COLOURS, IMAGE_SIZE, PromptSpec, matches, parse_prompt

MAX_COLOUR_DISTANCE = 150.0
"""Colours are >= 255 apart; a pixel farther than this from all of them is a blend, not paint."""
MIN_PIXELS = 8
"""Smallest object kept; the world's smallest object (10 px triangle) has ~50 px."""
MIN_SIDE, MAX_SIDE = 6, 16
"""Bounding-box sides of a plausible object (the world draws 10-12 px)."""
TRIANGLE_TAPER = 0.6
"""Top-third / bottom-third width ratio below which a blob is a triangle (ideal ~0.3; on the
trained VQ's reconstructions triangles measured <= 0.32, circles >= 0.86 at the 1st/99th pct)."""
SQUARE_FILL = 0.88
"""Bounding-box fill above which a non-triangle is a square (ideal 1.0 vs circle 0.78)."""

_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (1 + C, 3)
_NAMES = (None, *COLOURS)


@dataclass(frozen=True)
class ParsedObject:
    """An object found in an image: `cell` from its centre (x, y) in pixels."""

    colour: str
    shape: str
    cell: int
    x: float
    y: float
    area: int
    bbox: tuple[int, int, int, int]
    """(top, left, bottom, right), inclusive."""


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any supported image -> (32, 32, 3) uint8."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        array = np.asarray(Image.fromarray(array).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return array[..., :3]


def quantise(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) palette index: 0 background, i >= 1 the i-th world colour."""
    pixels = image.astype(np.float32)[:, :, None, :]  # (H, W, 1, 3)
    dist = np.linalg.norm(pixels - _PALETTE[None, None], axis=-1)  # (H, W, 1 + C)
    index = dist.argmin(-1)
    index[dist.min(-1) > MAX_COLOUR_DISTANCE] = 0
    return index


def components(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """4-connected components of equal non-zero labels: [(label, (K, 2) array of (row, col))]."""
    h, w = labels.shape
    seen = np.zeros_like(labels, dtype=bool)
    out = []
    for r0, c0 in zip(*np.nonzero(labels)):
        if seen[r0, c0]:
            continue
        label, queue, members = labels[r0, c0], deque([(r0, c0)]), []
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            members.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and not seen[rr, cc] and labels[rr, cc] == label:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append((int(label), np.array(members)))
    return out


def shape_features(points: np.ndarray) -> tuple[float, float, int, int]:
    """(taper, fill, height, width) of a component given its (K, 2) pixel coordinates."""
    top, left = points.min(0)
    bottom, right = points.max(0)
    height, width = bottom - top + 1, right - left + 1
    mask = np.zeros((height, width), dtype=bool)
    mask[points[:, 0] - top, points[:, 1] - left] = True
    widths = mask.sum(1).astype(np.float32)  # (height,)
    third = max(1, height // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1.0)
    fill = len(points) / float(height * width)
    return float(taper), float(fill), int(height), int(width)


def classify(points: np.ndarray) -> str:
    """'triangle' | 'square' | 'circle' | 'unknown' for one component."""
    taper, fill, height, width = shape_features(points)
    plausible = MIN_SIDE <= min(height, width) and max(height, width) <= MAX_SIDE
    if not plausible or max(height, width) > 1.6 * min(height, width):
        return "unknown"
    if taper < TRIANGLE_TAPER:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def parse(image: Image.Image | np.ndarray) -> list[ParsedObject]:
    """All objects in `image`, ordered by cell then position."""
    labels = quantise(to_array(image))
    found = []
    for label, points in components(labels):
        if len(points) < MIN_PIXELS:
            continue
        y, x = points.mean(0) + 0.5  # centre of mass, in pixel units
        cell = 2 * int(y >= CELL_SIZE) + int(x >= CELL_SIZE)
        top, left = points.min(0)
        bottom, right = points.max(0)
        found.append(
            ParsedObject(_NAMES[label], classify(points), cell, float(x), float(y), len(points),
                         (int(top), int(left), int(bottom), int(right)))
        )
    return sorted(found, key=lambda o: (o.cell, o.y, o.x))


def check(image: Image.Image | np.ndarray, prompt: str | PromptSpec) -> bool:
    """Whether `image` shows exactly what `prompt` asks for (closed-world, see module doc)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return matches(parse(image), spec)


def check_many(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str | PromptSpec]) -> list[bool]:
    """`check` over aligned sequences."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return [check(image, prompt) for image, prompt in zip(images, prompts)]
