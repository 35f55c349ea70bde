"""MicroShapes: a synthetic captioned world, exact so that any evaluator agrees.

Coloured filled shapes (circle, square, upright triangle) with hard edges on a black, white or gray canvas of any
W x H >= 16. One-object scenes have a size and one of five positions; two-object scenes place two small shapes
left/right or top/bottom. The pair (magenta, triangle) is held out of training data for compositional tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "magenta": (200, 50, 200), "cyan": (50, 200, 210),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.45}
POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
RELATIONS = {"left_of": ("left", "right"), "above": ("top", "bottom")}
HELD_OUT = ("magenta", "triangle")
JITTER = 0.04


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    position: str

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) == HELD_OUT


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; ``relation`` is ``left_of`` or ``above`` for two objects."""

    background: str
    objects: tuple[Shape, ...]
    relation: str | None = None
    jitter: tuple[tuple[float, float], ...] = field(default=(), compare=False)

    @property
    def held_out(self) -> bool:
        return any(o.held_out for o in self.objects)


def caption(scene: Scene) -> str:
    """The canonical caption."""
    bg = f"on a {scene.background} background"
    if len(scene.objects) == 1:
        o = scene.objects[0]
        where = "in the center" if o.position == "center" else f"on the {o.position}"
        return f"a {o.size} {o.color} {o.shape} {where}, {bg}"
    a, b = scene.objects
    link = "to the left of" if scene.relation == "left_of" else "above"
    return f"a {a.color} {a.shape} {link} a {b.color} {b.shape}, {bg}"


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """The canonical caption or one of a few rewordings (training data only)."""
    if rng.random() < 0.5:
        return caption(scene)
    bg = scene.background
    if len(scene.objects) == 1:
        o = scene.objects[0]
        where = "in the center" if o.position == "center" else f"on the {o.position}"
        options = [
            f"{o.size} {o.color} {o.shape} {where}, {bg} background",
            f"a {o.color} {o.shape}, {o.size}, {where} of a {bg} background",
            f"on a {bg} background, a {o.size} {o.color} {o.shape} {where}",
        ]
    else:
        a, b = scene.objects
        if scene.relation == "left_of":
            options = [f"a {b.color} {b.shape} to the right of a {a.color} {a.shape}, on a {bg} background",
                       f"{a.color} {a.shape} left of {b.color} {b.shape}, {bg} background"]  # fmt: skip
        else:
            options = [f"a {b.color} {b.shape} below a {a.color} {a.shape}, on a {bg} background",
                       f"{a.color} {a.shape} above {b.color} {b.shape}, {bg} background"]  # fmt: skip
    return rng.choice(options)


def _pairs(allow_held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if allow_held_out or (c, s) != HELD_OUT]


def random_scene(rng: random.Random, two_objects: float = 0.3, held_out: bool = False) -> Scene:
    """A random scene; with ``held_out=False`` (training) the pair (magenta, triangle) never appears."""
    background = rng.choice(list(BACKGROUNDS))
    pairs = _pairs(held_out)
    if rng.random() < two_objects:
        relation = rng.choice(list(RELATIONS))
        (c1, s1), (c2, s2) = rng.sample(pairs, 2)
        p1, p2 = RELATIONS[relation]
        objects = (Shape(c1, s1, "small", p1), Shape(c2, s2, "small", p2))
    else:
        color, shape = rng.choice(pairs)
        objects = (Shape(color, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS))),)
        relation = None
    jitter = tuple((rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)) for _ in objects)
    return Scene(background, objects, relation, jitter)


def _mask(shape: str, width: int, height: int, cx: float, cy: float, side: float) -> np.ndarray:
    """Boolean (H, W) mask of a filled shape whose bounding box (side x side) is centred at (cx, cy) pixels."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # pixel centres
    half = side / 2
    dx, dy = xs - cx, ys - cy
    inside_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "square":
        return inside_box
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        depth = (dy + half) / side  # 0 at the apex row, 1 at the base
        return inside_box & (np.abs(dx) <= half * depth)
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def object_masks(scene: Scene, width: int = 64, height: int = 64) -> list[np.ndarray]:
    """One boolean (H, W) mask per object."""
    if width < 16 or height < 16:
        raise ValueError(f"MicroShapes canvases are at least 16x16, got {width}x{height}.")
    jitter = scene.jitter or tuple((0.0, 0.0) for _ in scene.objects)
    masks = []
    for obj, (jx, jy) in zip(scene.objects, jitter):
        fx, fy = POSITIONS[obj.position]
        side = SIZES[obj.size] * min(width, height)
        masks.append(_mask(obj.shape, width, height, (fx + jx) * width, (fy + jy) * height, side))
    return masks


def render(scene: Scene, width: int = 64, height: int = 64) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj, mask in zip(scene.objects, object_masks(scene, width, height)):
        image[mask] = COLORS[obj.color]
    return image


def silhouette(scene: Scene, width: int = 64, height: int = 64) -> np.ndarray:
    """Binary (H, W) uint8 map, 255 on the objects (the ControlNet control)."""
    union = np.zeros((height, width), dtype=bool)
    for mask in object_masks(scene, width, height):
        union |= mask
    return union.astype(np.uint8) * 255


def edges(scene: Scene, width: int = 64, height: int = 64) -> np.ndarray:
    """Binary (H, W) uint8 map, 255 on object pixels that touch a non-object pixel (4-neighbourhood)."""
    inside = silhouette(scene, width, height) > 0
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return (inside & ~interior).astype(np.uint8) * 255
