"""A second, independently built verdict on shapes-world images: cells and template IoU, no components.

Where it fits: a trained generator can learn to sit just over one of the oracle's thresholds (taper,
fill) that were validated on clean renders and VQ reconstructions, not on generated blobs. So a
gain is confirmed by this verdict too (`pipelines.shapes_checks.second_verdict`), and the share of
accepted generations lying near an oracle threshold is reported (`near_threshold`).

How it differs from `shapes.oracle`:
  * objects are found per grid cell (the world puts at most one object in each 16x16 cell), not as
    4-connected components: a cell holds an object of colour c when >= `MIN_PIXELS` of its pixels
    are nearest to c (within `MAX_COLOUR_DISTANCE`);
  * the shape is the ideal mask (`world.shape_mask`, sizes 8-14) with the highest IoU against that
    colour's pixels in the cell, at the best offset inside the cell; below `MIN_IOU` it is
    "unknown" (a smear is no shape). No taper or fill features, no thresholds on them;
  * the scene is then checked with the world's own closed-world rule (`world.matches`).

Example:
    >>> import numpy as np
    >>> from shapes.world import parse_prompt, render, sample_scene
    >>> image = render(sample_scene(parse_prompt("a red triangle left of a blue circle"), np.random.default_rng(1)))
    >>> (mask_check(image, "a red triangle left of a blue circle"),
    ...  mask_check(image, "a red square left of a blue circle"))
    (True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from shapes.oracle import SQUARE_FILL, TRIANGLE_TAPER, components, quantise, shape_features, to_array
from shapes.world import CELL_SIZE, COLOUR_NAMES, NUM_CELLS, SHAPES, PromptSpec, matches, parse_prompt, shape_mask

MIN_PIXELS = 12
"""Pixels of one colour that make an object in a cell (the smallest world object has ~50)."""
MIN_IOU = 0.55
"""Best template IoU below which a blob is no shape."""
SIZES = range(8, 15)
_TEMPLATES = {(s, n): shape_mask(s, n) for s in SHAPES for n in SIZES}


@dataclass(frozen=True)
class CellObject:
    colour: str
    shape: str
    cell: int
    iou: float


def _best_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of the ideal mask that overlaps `mask` (a (16, 16) bool cell) best."""
    best, best_iou = "unknown", 0.0
    area = int(mask.sum())
    for (shape, n), tmpl in _TEMPLATES.items():
        windows = np.lib.stride_tricks.sliding_window_view(mask, (n, n))  # (17-n, 17-n, n, n)
        inter = (windows & tmpl).sum(axis=(-1, -2))  # (17-n, 17-n): overlap at every offset
        iou = float((inter / (area + int(tmpl.sum()) - inter)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_IOU else "unknown"), best_iou


def cell_objects(image: Image.Image | np.ndarray) -> list[CellObject]:
    """Every (colour, shape, cell) the image shows, by cell."""
    labels = quantise(to_array(image))  # (32, 32): 0 background, i >= 1 the i-th world colour
    out = []
    for cell in range(NUM_CELLS):
        row, col = divmod(cell, 2)
        block = labels[row * CELL_SIZE:(row + 1) * CELL_SIZE, col * CELL_SIZE:(col + 1) * CELL_SIZE]  # (16, 16)
        for i, colour in enumerate(COLOUR_NAMES, start=1):
            mask = block == i
            if mask.sum() >= MIN_PIXELS:
                shape, iou = _best_shape(mask)
                out.append(CellObject(colour, shape, cell, iou))
    return out


def mask_check(image: Image.Image | np.ndarray, prompt: str | PromptSpec) -> bool:
    """Whether `image` shows exactly what `prompt` asks for, by this verdict."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return matches(cell_objects(image), spec)


def mask_check_many(images: Sequence, prompts: Sequence[str | PromptSpec]) -> list[bool]:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return [mask_check(im, p) for im, p in zip(images, prompts)]


def near_threshold(image: Image.Image | np.ndarray, taper_margin: float = 0.1, fill_margin: float = 0.04) -> bool:
    """Whether any object the oracle sees lies within a margin of one of its shape thresholds
    (taper vs `TRIANGLE_TAPER`, fill vs `SQUARE_FILL` for non-triangles): a verdict that a small
    change of the image could flip."""
    for _, points in components(quantise(to_array(image))):
        if len(points) < MIN_PIXELS:
            continue
        taper, fill, _, _ = shape_features(points)
        if abs(taper - TRIANGLE_TAPER) < taper_margin:
            return True
        if taper >= TRIANGLE_TAPER and abs(fill - SQUARE_FILL) < fill_margin:
            return True
    return False
