"""The MicroShapes world is exact, and the evaluator scores ground truth ~100% and wrong images low."""

import dataclasses
import random

import numpy as np
import pytest

from dit.microshapes import Scene, Shape, caption, edges, random_scene, render, score, silhouette
from dit.microshapes.world import BACKGROUNDS, COLORS, HELD_OUT, object_masks

CANVASES = [(64, 64), (96, 48), (48, 96), (32, 32)]  # the evaluator is meant for 32 px and up


def _scenes(n, seed=0, held_out=True):
    rng = random.Random(seed)
    return [random_scene(rng, held_out=held_out) for _ in range(n)]


@pytest.mark.parametrize("width, height", CANVASES, ids=[f"{w}x{h}" for w, h in CANVASES])
def test_ground_truth_scores_near_perfect(width, height):
    scenes = _scenes(150, seed=width + height)
    results = [score(render(s, width, height), s) for s in scenes]
    accuracy = np.mean([r["prompt"] for r in results])
    assert accuracy >= 0.97, accuracy


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one attribute changed to a different value."""
    obj = scene.objects[0]
    field, options = rng.choice([("color", list(COLORS)), ("shape", ["circle", "square", "triangle"]),
                                 ("position", ["center", "left", "right", "top", "bottom"])])  # fmt: skip
    other = rng.choice([o for o in options if o != getattr(obj, field)])
    return dataclasses.replace(scene, objects=(dataclasses.replace(obj, **{field: other}),) + scene.objects[1:])


def test_wrong_images_score_low():
    rng = random.Random(1)
    scenes = [s for s in _scenes(300, seed=2) if len(s.objects) == 1][:100]
    wrong = [score(render(_perturb(s, rng)), s)["prompt"] for s in scenes]
    blank = [score(np.full((64, 64, 3), BACKGROUNDS[s.background], np.uint8), s)["prompt"] for s in scenes]
    assert np.mean(wrong) <= 0.05 and not any(blank)


def test_two_object_relation_is_checked():
    a, b = Shape("red", "circle", "small", "left"), Shape("blue", "square", "small", "right")
    scene = Scene("white", (a, b), "left_of")
    assert score(render(scene), scene)["prompt"]
    swapped = Scene(
        "white", (dataclasses.replace(a, position="right"), dataclasses.replace(b, position="left")), "left_of"
    )
    result = score(render(swapped), scene)
    assert result["objects"] and not result["relation"] and not result["prompt"]


def test_geometry_is_exact():
    for shape, fill in [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)]:
        scene = Scene("black", (Shape("red", shape, "large", "center"),))
        (mask,) = object_masks(scene, 200, 200)
        rows, cols = np.nonzero(mask)
        assert abs((rows.max() - rows.min() + 1) - 90) <= 1 and abs((cols.max() - cols.min() + 1) - 90) <= 1
        assert abs(mask.sum() / 90**2 - fill) < 0.02
    (tri,) = object_masks(Scene("black", (Shape("red", "triangle", "large", "center"),)), 200, 200)
    rows = np.nonzero(tri.any(1))[0]
    assert tri[rows.min()].sum() < tri[rows.max()].sum()  # apex at the top, base at the bottom
    image = render(Scene("gray", (Shape("cyan", "square", "small", "left"),)))
    assert {tuple(p) for p in image.reshape(-1, 3)} == {BACKGROUNDS["gray"], COLORS["cyan"]}  # hard edges


def test_captions_and_held_out_pair():
    assert caption(Scene("white", (Shape("red", "circle", "large", "left"),))) == (
        "a large red circle on the left, on a white background"
    )
    assert caption(Scene("black", (Shape("blue", "square", "small", "center"),))) == (
        "a small blue square in the center, on a black background"
    )
    two = Scene(
        "gray", (Shape("red", "circle", "small", "top"), Shape("green", "triangle", "small", "bottom")), "above"
    )
    assert caption(two) == "a red circle above a green triangle, on a gray background"
    training = _scenes(3000, seed=5, held_out=False)
    assert not any((o.color, o.shape) == HELD_OUT for s in training for o in s.objects)


def test_control_maps_and_canvas_limit():
    scene = Scene("white", (Shape("red", "circle", "large", "center"),))
    sil, edge = silhouette(scene), edges(scene)
    assert set(np.unique(sil)) == {0, 255} and edge.sum() > 0
    assert np.all(sil[edge > 0] == 255) and (edge > 0).sum() < (sil > 0).sum()
    with pytest.raises(ValueError, match="at least 16x16"):
        render(scene, 15, 64)
