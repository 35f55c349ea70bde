"""A PixArt-family config's attention fields as the typed options of each block's self-attention."""

from __future__ import annotations

from ..nn.attention import AttentionSpec

#: ``self_attention_type`` config value -> the attention kernel it selects.
SELF_ATTENTION_TYPES = {"softmax": "softmax", "linear": "linear"}


def self_attention_spec(config, index: int) -> AttentionSpec:
    """The :class:`~dit.nn.attention.AttentionSpec` of block ``index``'s self-attention: ``self_attention_type``
    (``linear``: LiT's ReLU linear attention over ``linear_attention_heads``, default a quarter of the heads),
    ``attention_conv_kernel_size``, PixArt-Σ's KV compression in ``kv_compress_layers`` (default: the deep half) and
    ``qk_norm``. The spec checks every value; the width check is here (it needs the config)."""
    kind = config.self_attention_type
    if kind not in SELF_ATTENTION_TYPES:
        raise ValueError(f"self_attention_type must be one of {sorted(SELF_ATTENTION_TYPES)}, got {kind!r}.")
    heads = None
    if kind == "linear":
        heads = config.linear_attention_heads or max(1, config.num_attention_heads // 4)
        if (config.num_attention_heads * config.attention_head_dim) % heads:
            raise ValueError(f"linear_attention_heads={heads} does not divide the width.")
    layers = config.kv_compress_layers
    if layers is None:
        layers = range(config.num_layers // 2, config.num_layers)
    compress = config.kv_compress_ratio is not None and index in layers
    qk_norm = getattr(config, "qk_norm", None)
    if qk_norm not in (None, "layer_norm_across_heads"):
        raise ValueError(f"qk_norm must be None or 'layer_norm_across_heads', got {qk_norm!r}.")
    return AttentionSpec(
        kernel=SELF_ATTENTION_TYPES[kind],
        heads=heads,
        kv_compress_ratio=config.kv_compress_ratio if compress else None,
        kv_compress_mode=config.kv_compress_mode,
        kv_compress_padding=getattr(config, "kv_compress_padding", "replicate"),
        conv_kernel_size=config.attention_conv_kernel_size or None,
        qk_norm=qk_norm,
    )
