"""The MicroShapes recipe: data, autoencoder, features, DiT training, and the assembled pipeline folder.

    python -m dit.microshapes.recipe --out runs/microshapes [--config configs/microshapes.yaml]

Every stage runs on a 2-core CPU: the world is rendered in memory, a small ``AutoencoderKL`` (4x down, 4 latent
channels) is trained on it, a frozen randomly initialised T5 encoder with a word-level tokenizer encodes the
captions, features go to safetensors shards, and the toolkit's trainer trains a small PixArt transformer on them.
The result is a diffusers-format pipeline folder (safetensors only) plus ``recipe_report.json`` with stage times.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from ..tiny import WORDS, tiny_t5, tiny_tokenizer
from .world import paraphrase, random_scene, render

# 4x down, 4 latent channels; no mid-block attention (flat-colour scenes do not need it; 0.25 s per batch of 16)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=64, mid_block_add_attention=False,
)  # fmt: skip


def make_dataset(n: int, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """``n`` training images (n, 3, size, size) in [-1, 1] with paraphrased captions; no held-out pair."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, two_objects=0.3, held_out=False) for _ in range(n)]
    images = np.stack([render(s, size, size) for s in scenes])  # (n, H, W, 3)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return tensor, [paraphrase(s, rng) for s in scenes]


def train_vae(
    images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0
):
    """A small AutoencoderKL: L1 + MSE reconstruction and a light KL term; returns it with its scaling factor set."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="vae"):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (recon - batch).abs().mean() + ((recon - batch) ** 2).mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def write_features(
    out: Path, images: torch.Tensor, captions: list[str], tokenizer, text_encoder, vae, max_length: int
) -> None:
    from dit.train.extract import FeatureWriter

    out.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(out, tokenizer, text_encoder, vae, max_length, shard_size=4096, rank=0)
    for start in tqdm(range(0, len(images), 256), desc="features"):
        writer.add((images.shape[-2], images.shape[-1]), images[start : start + 256], captions[start : start + 256])
    writer.flush()
    writer.write_null_caption()


def assemble(folder: Path, tokenizer, text_encoder, vae, transformer) -> None:
    """Save a complete pipeline folder (safetensors only)."""
    from dit.pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    pipe.save_pretrained(folder)


def run(out: str, config_path: str, n_images: int, vae_steps: int, overrides: list[str]) -> dict:
    from dit.models import PixArtTransformer
    from dit.train import Trainer, load_config

    root, times = Path(out), {}
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images, captions = make_dataset(n_images)
    times["data_s"] = time.perf_counter() - started

    t0 = time.perf_counter()
    vae = train_vae(images, vae_steps)
    times["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer, text_encoder = tiny_tokenizer(WORDS, max_length=24), tiny_t5(d_model=64)
    for name, part in (("tokenizer", tokenizer), ("text_encoder", text_encoder), ("vae", vae)):
        part.save_pretrained(root / "encoders" / name)  # validation and later stages load them from here
    write_features(root / "features", images, captions, tokenizer, text_encoder, vae, max_length=24)
    times["features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    paths = [
        f"data.path={root / 'features'}",
        f"output_dir={root / 'train'}",
        f"validation.pipeline={root / 'encoders'}",
    ]
    config = load_config(config_path, [*paths, *overrides])
    trainer = Trainer(config)
    trainer.train()
    times["dit_s"] = time.perf_counter() - t0

    checkpoints = root / "train" / "checkpoints"
    transformer = PixArtTransformer.from_pretrained(checkpoints / (checkpoints / "latest").read_text() / "model_ema")
    assemble(root / "pipeline", tokenizer, text_encoder, vae, transformer)
    times["total_s"] = time.perf_counter() - started
    report = {
        "stages": times,
        "n_images": n_images,
        "vae_steps": vae_steps,
        "config": config_path,
        "overrides": overrides,
    }
    (root / "recipe_report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/microshapes")
    parser.add_argument("--config", default="configs/microshapes.yaml")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("overrides", nargs="*", help="trainer key=value overrides")
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.config, args.images, args.vae_steps, args.overrides), indent=2))


if __name__ == "__main__":
    main()
