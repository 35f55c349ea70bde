"""Pipelines (imported as ``dit.pipelines``)."""

from .controlnet import ControlNetPipeline
from .lcm import load_lcm, save_lcm
from .text_to_image import TextToImagePipeline
