"""Pipelines (imported as ``dit.pipelines``).

The pipeline classes load on first use, so ``dit.pipelines.checks`` (the sampling-value checks) imports without
diffusers' pipelines (``dit generate`` checks its arguments before that import). ``import dit`` registers them
with diffusers (:mod:`dit.pipelines.registration`), so ``DiffusionPipeline.from_pretrained`` loads our folders.
"""

from dit.lazy import lazy_exports

_EXPORTS = {
    "ClassToImagePipeline": ".class_to_image",
    "ControlNetPipeline": ".controlnet",
    "LowMemoryConfig": ".low_memory",
    "TextToImagePipeline": ".text_to_image",
    "load_lcm": ".lcm",
    "save_lcm": ".lcm",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
