"""dit: diffusion-transformer backbones that plug into Hugging Face diffusers pipelines.

``import dit`` is cheap (no torch, no diffusers): the classes below are imported on first use, and our pipeline
classes are registered with diffusers when it is imported (:func:`dit.pipelines.registration.register_when_imported`),
so ``DiffusionPipeline.from_pretrained(folder)`` resolves them after ``import dit``.
"""

import logging
import os

from .lazy import lazy_exports
from .pipelines.registration import register_when_imported

register_when_imported()
register_when_imported("diffusers.pipelines")  # where diffusers' test helpers look a pipeline class up by name


class _KnownNoiseFilter(logging.Filter):
    """Drops log records containing one of ``fragments``: notices that imports of our dependencies print on every
    command and that say nothing about the user's work. ``DIT_SHOW_IMPORT_NOTICES=1`` keeps them."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


#: logger -> notices it prints at import time. transformers: "`CLIPImageProcessor` requires torchvision (not
#: installed); falling back to `CLIPImageProcessorPil`" (our pipelines use no image processor); torchao (the
#: ``quantization`` extra): its CUDA kernel libraries that a CPU build of torch cannot load, and torch's deprecation of
#: the Enum registration torchao does at import; diffusers 0.42: torchao classes it looks for that torchao >= 0.16
#: removed (they matter only for pickled torchao checkpoints; safetensors ones load).
_IMPORT_NOTICES = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
if os.environ.get("DIT_SHOW_IMPORT_NOTICES") != "1":
    for _name, _fragments in _IMPORT_NOTICES.items():
        logging.getLogger(_name).addFilter(_KnownNoiseFilter(*_fragments))

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
