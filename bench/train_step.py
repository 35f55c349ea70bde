"""Training step of our loop on our PixArt backbone against a plain step over diffusers' PixArtTransformer2DModel.

Same config (PixArt-XL-shaped blocks, fewer layers; ``--preset`` names another PixArt size of ``dit.models.presets``),
same batch (Σ-style 300-token text with 20-60 real tokens), same precision, AdamW and gradient clipping in both; EMA
off in both. Ours is ``Trainer._optimizer_step`` (data
plan, per-sample draws, DDPM ε loss with the learned-sigma term); the reference is the minimal diffusers step
(forward, ε MSE on the first channels, backward, clip, AdamW). Runs alternate; medians compared. Peak memory is
one step's peak resident memory above its start, after a warm-up step, in a fresh process.

    python bench/train_step.py [--device cuda --dtype bf16 --size 512 --layers 28]
    python bench/train_step.py --preset tiny-pixart --size 64      # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit.models.presets import PRESETS, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, alternate, machine, peak_bytes, write_json  # noqa: E402

#: The presets this benchmark can time: ours against diffusers' class, so PixArt ones only.
PIXART_PRESETS = [name for name, preset in PRESETS.items() if preset.cls == "PixArtTransformer"]
#: PixArt-XL-2 at 512 px (the XL blocks; ``--layers`` of its 28 are trained, at ``--size``).
DEFAULT_PRESET = "PixArt-XL-2-512"
TEXT_TOKENS = 300


def write_features(
    folder: Path, batch: int, latent: int, text_tokens: int = TEXT_TOKENS, width: int = 4096, channels: int = 4
) -> None:
    """``batch * 4`` samples: random latents of ``channels``, ``text_tokens``-token captions ``width`` wide with 20-60
    real tokens (fewer when ``text_tokens`` is smaller)."""
    gen = torch.Generator().manual_seed(0)
    n = batch * 4
    mask = torch.zeros(n, text_tokens, dtype=torch.long)
    for i in range(n):
        mask[i, : min(text_tokens, 20 + (i * 13) % 41)] = 1
    save_file({"latent_mean": torch.randn(n, channels, latent, latent, generator=gen),
               "text_embeds": torch.randn(n, text_tokens, width, generator=gen), "text_mask": mask},
              folder / "shard-000.safetensors")  # fmt: skip


def build(args, folder: Path, model_config: dict | None = None, ema_decay: float | None = None, overrides: tuple = ()):
    """Our trainer (``ema_decay``: its EMA, off by default; ``overrides``: more of its config, e.g.
    ``mixed_precision_weights=bf16``) and a diffusers model + optimizer with the same initial weights,
    ``model_config`` (default: ``args.preset``'s) with ``args.layers`` blocks at ``args.size`` px."""
    from diffusers import PixArtTransformer2DModel

    from dit.train import Trainer, load_config

    settings = [f"data.path={folder}", f"data.batch_size={args.batch}", "data.caption_dropout=0",
                 f"ema_decay={'null' if ema_decay is None else ema_decay}", "report_to=none",
                 "pipeline=false", "model.cls=PixArtTransformer", f"output_dir={folder / 'run'}", "optim.weight_decay=0.0",
                 f"mixed_precision={'no' if args.dtype == 'fp32' else args.dtype}", *overrides]  # fmt: skip
    config = load_config(None, settings)
    model_config = preset_config(args.preset) if model_config is None else model_config
    config.model.kwargs = {**model_config, "num_layers": args.layers, "sample_size": args.size // 8}
    trainer = Trainer(config)
    torch.manual_seed(0)
    reference = PixArtTransformer2DModel(**config.model.kwargs).to(trainer.accelerator.device).train()
    reference.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    optimizer = torch.optim.AdamW(reference.parameters(), lr=config.optim.lr, weight_decay=0.0)
    return trainer, reference, optimizer


def micro_conditions(reference, latents: torch.Tensor) -> dict | None:
    """diffusers' ``added_cond_kwargs`` where its model uses micro-conditions (sample_size 128 turns them on): the
    image size in pixels and its aspect ratio, as our model computes them from the latent size."""
    if not reference.use_additional_conditions:
        return None
    batch, (height, width) = latents.shape[0], latents.shape[-2:]
    resolution = torch.tensor([[height * 8.0, width * 8.0]], device=latents.device).expand(batch, 2)  # (B, 2)
    aspect_ratio = torch.tensor([[height / width]], device=latents.device).expand(batch, 1)  # (B, 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


def reference_step(reference, optimizer, batch: dict, device: str, dtype: str) -> None:
    latents = batch["latent_mean"].to(device)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],), device=device)
    abar = torch.linspace(1e-4, 0.02, 1000, device=device).neg().add(1).cumprod(0)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        pred = reference(
            noisy,
            batch["text_embeds"].to(device),
            t,
            encoder_attention_mask=batch["text_mask"].to(device),
            added_cond_kwargs=micro_conditions(reference, latents),
        ).sample
    loss = ((pred[:, :4].float() - noise) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reference_batch(trainer, size: int) -> dict:
    """``size`` samples with the full text padding, as diffusers' training scripts feed PixArt (our loop trims it)."""
    from dit.train.data.dataset import collate

    samples = [trainer.dataset[i] for i in range(size)]
    return collate(samples, min_text_length=samples[0]["text_mask"].shape[0])


def step_functions(trainer, reference, optimizer, args):
    batches = trainer._batches(0, 10_000)
    batch = reference_batch(trainer, args.batch)
    device = str(trainer.accelerator.device.type)
    return {
        "diffusers": lambda: reference_step(reference, optimizer, batch, device, args.dtype),
        "ours": lambda: trainer._optimizer_step(batches, 1),
    }


def features(folder: Path, args) -> None:
    """The features of ``args.preset``'s shapes (:func:`write_features`)."""
    config = preset_config(args.preset)
    write_features(
        folder, args.batch, args.size // 8, width=config["caption_channels"], channels=config["in_channels"]
    )


def memory_probe(which: str, args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        features(Path(tmp), args)
        trainer, reference, optimizer = build(args, Path(tmp))
        step = step_functions(trainer, reference, optimizer, args)[which]
        (reference if which == "ours" else trainer.model).to("meta")  # drop the other model's weights
        step()  # warm-up: optimizer state allocated
        return peak_bytes(step, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=PIXART_PRESETS, help="the model size (its width)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--layers", type=int, default=2, help="how many of the preset's layers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-probe", choices=["ours", "diffusers"])
    add_out_argument(parser, "train_step_<device>.json")
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps({"peak_bytes": memory_probe(args.memory_probe, args)}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        features(Path(tmp), args)
        trainer, reference, optimizer = build(args, Path(tmp))
        timing = alternate(step_functions(trainer, reference, optimizer, args), args.device, args.runs)
    memory = {}
    for which in ("diffusers", "ours"):
        cmd = [sys.executable, __file__, "--memory-probe", which] + [
            f"--{k}={v}"
            for k, v in vars(args).items()
            if k in ("device", "preset", "dtype", "size", "layers", "batch")
        ]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        memory[which] = int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    for which in ("diffusers", "ours"):
        timing[which]["steps_per_s"] = round(1 / timing[which]["median_s"], 4)
        timing[which]["peak_memory_bytes"] = memory[which]
    speedup = timing["diffusers"]["median_s"] / timing["ours"]["median_s"]
    memory_ratio = memory["ours"] / memory["diffusers"]
    target = 1.0 if args.device == "cpu" else 1.2
    payload = {
        "benchmark": "train_step",
        "device": args.device,
        "machine": machine(args.device),
        "preset": args.preset,
        "config": {
            **preset_config(args.preset),
            "num_layers": args.layers,
            "image_size": args.size,
            "batch": args.batch,
            "dtype": args.dtype,
            "text_tokens": TEXT_TOKENS,
            "real_text_tokens": "20-60",
            "runs": args.runs,
        },  # fmt: skip
        "diffusers": timing["diffusers"],
        "ours": timing["ours"],
        "throughput_ratio": round(speedup, 3),
        "memory_ratio": round(memory_ratio, 3),
        "target": f"throughput >= {target}x diffusers' plain step, peak memory <= diffusers'",
        "met": speedup >= target and memory_ratio <= 1.0,
    }
    path = write_json(args.out, payload, f"train_step_{args.device}.json")
    print(f"diffusers {timing['diffusers']['median_s']:.3f}s/step, ours {timing['ours']['median_s']:.3f}s/step "
          f"(x{speedup:.3f} throughput), memory x{memory_ratio:.3f}; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
