"""The identity AutoencoderKL that lets pixel-space models run in pipelines that always decode with a VAE."""

import pytest
import torch
from diffusers import AutoencoderKL

from dit.models.pixel_autoencoder import pixel_autoencoder


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40), (96, 48)])
@pytest.mark.parametrize("amplitude", [1.0, 3.0])
def test_encode_and_decode_are_the_identity(height, width, amplitude):
    vae = pixel_autoencoder(scaling_factor=1.3)
    x = (torch.rand(2, 3, height, width) * 2 - 1) * amplitude
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mean).sample
    assert vae.config.scaling_factor == 1.3
    assert (posterior.mean - x).abs().max() < 3e-4  # 8-bit quantisation is 8e-3 here
    assert (decoded - x).abs().max() < 3e-4
    assert posterior.std.max() < 1e-6  # samples are the mean


def test_not_an_identity_when_a_weight_is_disturbed():
    """The identity is made by the weights, not by the class: perturbing one conv breaks it (the test can fail)."""
    vae = pixel_autoencoder()
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 1, 1] += 0.1
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        assert (vae.decode(x).sample - x).abs().max() > 1e-2


def test_round_trips_through_save_pretrained(tmp_path):
    pixel_autoencoder(channels=3, scaling_factor=0.9).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == [
        "diffusion_pytorch_model.safetensors"
    ]
    vae = AutoencoderKL.from_pretrained(tmp_path).eval()
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().max() < 3e-4
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 1  # diffusers' vae_scale_factor: no downsampling
