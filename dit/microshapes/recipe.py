"""The MicroShapes recipe: data, autoencoder, features, DiT training, and the assembled pipeline folder.

    python -m dit.microshapes.recipe --out runs/microshapes [--config FILE] [--device cuda]

The default config is the shipped ``configs/microshapes.yaml`` (package data: :data:`DEFAULT_CONFIG`), found from
any working directory.

Every stage runs on a 2-core CPU (bench/results/microshapes_cpu.json times it) or on one GPU (``--device``; CUDA
when available): the world is rendered in memory, a small ``AutoencoderKL`` (2x down, 8 latent channels) is trained
on it, a 2-layer T5 encoder with a word-level tokenizer is trained to read the captions into per-object slots (``text_encoder.py``) and then
frozen, features go to safetensors shards, and the toolkit's trainer trains a small PixArt transformer on them.
The result is a diffusers-format pipeline folder (safetensors only) plus ``recipe_report.json`` with stage times.

Images are rendered and random draws made on the CPU whatever the device, so a seed gives the same batches and noise
everywhere (and, on the CPU, the same weights as before devices existed). On CUDA the encoders train in fp32 with TF32
matmuls, and the DiT in its config's ``mixed_precision``. The DiT trains where the trainer puts it: CUDA when
available, whatever ``device`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..models.registry import backbone_class
from ..pipelines.assemble import assemble
from ..tiny import WORDS, tiny_t5, tiny_tokenizer
from ..train import Trainer, load_config
from ..train.extract.feature_writer import FeatureWriter
from ..train.run.validation import record_extraction
from .evaluator import PALETTE as _PALETTE
from .shipped import default_model
from .suite import evaluate, prompt_suite
from .text_encoder import LOG_EVERY, placed, resolve_device, to_device, train_text_encoder
from .world import caption, paraphrase, random_scene, render

# 2x down, 8 latent channels; no mid-block attention (flat-colour scenes do not need it). Round trips of ground
# truth (autoencoder_ceiling): a 4x, 4-channel one scored 33% one-object prompts; 2x with 4 channels 98% one-object
# but 47% held-out, rounding small triangles' apexes into circles.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=64, mid_block_add_attention=False,
)  # fmt: skip
N_IMAGES, VAE_STEPS = 20000, 2400
# A 2-layer T5 (d_model 64) trained for a few hundred steps to read captions into per-object slots (text_encoder.py):
# with a random frozen T5 two-object images got the colours of the two objects right (in order) 9-11 times in 27,
# with the trained one 23 times in 25 (same DiT budget).
T5_CONFIG = dict(d_model=64, num_layers=2, d_kv=16, d_ff=128, num_buckets=16, dropout_rate=0.0)
TEXT_ENCODER_STEPS = 400
FEATURE_BATCH = {"cpu": 256, "cuda": 2048}  # images per encoding batch; both divide the 4096-sample shards
PALETTE_TEMPERATURE = 0.05  # of squared distance in [-1, 1] units, for the palette classification loss


def make_dataset(n: int, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """``n`` training images (n, 3, size, size) in [-1, 1] with paraphrased captions; no held-out pair."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, two_objects=0.3, held_out=False) for _ in range(n)]
    images = np.stack([render(s, size, size) for s in scenes])  # (n, H, W, 3)
    return to_tensor(images), [paraphrase(s, rng) for s in scenes]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def palette_tensor(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """The evaluator's palette in [-1, 1]: (K, 3)."""
    return torch.tensor(_PALETTE, dtype=dtype).to(device) / 127.5 - 1.0


def palette_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    temperature: float = PALETTE_TEMPERATURE,
    palette: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each reconstructed pixel's soft nearest-palette class against the target pixel's class.

    The evaluator reads pixels by their nearest palette colour, so this is the reconstruction error it sees; L1 alone
    leaves blurred outlines whose in-between colours (pink between red and white) form spurious components.
    ``palette`` is :func:`palette_tensor` on ``recon``'s device, made once by a training loop (built here if None).
    """
    if palette is None:
        palette = palette_tensor(recon.dtype, recon.device)  # (K, 3)
    distance = ((recon.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(2)  # (B, K, H, W)
    labels = ((target.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(2).argmin(1)  # (B, H, W)
    return torch.nn.functional.cross_entropy(-distance / temperature, labels)


def train_vae(
    images: torch.Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    palette_weight: float = 0.5,
    seed: int = 0,
    device: str | torch.device | None = None,
):
    """A small AutoencoderKL trained on ``device``: L1 + palette-classification loss and a light KL term; returns it
    (on ``device``) with its scaling factor set so latents have unit standard deviation.

    ``images`` are moved to ``device`` once; batch indices and posterior noise are drawn from a CPU generator, as
    before, and copied over without blocking, so a seed picks the same batches and noise on every device.
    """
    device = resolve_device(device)
    images = images.to(device)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    palette = palette_tensor(device=device)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        batch = images[to_device(torch.randint(0, len(images), (batch_size,), generator=gen), device)]
        posterior = vae.encode(batch).latent_dist
        # posterior.sample(generator=gen), with the CPU draw copied without blocking
        noise = to_device(torch.randn(posterior.mean.shape, generator=gen), device)  # (B, C, h, w)
        recon = vae.decode(posterior.mean + posterior.std * noise).sample
        loss = (recon - batch).abs().mean() + kl_weight * posterior.kl().mean()
        loss = loss + palette_weight * palette_loss(recon, batch, palette=palette)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def autoencoder_ceiling(vae, n: int = 60, device: str | torch.device | None = None) -> dict:
    """The evaluator's report on ground-truth images passed through ``vae`` (encode mean, decode) on ``device``: the
    best a model generating in this latent space can score. ``vae`` is left on the device it came on."""
    device = resolve_device(device)
    scenes = {caption(s): s for group in prompt_suite(n).values() for s in group}

    @torch.no_grad()
    def generate(prompts: list[str], seed: int) -> list[np.ndarray]:
        batch = to_tensor(np.stack([render(scenes[p]) for p in prompts])).to(device)  # (B, 3, H, W)
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample  # (B, 3, H, W)
        return list(((recon.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy())

    with placed(device, vae):
        return evaluate(generate, n=n)


def write_features(
    out: Path,
    images: torch.Tensor,
    captions: list[str],
    tokenizer,
    text_encoder,
    vae,
    max_length: int,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> None:
    """Feature shards of ``images`` and ``captions``, encoded on ``device`` in batches of ``batch_size`` (default
    :data:`FEATURE_BATCH` of the device); the encoders are left on the device they came on."""
    device = resolve_device(device)
    batch_size = batch_size or FEATURE_BATCH.get(device.type, FEATURE_BATCH["cuda"])
    out.mkdir(parents=True, exist_ok=True)
    with placed(device, text_encoder, vae):
        writer = FeatureWriter(out, tokenizer, text_encoder, vae, max_length, shard_size=4096, rank=0)
        for start in tqdm(range(0, len(images), batch_size), desc="features"):
            batch = images[start : start + batch_size].to(device)  # (B, 3, H, W); a no-op once on the device
            writer.add((images.shape[-2], images.shape[-1]), batch, captions[start : start + batch_size])
        writer.flush()
        writer.write_null_caption()


def _encoders(
    root: Path, n_images: int, vae_steps: int, text_steps: int, times: dict, info: dict, device: torch.device
) -> tuple:
    """Stages 1-4: data, autoencoder, text encoder, features, computed on ``device``; saves the encoders under
    ``root/encoders`` and returns them on ``device``. Every stage ends by reading a result back, so its time is its
    device work too."""
    started = time.perf_counter()
    images, captions = make_dataset(n_images)
    images = images.to(device)  # once: the autoencoder's batches and the features are cut from it there
    times["data_s"] = time.perf_counter() - started

    t0 = time.perf_counter()
    vae = train_vae(images, vae_steps, device=device)
    times["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer, text_encoder = tiny_tokenizer(WORDS, max_length=24), tiny_t5(**T5_CONFIG).to(device)
    info["text_encoder_accuracy"] = train_text_encoder(tokenizer, text_encoder, steps=text_steps, device=device)
    times["text_encoder_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name, part in (("tokenizer", tokenizer), ("text_encoder", text_encoder), ("vae", vae)):
        part.save_pretrained(root / "encoders" / name)  # validation and later stages load them from here
    write_features(root / "features", images, captions, tokenizer, text_encoder, vae, max_length=24, device=device)
    times["features_s"] = time.perf_counter() - t0
    return tokenizer, text_encoder, vae


@contextlib.contextmanager
def _tf32(device: torch.device):
    """TF32 matmuls on CUDA for the block (the encoders' fp32 training and the DiT's), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _load_encoders(root: Path) -> tuple:
    from transformers import AutoTokenizer, T5EncoderModel

    folder = root / "encoders"
    if not (root / "features").is_dir() or not (folder / "vae").is_dir():
        raise FileNotFoundError(f"--reuse-encoders: no encoders and features from an earlier run under {root}")
    return (AutoTokenizer.from_pretrained(folder / "tokenizer"), T5EncoderModel.from_pretrained(folder / "text_encoder"),
            AutoencoderKL.from_pretrained(folder / "vae"))  # fmt: skip


def run(
    out: str,
    config_path: str,
    n_images: int,
    vae_steps: int,
    overrides: list[str],
    reuse_encoders: bool = False,
    device: str | torch.device | None = None,
    text_encoder_steps: int = TEXT_ENCODER_STEPS,
) -> dict:
    """Run the whole recipe into ``out`` on ``device`` (default: CUDA when available, else the CPU); with
    ``reuse_encoders`` the data, autoencoder and features of an earlier run in ``out`` are kept (and so are their
    recorded stage times and ``encoder_device``) and only the DiT is trained again. ``text_encoder_steps`` below the
    default only makes toy runs (tests, ``--tiny`` benchmarks) quick."""
    device = resolve_device(device)
    with _tf32(device):
        steps = {"vae_steps": vae_steps, "text_steps": text_encoder_steps}
        return _run(Path(out), config_path, n_images, overrides, reuse_encoders, device, **steps)


def _run(
    root: Path,
    config_path: str,
    n_images: int,
    overrides: list[str],
    reuse_encoders: bool,
    device: torch.device,
    vae_steps: int,
    text_steps: int,
) -> dict:
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    stage_file = root / "encoder_stages.json"
    if reuse_encoders:
        tokenizer, text_encoder, vae = _load_encoders(root)
        encoder_report = {"encoder_device": "cpu", **json.loads(stage_file.read_text())}  # older runs: all on CPU
    else:
        times, info = {}, {}
        tokenizer, text_encoder, vae = _encoders(root, n_images, vae_steps, text_steps, times, info, device)
        encoder_report = {"stages": times, "n_images": n_images, "vae_steps": vae_steps,
                          "text_encoder_steps": text_steps, **info}  # fmt: skip
        encoder_report["autoencoder_ceiling"] = autoencoder_ceiling(vae.eval(), device=device)
        encoder_report["encoder_device"] = str(device)
        stage_file.write_text(json.dumps(encoder_report, indent=2))

    record_extraction(root / "features", root / "encoders")  # the run's pipeline folder links these encoders
    t0 = time.perf_counter()
    paths = [
        f"data.path={root / 'features'}",
        f"output_dir={root / 'train'}",
        "overwrite=true",  # the recipe remakes its whole --out folder; the trainer says so in one line
        f"validation.pipeline={root / 'encoders'}",
        f"validation.prompts={json.dumps(VALIDATION_PROMPTS)}",  # the config leaves them to the data (own images)
    ]
    trainer = Trainer(load_config(config_path, [*paths, *overrides]))
    trainer.train()
    checkpoints = root / "train" / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text()
    # the EMA weights when the config trains with an EMA, else the raw ones
    weights = latest / "model_ema" if (latest / "model_ema").is_dir() else latest / "model"
    transformer = backbone_class(trainer.config.model.cls).from_pretrained(weights)
    sampling = (trainer.config.validation.steps, trainer.config.validation.guidance_scale)
    assemble(root / "pipeline", tokenizer, text_encoder, vae, transformer, trainer.objective.sampling_scheduler(),
             sampling)  # fmt: skip
    times = {**encoder_report["stages"], "dit_s": time.perf_counter() - t0}
    times["total_s"] = sum(times.values())
    report = {**encoder_report, "stages": times, "device": str(device), "config": config_path,
              "overrides": overrides, "reused_encoders": reuse_encoders,
              "this_run_s": time.perf_counter() - started}  # fmt: skip
    (root / "recipe_report.json").write_text(json.dumps(report, indent=2))
    return report


#: The recipe's training config as installed with the package (``configs/microshapes.yaml`` in the repository).
DEFAULT_CONFIG = str(files("dit.configs") / "microshapes.yaml")
#: What the recipe's run samples at validation (the config has no prompts: other data validates on its own captions).
VALIDATION_PROMPTS = (
    "a large red circle on the left, on a white background",
    "a small blue square in the center, on a black background",
    "a large yellow triangle on the top, on a gray background",
    "a green circle to the left of a cyan square, on a white background",
    "a large magenta triangle on the right, on a white background",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/microshapes")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="training config (default: the shipped one)")
    parser.add_argument("--images", type=int, default=N_IMAGES)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--text-encoder-steps", type=int, default=TEXT_ENCODER_STEPS)
    parser.add_argument("--reuse-encoders", action="store_true", help="keep an earlier run's data, VAE and features")
    parser.add_argument("--device", help="where the stages compute (default: cuda when available, else cpu)")
    parser.add_argument("--ship", action="store_true", help="replace the package's default model with the result")
    parser.add_argument("overrides", nargs="*", help="trainer key=value overrides")
    args = parser.parse_args(argv)
    report = run(args.out, args.config, args.images, args.vae_steps, args.overrides, args.reuse_encoders, args.device,
                 args.text_encoder_steps)  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.ship:
        print(f"shipped to {ship(Path(args.out) / 'pipeline')}")


def ship(pipeline: Path) -> Path:
    """Copy a pipeline folder to the package's default-model location (``dit generate`` without ``--model``)."""
    target = default_model()
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(pipeline, target)
    return target


if __name__ == "__main__":
    main()
