"""Pipelines (imported as ``dit.pipelines``)."""

from .text_to_image import TextToImagePipeline
