"""MicroShapes: a synthetic captioned world and a pixel-level prompt-adherence evaluator."""

from .evaluator import detect, score
from .world import Scene, Shape, caption, edges, object_masks, paraphrase, random_scene, render, silhouette
