"""Attention: pure ops, kernel backends, KV compression, processors and the one :class:`DiTAttention` module."""

from .backends import BACKENDS, AttentionBackend, get_backend, resolve_backend
from .kv_compress import KVCompress
from .mask import AttentionMask
from .module import DiTAttention
from .ops import keep_mask_to_bias, math_attention, relu_linear_attention, sdpa_attention
from .processors import AttentionSpec, DiTAttnProcessor
