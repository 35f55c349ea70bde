"""Sampling defaults recorded inside a pipeline folder (``sampling_defaults.json``).

A model is trained with one guidance scale in mind: the MicroShapes model, an x0-predicting DiT, follows prompts best
at guidance 2.5 and oversaturates at PixArt's 4.5. The folder records what its trainer chose; a pipeline loaded from
it samples with those values when a call passes no ``num_inference_steps`` / ``guidance_scale``
(:attr:`~dit.pipelines.TextToImagePipeline.sampling_defaults`), and saving the pipeline again keeps the file.
diffusers ignores the file, so the folder still loads with ``DiffusionPipeline.from_pretrained``. A folder without it
gets diffusers' ``PixArtSigmaPipeline`` defaults (20 steps, guidance 4.5).

A folder may also record ``guidance_channels``: the latent channels classifier-free guidance acts on (the first k;
FiT's published models guide 3 of 4, as their ``forward_with_cfg``). Without it a call guides every channel.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

from ..checkpoint import restore_default_permissions
from .checks import check_guidance_channels

SAMPLING_DEFAULTS = "sampling_defaults.json"
PIXART_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 4.5}
#: Defaults a folder may record that have no value when it records none (``guidance_channels``: every channel).
OPTIONAL_DEFAULTS = ("guidance_channels",)
RECORDABLE = (*PIXART_DEFAULTS, *OPTIONAL_DEFAULTS)


def recorded_sampling_defaults(folder: str | Path) -> dict | None:
    """The values recorded in ``folder``'s ``sampling_defaults.json`` (possibly only one of the two), or None
    without the file."""
    path = Path(folder) / SAMPLING_DEFAULTS
    if not path.is_file():
        return None
    try:
        return check_sampling_defaults(json.loads(path.read_text()))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def sampling_defaults(folder: str | Path) -> dict:
    """``{"num_inference_steps", "guidance_scale"}`` recorded in a pipeline ``folder``, else PixArt's defaults (and
    ``guidance_channels`` where the folder records it)."""
    return {**PIXART_DEFAULTS, **(recorded_sampling_defaults(folder) or {})}


def check_sampling_defaults(values: dict) -> dict:
    """``values`` (any of ``num_inference_steps``, ``guidance_scale`` and ``guidance_channels``) checked and
    normalised to an int, a float and an int (a ``guidance_channels`` of None is left out: every channel); an unknown
    key or a value out of range is a ``ValueError`` naming it."""
    if not isinstance(values, dict):
        raise ValueError(f"Sampling defaults are a dict of {sorted(RECORDABLE)}, got {values!r}.")
    unknown = set(values) - set(RECORDABLE)
    if unknown:
        raise ValueError(f"Unknown sampling defaults {sorted(unknown)}; expected {sorted(RECORDABLE)}.")
    checked = {}
    if "num_inference_steps" in values:
        steps = values["num_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}.")
        checked["num_inference_steps"] = int(steps)
    if "guidance_scale" in values:
        guidance = values["guidance_scale"]
        real = isinstance(guidance, numbers.Real) and not isinstance(guidance, bool)
        if not real or not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance!r}.")
        checked["guidance_scale"] = float(guidance)
    if values.get("guidance_channels") is not None:
        check_guidance_channels(values["guidance_channels"])
        checked["guidance_channels"] = int(values["guidance_channels"])
    return checked


def save_sampling_defaults(
    folder: str | Path, num_inference_steps: int, guidance_scale: float, guidance_channels: int | None = None
) -> Path:
    """Record the sampling defaults of the pipeline in ``folder`` (``guidance_channels`` only when given); returns
    the file written."""
    values = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    values = check_sampling_defaults({**values, "guidance_channels": guidance_channels})
    path = Path(folder) / SAMPLING_DEFAULTS
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


class SamplingDefaultsMixin:
    """A pipeline's :attr:`sampling_defaults`: recorded from the folder it was loaded from, written when it is saved.

    Put before ``DiffusionPipeline`` among the bases (its ``save_pretrained`` extends diffusers').
    """

    @property
    def sampling_defaults(self) -> dict:
        """The ``num_inference_steps`` and ``guidance_scale`` of a call that passes none: those recorded in the
        folder the pipeline was loaded from (``sampling_defaults.json``) or set here (``load_lcm`` sets its
        student's), else diffusers' ``PixArtSigmaPipeline`` defaults (20 steps, 4.5); plus ``guidance_channels``
        where one is recorded (a call without it then guides that many latent channels). Set a dict with any of
        these keys to change them, None to drop them."""
        return {**PIXART_DEFAULTS, **(self._recorded() or {})}

    @sampling_defaults.setter
    def sampling_defaults(self, values: dict | None) -> None:
        self._recorded_defaults = None if values is None else check_sampling_defaults(values)

    def record_sampling_defaults(self, folder: str | os.PathLike) -> None:
        """Take the defaults recorded in ``folder`` (none without a ``sampling_defaults.json``)."""
        self._recorded_defaults = recorded_sampling_defaults(folder)

    def _recorded(self) -> dict | None:
        """The recorded defaults; a pipeline made by ``DiffusionPipeline.from_pretrained(folder)`` reads them from
        its folder on first use."""
        if "_recorded_defaults" not in self.__dict__:
            folder = getattr(self, "name_or_path", None)
            found = folder is not None and os.path.isdir(folder)
            self._recorded_defaults = recorded_sampling_defaults(folder) if found else None
        return self._recorded_defaults

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' ``DiffusionPipeline.save_pretrained``, plus ``sampling_defaults.json`` when the pipeline has
        recorded defaults (loaded from such a folder, or set), so that a folder saved again keeps them."""
        super().save_pretrained(save_directory, *args, **kwargs)
        restore_default_permissions(save_directory)  # every component's weights: safetensors writes 0o600
        if self._recorded():
            save_sampling_defaults(save_directory, **self.sampling_defaults)
