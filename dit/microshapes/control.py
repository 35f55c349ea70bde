"""MicroShapes as a ControlNet task: the object's silhouette (or edges) is the control, the caption gives colour and
background. Scored from pixels: intersection-over-union of the generated shape with the control silhouette (the
shape = pixels whose nearest palette colour is a shape colour) and the evaluator's colour and background checks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch

from ..pipelines.controlnet import ControlNetPipeline
from .evaluator import palette_labels, score
from .world import BACKGROUNDS, Scene, caption, edges, random_scene, silhouette

KINDS: dict[str, Callable[[Scene, int, int], np.ndarray]] = {"silhouette": silhouette, "edges": edges}
Generate = Callable[[list[str], list[np.ndarray], int], list[np.ndarray]]


def control_scenes(n: int = 60, seed: int = 4321, two_objects: float = 0.0) -> list[Scene]:
    """``n`` evaluation scenes (one object each by default), without the held-out pair; fixed by ``seed``."""
    rng = random.Random(seed)
    return [random_scene(rng, two_objects=two_objects, held_out=False) for _ in range(n)]


def control_image(scene: Scene, width: int, height: int, kind: str = "silhouette") -> np.ndarray:
    """The control of ``scene`` as an (H, W, 3) uint8 image: white objects (or outlines) on black."""
    if kind not in KINDS:
        raise ValueError(f"Unknown control kind {kind!r}; choose one of {sorted(KINDS)}.")
    return np.repeat(KINDS[kind](scene, width, height)[:, :, None], 3, axis=2)


def shape_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of an (H, W, 3) uint8 image whose nearest palette colour is a shape colour."""
    return palette_labels(image) >= len(BACKGROUNDS)


def silhouette_iou(image: np.ndarray, scene: Scene) -> float:
    """Intersection-over-union of the generated shape pixels with ``scene``'s silhouette (1.0 when both are empty)."""
    height, width = image.shape[:2]
    generated, target = shape_mask(image), silhouette(scene, width, height) > 0
    union = np.logical_or(generated, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(generated, target).sum() / union)


def score_control(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """IoU with the silhouette, and whether colour (of the largest object), background and the whole prompt match."""
    attributes = score(image, scene)
    return {"iou": silhouette_iou(image, scene), "color": float(attributes.get("color", attributes.get("objects"))),
            "background": float(attributes["background"]), "prompt": float(attributes["prompt"])}  # fmt: skip


def evaluate_control(
    generate: Generate,
    scenes: list[Scene],
    width: int,
    height: int,
    kind: str = "silhouette",
    batch_size: int = 10,
    seed: int = 0,
) -> dict:
    """Score ``generate(prompts, control_images, seed) -> (H, W, 3) uint8 images`` on ``scenes``.

    Returns mean IoU, the fraction of images with IoU >= 0.8, colour / background / whole-prompt accuracy and the
    time per image.
    """
    results, started = [], time.perf_counter()
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        controls = [control_image(s, width, height, kind) for s in batch]
        images = generate([caption(s) for s in batch], controls, seed + start)
        results += [score_control(image, scene) for image, scene in zip(images, batch)]
    ious = np.array([r["iou"] for r in results])
    return {"n": len(results), "iou": float(ious.mean()), "iou_at_least_0.8": float((ious >= 0.8).mean()),
            "color_accuracy": float(np.mean([r["color"] for r in results])),
            "background_accuracy": float(np.mean([r["background"] for r in results])),
            "prompt_accuracy": float(np.mean([r["prompt"] for r in results])),
            "seconds_per_image": (time.perf_counter() - started) / max(1, len(results))}  # fmt: skip


def control_generator(pipe, steps: int = 20, guidance_scale: float = 4.5, **call_kwargs) -> Generate:
    """A ``generate`` function for :func:`evaluate_control` from a pipeline: a ControlNet pipeline gets the control
    images (and ``call_kwargs``, e.g. ``controlnet_conditioning_scale``); a text-to-image pipeline ignores them."""

    def generate(prompts: list[str], controls: list[np.ndarray], seed: int) -> list[np.ndarray]:
        height, width = controls[0].shape[:2]
        extra = dict(call_kwargs, control_image=controls) if isinstance(pipe, ControlNetPipeline) else call_kwargs
        out = pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
            generator=torch.Generator().manual_seed(seed), output_type="np", clean_caption=False, **extra,
        ).images  # fmt: skip
        return [np.round(image * 255).astype(np.uint8) for image in out]

    return generate


def image_size(pipe) -> tuple[int, int]:
    """(width, height) in pixels of a pipeline's training resolution (square)."""
    side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return side, side
