"""LiT: the PixArt backbone with ReLU linear self-attention, few heads and a 5x5 depthwise value convolution."""

from __future__ import annotations

import inspect

# diffusers' pipeline loader looks the name `ModelMixin` up in the module that model_index.json records.
from diffusers.models.modeling_utils import ModelMixin

from .pixart_transformer import PixArtTransformer

__all__ = ["LiTTransformer", "ModelMixin"]

#: What makes a PixArt model a LiT model (arXiv 2501.12976): linear self-attention with few heads plus a depthwise
#: convolution of kernel 5; cross-attention to text stays softmax.
LIT_DEFAULTS = {"self_attention_type": "linear", "attention_conv_kernel_size": 5}


class LiTTransformer(PixArtTransformer):
    """PixArt-style diffusion transformer with LiT's linear self-attention.

    Same config fields, keys, forward and pipelines as :class:`PixArtTransformer` (it is one, with
    ``self_attention_type="linear"``, ``linear_attention_heads`` defaulting to a quarter of the heads, and a 5x5
    depthwise value convolution ``attn1.dwc``). :meth:`from_pixart` converts a trained PixArt model: every weight is
    inherited except the self-attention ``to_q`` / ``to_k`` / ``to_v`` (re-initialised, as LiT found better than
    loading them) and the new ``dwc`` (zero-initialised); ``to_out`` is kept.
    """

    _inherit_config = LIT_DEFAULTS
    _inherit_skip = ("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**LIT_DEFAULTS, **kwargs})


# diffusers reads a class's config fields (and their defaults) from the signature of its __init__.
LiTTransformer.__init__.__signature__ = inspect.signature(PixArtTransformer.__init__).replace(
    parameters=[
        p.replace(default=LIT_DEFAULTS.get(name, p.default))
        for name, p in inspect.signature(PixArtTransformer.__init__).parameters.items()
    ]
)
