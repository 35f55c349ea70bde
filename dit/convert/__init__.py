"""Checkpoint converters from original repositories to the toolkit's (diffusers') keys."""

from .fit_original import convert_fit_original_state_dict, fit_config, load_original_fit, read_fit_config
from .microdit_original import convert_microdit_original_state_dict, load_original_microdit
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
