"""Tiny components for offline tests: PixArt configs, a T5 encoder, a word-level tokenizer and a VAE."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from dit import PixArtTransformer

# α-1024-MS style: micro-conditions on (sample_size 128 would switch them on by default; set explicitly here)
ALPHA = dict(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
    cross_attention_dim=24, sample_size=8, caption_channels=32, use_additional_conditions=True,
    interpolation_scale=2,
)  # fmt: skip
# Σ style: no micro-conditions, 300-token text in the real model
SIGMA = dict(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
    cross_attention_dim=24, sample_size=8, caption_channels=32, use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
CONFIGS = {"alpha": ALPHA, "sigma": SIGMA}

WORDS = (
    "a an the large small red green blue yellow magenta cyan circle square triangle on in to of left right top "
    "bottom center above below white black gray background cat dog photo"
).split()


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial random values (default inits zero some paths)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def diffusers_and_ours(config: dict, seed: int = 0) -> tuple[PixArtTransformer2DModel, PixArtTransformer]:
    """diffusers' PixArtTransformer2DModel with random weights and ours with the very same weights."""
    torch.manual_seed(seed)
    reference = randomize_(PixArtTransformer2DModel(**config)).eval()
    ours = PixArtTransformer(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def added_cond(batch: int, height: int = 64, width: int = 64) -> dict[str, torch.Tensor]:
    return {
        "resolution": torch.tensor([[float(height), float(width)]]).repeat(batch, 1),
        "aspect_ratio": torch.tensor([[height / width]]).repeat(batch, 1),
    }


def tiny_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_t5(d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    ).eval()  # fmt: skip
