"""Tiny, randomly initialised components for offline tests, notebooks and smoke runs (no hub needed).

A word-level tokenizer built with the ``tokenizers`` library, a T5 encoder from a ``T5Config``, a small
``AutoencoderKL`` and a small PixArt transformer: together a complete :class:`~dit.pipelines.TextToImagePipeline`.
"""

from __future__ import annotations

import torch

from .models import PixArtTransformer
from .models.presets import preset_config
from .pipelines.text_to_image import TextToImagePipeline

WORDS = (
    "a an the large small red green blue yellow magenta cyan circle square triangle on in to of left right top "
    "bottom center above below white black gray background cat dog photo"
).split()

#: The tiny PixArt transformer's config (the ``tiny-pixart`` size preset).
TINY_PIXART = preset_config("tiny-pixart")


def tiny_tokenizer(words: list[str] | tuple[str, ...] = tuple(WORDS), max_length: int = 16):
    """A lower-casing, whitespace word-level tokenizer that appends ``</s>`` like T5's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_t5(
    vocab_size: int = len(WORDS) + 3,
    d_model: int = 32,
    seed: int = 0,
    num_layers: int = 1,
    d_kv: int = 8,
    d_ff: int = 64,
    num_buckets: int = 8,
    dropout_rate: float = 0.1,
):
    """A randomly initialised transformers ``T5EncoderModel`` (4 heads) in eval mode."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_heads=4,
        relative_attention_num_buckets=num_buckets, dropout_rate=dropout_rate, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0):
    """A 2x-downsampling, 4-channel ``AutoencoderKL``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    ).eval()  # fmt: skip


def tiny_pipeline(seed: int = 0, **transformer_overrides):
    """A complete :class:`~dit.pipelines.TextToImagePipeline` of tiny random components."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer(**{**TINY_PIXART, **transformer_overrides})
    return TextToImagePipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5(seed=seed),
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=None,
    )
