"""Pipelines (imported as ``dit.pipelines``).

The pipeline classes load on first use, so ``dit.pipelines.checks`` (the sampling-value checks) imports without
diffusers' pipelines (``dit generate`` checks its arguments before that import). ``import dit`` registers them
with diffusers (:mod:`dit.pipelines.registration`), so ``DiffusionPipeline.from_pretrained`` loads our folders.
"""

from importlib import import_module

_EXPORTS = {
    "ControlNetPipeline": ".controlnet",
    "TextToImagePipeline": ".text_to_image",
    "load_lcm": ".lcm",
    "save_lcm": ".lcm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
