"""Sampling defaults recorded inside a pipeline folder (``sampling_defaults.json``).

A model is trained with one guidance scale in mind: the MicroShapes model, an x0-predicting DiT, follows prompts best
at guidance 2.5 and oversaturates at PixArt's 4.5. The folder records what its trainer chose, and ``dit generate``,
``dit eval`` and the benchmarks use it when no value is given. diffusers ignores the file, so the folder still loads
with ``DiffusionPipeline.from_pretrained``. A folder without it gets PixArt's defaults (20 steps, guidance 4.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SAMPLING_DEFAULTS = "sampling_defaults.json"
PIXART_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 4.5}


def sampling_defaults(folder: str | Path) -> dict:
    """``{"num_inference_steps", "guidance_scale"}`` recorded in a pipeline ``folder``, else PixArt's defaults."""
    path = Path(folder) / SAMPLING_DEFAULTS
    if not path.is_file():
        return dict(PIXART_DEFAULTS)
    recorded = json.loads(path.read_text())
    unknown = set(recorded) - set(PIXART_DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(PIXART_DEFAULTS)}.")
    return {**PIXART_DEFAULTS, **recorded}


def save_sampling_defaults(folder: str | Path, num_inference_steps: int, guidance_scale: float) -> Path:
    """Record the sampling defaults of the pipeline in ``folder``; returns the file written."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}.")
    path = Path(folder) / SAMPLING_DEFAULTS
    values = {"num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale)}
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path
