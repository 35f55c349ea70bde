"""MicroShapes as a ControlNet task: controls, IoU with the silhouette, colour accuracy."""

import dataclasses

import numpy as np
import pytest

from dit.microshapes import Scene, Shape, render
from dit.microshapes.control import control_image, control_scenes, evaluate_control, silhouette_iou


@pytest.mark.parametrize("width, height", [(64, 64), (48, 32)])
def test_ground_truth_has_iou_one_and_the_right_colour(width, height):
    scenes = control_scenes(12)
    assert all(len(s.objects) == 1 and not s.held_out for s in scenes) and control_scenes(12) == scenes

    def truth(prompts, controls, seed):
        assert [c.shape for c in controls] == [(height, width, 3)] * len(prompts)
        return [render(s, width, height) for s in scenes[seed : seed + len(prompts)]]

    report = evaluate_control(truth, scenes, width, height, batch_size=5)
    assert report["n"] == 12 and report["iou"] == 1.0 and report["iou_at_least_0.8"] == 1.0
    assert report["color_accuracy"] == report["background_accuracy"] == 1.0


def test_controls_and_wrong_images():
    scene = Scene("white", (Shape("red", "square", "large", "left"),))
    silhouette = control_image(scene, 64, 64)
    assert silhouette.shape == (64, 64, 3) and set(np.unique(silhouette)) == {0, 255}
    outline = control_image(scene, 64, 64, "edges")
    assert 0 < (outline > 0).sum() < (silhouette > 0).sum()
    moved = render(dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], position="right"),)))
    assert silhouette_iou(render(scene), scene) == 1.0 and silhouette_iou(moved, scene) == 0.0
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert silhouette_iou(blank, scene) == 0.0
    recoloured = render(dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], color="blue"),)))
    report = evaluate_control(lambda p, c, s: [recoloured], [scene], 64, 64)
    assert report["iou"] == 1.0 and report["color_accuracy"] == 0.0
    with pytest.raises(ValueError, match="Unknown control kind 'depth'"):
        control_image(scene, 64, 64, "depth")
