"""Scoring MicroShapes images from pixels alone.

Each pixel takes the nearest palette colour (backgrounds and shape colours); the background is the most frequent
background colour; each shape colour's connected components are objects. A component's shape comes from its fill
ratio in its bounding box (square ~1.0, circle ~0.785, triangle ~0.5), its size from the bounding-box side, its
position from its centroid. A prompt is right when every attribute is (and, for two objects, the relation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .world import BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene

PALETTE_NAMES = list(BACKGROUNDS) + list(COLORS)
PALETTE = np.array([BACKGROUNDS[n] for n in BACKGROUNDS] + [COLORS[n] for n in COLORS], dtype=np.float32)  # (9, 3)
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
MIN_AREA = 0.02  # of min(W, H)^2: smaller components are noise


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str
    size: str
    position: str
    centroid: tuple[float, float]  # (x, y) as fractions of (W, H)
    area: int


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour."""
    distance = ((image[:, :, None, :].astype(np.float32) - PALETTE[None, None]) ** 2).sum(-1)  # (H, W, 9)
    return distance.argmin(-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, as arrays of (row, col) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        found.append(np.array(pixels))
    return found


def _nearest(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda k: abs(table[k] - value))


def detect(image: np.ndarray) -> tuple[str, list[Detected]]:
    """The background name and the objects found in an (H, W, 3) uint8 image, largest first."""
    height, width = image.shape[:2]
    labels = palette_labels(image)
    counts = np.bincount(labels.ravel(), minlength=len(PALETTE_NAMES))
    background = PALETTE_NAMES[int(counts[: len(BACKGROUNDS)].argmax())]
    objects, side_unit = [], min(width, height)
    for index, name in enumerate(PALETTE_NAMES[len(BACKGROUNDS) :], start=len(BACKGROUNDS)):
        for pixels in components(labels == index):
            if len(pixels) < MIN_AREA * side_unit**2:
                continue
            rows, cols = pixels[:, 0], pixels[:, 1]
            box_h, box_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            centroid = ((cols.mean() + 0.5) / width, (rows.mean() + 0.5) / height)
            objects.append(
                Detected(
                    color=name,
                    shape=_nearest(len(pixels) / (box_h * box_w), FILL),
                    size=_nearest(max(box_h, box_w) / side_unit, SIZES),
                    position=min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], centroid)),
                    centroid=centroid,
                    area=len(pixels),
                )
            )
    return background, sorted(objects, key=lambda o: -o.area)


def score(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Which attributes of ``scene`` the image gets right, and ``prompt`` (all of them)."""
    background, found = detect(image)
    result = {"background": background == scene.background}
    if len(scene.objects) == 1:
        target = scene.objects[0]
        best = found[0] if found else None
        for attribute in ("color", "shape", "size", "position"):
            result[attribute] = best is not None and getattr(best, attribute) == getattr(target, attribute)
        result["count"] = len(found) == 1
    else:
        result.update(_score_pair(found, scene))
    result["prompt"] = all(result.values())
    return result


def _score_pair(found: list[Detected], scene: Scene) -> dict[str, bool]:
    """Both objects present with the right colour and shape, and in the stated relation."""
    first, second = scene.objects
    match_a = [o for o in found if (o.color, o.shape) == (first.color, first.shape)]
    match_b = [o for o in found if (o.color, o.shape) == (second.color, second.shape) and o not in match_a[:1]]
    result = {"objects": bool(match_a and match_b), "count": len(found) == 2}
    if result["objects"]:
        a, b = match_a[0], match_b[0]
        axis = 0 if scene.relation == "left_of" else 1
        result["relation"] = a.centroid[axis] < b.centroid[axis]
    else:
        result["relation"] = False
    return result
