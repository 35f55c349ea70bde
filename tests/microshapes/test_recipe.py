"""Recipe stages on a handful of images: data without the held-out pair, a VAE that trains, a loadable pipeline."""

import torch

from dit.microshapes.recipe import make_dataset, train_vae


def test_dataset_images_and_captions():
    images, captions = make_dataset(64, seed=3)
    assert images.shape == (64, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert len(captions) == 64 and not any("magenta triangle" in c for c in captions)


def test_vae_trains_and_sets_its_scaling_factor():
    images, _ = make_dataset(32, seed=4)
    vae = train_vae(images, steps=3, batch_size=4)
    with torch.no_grad():
        latents = vae.encode(images[:2]).latent_dist.mean
    assert latents.shape == (2, 8, 32, 32)  # 2x down
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0
