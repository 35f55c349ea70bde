"""An ``AutoencoderKL`` that is the identity: pixel-space diffusion in pipelines that expect a VAE.

diffusers' PixArt pipelines always decode ``vae.decode(latents / scaling_factor)``. A pixel-space model needs a
VAE that maps pixels to themselves; this one is a real ``AutoencoderKL`` (same class, config and safetensors file,
so ``PixArtSigmaPipeline.from_pretrained`` loads it) whose weights are set, not trained, so that encode and decode
are the identity to about 1e-4 (float32 summation in GroupNorm; an 8-bit level is 8e-3 in [-1, 1] units):

- one block, no downsampling (``vae_scale_factor`` 1), no mid-block attention;
- every ResNet's last convolution is zero, so each ResNet passes its input through unchanged;
- ``conv_in`` writes ``[x, -x, K, -K]`` per colour channel: GroupNorm's mean is then exactly 0 and its variance
  ``K^2 / 2 (1 + mean(x^2) / K^2)``, i.e. a fixed scale up to ``mean(x^2) / (2 K^2)`` (K = 1000: 5e-6 for
  |x| = 3); a larger K loses more to rounding in GroupNorm's sums (measured worst case 1.3e-4 at K = 1000);
- after SiLU, ``conv_out`` takes ``silu(a) - silu(-a) = a``, which undoes the nonlinearity exactly;
- the encoder's log-variance is -30 (a posterior std of 3e-7), so samples are the mean.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

CONSTANT = 1000.0  # K: the constant channels that pin GroupNorm's statistics
LOGVAR = -30.0


def pixel_autoencoder(channels: int = 3, scaling_factor: float = 1.0, sample_size: int = 64) -> AutoencoderKL:
    """An identity ``AutoencoderKL`` over ``channels`` image channels (latents = pixels in [-1, 1]).

    ``scaling_factor`` is stored in the config as usual: pipelines divide latents by it before decoding.
    """
    width = 4 * channels  # [x, -x, K, -K] per channel
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=channels, block_out_channels=(width,),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=channels, sample_size=sample_size, mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        for coder in (vae.encoder, vae.decoder):
            _split_signs(coder.conv_in, channels)
            _unsplit(coder.conv_norm_out, coder.conv_out, channels)
        vae.encoder.conv_out.bias[channels:] = LOGVAR
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    return vae.eval()


def _split_signs(conv: torch.nn.Conv2d, channels: int) -> None:
    """Channel group c of ``conv``'s output = ``[x_c, -x_c, K, -K]`` (3x3 kernels, centre tap only)."""
    for c in range(channels):
        conv.weight[4 * c, c, 1, 1] = 1.0
        conv.weight[4 * c + 1, c, 1, 1] = -1.0
        conv.bias[4 * c + 2] = CONSTANT
        conv.bias[4 * c + 3] = -CONSTANT


def _unsplit(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, channels: int) -> None:
    """Undo GroupNorm's fixed scale and SiLU: output c = silu(a_c) - silu(-a_c) = a_c = x_c."""
    scale = CONSTANT / 2**0.5  # GroupNorm's std over [x, -x, K, -K] when x << K
    norm.weight.zero_()
    for c in range(channels):
        norm.weight[4 * c] = scale
        norm.weight[4 * c + 1] = scale
        conv.weight[c, 4 * c, 1, 1] = 1.0
        conv.weight[c, 4 * c + 1, 1, 1] = -1.0
