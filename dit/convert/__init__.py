"""Checkpoint converters from original repositories to the toolkit's (diffusers') keys."""

from .pixart_controlnet import (
    convert_pixart_controlnet_original_state_dict,
    convert_pixart_controlnet_research_state_dict,
    load_original_pixart_controlnet,
)
from .pixart_original import (
    convert_pixart_original_state_dict,
    infer_pixart_config,
    kv_compress_config,
    load_original_pixart,
    position_scale_of,
    read_original_checkpoint,
)
