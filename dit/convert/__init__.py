"""Checkpoint converters from original repositories to the toolkit's (diffusers') keys."""

from .pixart_original import (
    convert_pixart_original_state_dict,
    infer_pixart_config,
    kv_compress_config,
    load_original_pixart,
    position_scale_of,
    read_original_checkpoint,
)
