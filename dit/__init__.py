"""dit: diffusion-transformer backbones that plug into Hugging Face diffusers pipelines."""

from .models import LiTTransformer, PixArtTransformer

__version__ = "0.1.0"
__all__ = ["LiTTransformer", "PixArtTransformer", "TextToImagePipeline"]


def __getattr__(name: str):
    # The pipeline pulls in transformers; import it only when asked for.
    if name == "TextToImagePipeline":
        from .pipelines import TextToImagePipeline

        return TextToImagePipeline
    raise AttributeError(f"module 'dit' has no attribute {name!r}")
