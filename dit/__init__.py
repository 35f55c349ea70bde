"""dit: diffusion-transformer backbones that plug into Hugging Face diffusers pipelines."""

from .models import (
    ControlNetAdapter,
    FiTTransformer,
    LiTTransformer,
    MicroDiTTransformer,
    MultiControlNetAdapter,
    PixArtTransformer,
)
from .pipelines.registration import register_pipelines

# DiffusionPipeline.from_pretrained(folder) resolves our pipeline classes by name from here on (imported on first
# use); see dit.pipelines.registration.
register_pipelines()

__version__ = "0.1.0"
__all__ = [
    "ControlNetAdapter",
    "ControlNetPipeline",
    "FiTTransformer",
    "LiTTransformer",
    "MicroDiTTransformer",
    "MultiControlNetAdapter",
    "PixArtTransformer",
    "TextToImagePipeline",
]


def __getattr__(name: str):
    # The pipeline pulls in transformers; import it only when asked for.
    if name in ("TextToImagePipeline", "ControlNetPipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'dit' has no attribute {name!r}")
