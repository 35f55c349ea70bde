"""dit: diffusion-transformer backbones that plug into Hugging Face diffusers pipelines.

``import dit`` is cheap (no torch, no diffusers): the classes below are imported on first use, and our pipeline
classes are registered with diffusers when it is imported (:func:`dit.pipelines.registration.register_when_imported`),
so ``DiffusionPipeline.from_pretrained(folder)`` resolves them after ``import dit``.
"""

import logging

from .lazy import lazy_exports
from .pipelines.registration import register_when_imported

register_when_imported()
register_when_imported("diffusers.pipelines")  # where diffusers' test helpers look a pipeline class up by name


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" notice, which diffusers' imports set off on every command without torchvision; the
    fallback it announces is the image processor transformers used before, and our pipelines use none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())

__version__ = "0.1.0"

#: Public name -> the module defining it (imported on first use).
_EXPORTS = {
    "ControlNetAdapter": "dit.models",
    "DiTBackbone": "dit.models",
    "build_preset": "dit.models",
    "FiTTransformer": "dit.models",
    "LiTTransformer": "dit.models",
    "MicroDiTOriginalTransformer": "dit.models",
    "MicroDiTTransformer": "dit.models",
    "MultiControlNetAdapter": "dit.models",
    "PixArtTransformer": "dit.models",
    "ControlNetPipeline": "dit.pipelines",
    "TextToImagePipeline": "dit.pipelines",
    "ClassToImagePipeline": "dit.pipelines",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
