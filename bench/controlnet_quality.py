"""ControlNet (PixArt-δ) quality at micro scale on MicroShapes, with RelaCtrl relevance and a slim adapter.

    python bench/controlnet_quality.py --base dit/assets/microshapes --steps 2000 \
        --out bench/results/controlnet_quality_cpu.json
    python bench/controlnet_quality.py --tiny --work runs/controlnet_tiny         # smoke run: seconds, random base

1. Features: MicroShapes scenes at the base's resolution; images, captions and controls (the silhouette, or its edges,
   as a 3-channel image in [-1, 1]) through the base pipeline's own VAE (posterior mean x scaling factor) and T5,
   whatever its latent channels and VAE factor (an identity pixel-space VAE included).
2. Train an adapter on the frozen base with the trainer (``configs/controlnet_microshapes.yaml``, the objective read
   from the base's scheduler).
3. Evaluate on fixed one-object scenes: IoU of the generated shape (pixels whose nearest palette colour is a shape
   colour) with the control silhouette, colour accuracy; the base without control for reference; and
   ``controlnet_conditioning_scale=0`` against ``TextToImagePipeline`` bit for bit.
4. Relevance (RelaCtrl): the quality drop when each block is skipped; a slim adapter at the most relevant positions,
   both the trained blocks kept and fresh copies trained for ``--slim-steps``; parameters and quality vs the full one.

Targets: IoU >= 0.8, colour accuracy >= 0.9, scale 0 exact. Writes the JSON to ``--out`` (default:
``runs/bench/controlnet_quality_<device>.json``; ``--tiny``: ``WORK/controlnet_quality_tiny.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "controlnet_microshapes.yaml"
TARGETS = {"iou": 0.8, "color_accuracy": 0.9}
PREDICTIONS = {"epsilon": "ddpm_eps", "v_prediction": "v", "sample": "x0"}


def objective_overrides(scheduler) -> list[str]:
    """The trainer objective matching the base's sampler (prediction type, timesteps, betas or their SNR shift)."""
    if "FlowMatch" in type(scheduler).__name__:
        return ["objective.name=flow"]
    cfg = scheduler.config
    overrides = [f"objective.name={PREDICTIONS[cfg.prediction_type]}",
                 f"objective.num_train_timesteps={cfg.num_train_timesteps}"]  # fmt: skip
    if cfg.get("trained_betas") is None:
        return overrides + [f"objective.discrete.beta_start={cfg.beta_start}",
                            f"objective.discrete.beta_end={cfg.beta_end}"]  # fmt: skip
    # a shifted schedule (dit.train.objectives.parametrisation.discrete_betas): every SNR of PixArt's linear betas divided by shift^2
    betas = torch.linspace(0.0001, 0.02, cfg.num_train_timesteps, dtype=torch.float64)
    trained = torch.tensor(cfg.trained_betas, dtype=torch.float64)
    snr = [(a / (1 - a)) for a in (torch.cumprod(1 - b, 0) for b in (betas, trained))]
    return overrides + [f"objective.discrete.noise_shift={float((snr[0] / snr[1]).median().sqrt()):.6g}"]


def write_features(pipe, out: Path, n_images: int, kind: str, seed: int = 0) -> None:
    """MicroShapes images, paraphrased captions and controls as feature shards with ``control_latent``."""
    from dit.microshapes.control import control_image, image_size
    from dit.microshapes.recipe import to_tensor
    from dit.microshapes.world import paraphrase, random_scene, render
    from dit.train.extract.feature_writer import ControlFeatureWriter

    width, height = image_size(pipe)
    rng = random.Random(seed)
    scenes = [random_scene(rng, two_objects=0.3, held_out=False) for _ in range(n_images)]
    max_length = min(pipe.tokenizer.model_max_length, 120)
    writer = ControlFeatureWriter(out, pipe.tokenizer, pipe.text_encoder, pipe.vae, max_length, 4096, rank=0)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, n_images, 256):
        batch = scenes[start : start + 256]
        images = to_tensor(np.stack([render(s, width, height) for s in batch]))  # (B, 3, H, W)
        controls = to_tensor(np.stack([control_image(s, width, height, kind) for s in batch]))  # (B, 3, H, W)
        writer.add((height, width), images, [paraphrase(s, rng) for s in batch], controls)
    writer.flush()
    writer.write_null_caption()


def train(name: str, out: Path, overrides: list[str]):
    """Train one adapter; returns it (EMA weights when kept) in eval mode and the wall time."""
    from dit.train import Trainer, load_config

    started = time.perf_counter()
    trainer = Trainer(load_config(CONFIG, [f"output_dir={out / name}", "overwrite=true", *overrides]))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ema is not None:
        with trainer.ema.swapped_in(model):
            model = copy.deepcopy(model)
    return model.controlnet.eval(), time.perf_counter() - started


def scale_zero(base_pipe, adapter, scenes, steps: int, guidance: float, width: int, height: int) -> dict:
    """``controlnet_conditioning_scale=0`` against the base pipeline alone, same seeds: bit-identical images?"""
    from dit.microshapes.control import control_generator, control_image
    from dit.microshapes.world import caption
    from dit.pipelines import ControlNetPipeline

    pipe = ControlNetPipeline(**base_pipe.components, controlnet=adapter)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption(s) for s in scenes]
    controls = [control_image(s, width, height) for s in scenes]
    ours = control_generator(pipe, steps, guidance, controlnet_conditioning_scale=0.0)(prompts, controls, 0)
    theirs = control_generator(base_pipe, steps, guidance)(prompts, controls, 0)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ours, theirs))
    return {"n": len(scenes), "exact": all(np.array_equal(a, b) for a, b in zip(ours, theirs)), "max_abs_diff": diff}


def evaluate(base_pipe, adapter, scenes, steps, guidance, kind) -> dict:
    from dit.microshapes.control import control_generator, evaluate_control, image_size
    from dit.pipelines import ControlNetPipeline

    pipe = base_pipe
    if adapter is not None:
        pipe = ControlNetPipeline(**base_pipe.components, controlnet=adapter)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_control(control_generator(pipe, steps, guidance), scenes, *image_size(base_pipe), kind)


def _base(args) -> Path:
    """The base pipeline folder; ``--tiny`` without ``--base`` saves a random tiny one."""
    if args.base:
        return Path(args.base)
    if not args.tiny:
        raise SystemExit("--base PATH is required (a pipeline folder, e.g. dit/assets/microshapes) unless --tiny.")
    from dit.tiny import tiny_pipeline

    folder = Path(args.work) / "tiny_base"
    tiny_pipeline(num_layers=4).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base pipeline folder (tokenizer, text_encoder, vae, transformer, scheduler)")
    parser.add_argument("--steps", type=int, default=2000, help="adapter training steps")
    parser.add_argument("--work", default="runs/controlnet_quality", help="working folder (features, runs)")
    add_out_argument(parser, "controlnet_quality_<device>.json")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny settings (and a random base)")
    parser.add_argument("--num-blocks", type=int, help="default: every base block but the last, at most 13")
    parser.add_argument("--control", choices=["silhouette", "edges"], default="silhouette")
    parser.add_argument("--images", type=int, default=8000, help="training scenes")
    parser.add_argument("--n", type=int, default=60, help="evaluation scenes (relevance uses --relevance-n)")
    parser.add_argument("--relevance-n", type=int, default=40)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, help="default: the base's sampling_defaults.json, else 4.5")
    parser.add_argument("--keep", type=int, help="slim adapter blocks (default: half of the full adapter's)")
    parser.add_argument("--slim-steps", type=int, help="training steps of the fresh slim adapter (default: --steps)")
    parser.add_argument("overrides", nargs="*", help="trainer key=value overrides")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.images, args.n, args.relevance_n, args.sample_steps = 4, 32, 4, 2, 2
        args.overrides = ["data.batch_size=4", "optim.warmup_steps=1", "ema_decay=null", *args.overrides]

    from dit.controlnet_relevance import microshapes_metric, most_relevant, relevance
    from dit.microshapes.control import control_scenes, image_size
    from dit.pipelines import TextToImagePipeline
    from dit.pipelines.defaults import sampling_defaults

    out, base = Path(args.work), _base(args)
    if args.guidance is None:
        args.guidance = sampling_defaults(base)["guidance_scale"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_pipe = TextToImagePipeline.from_pretrained(base).to(device)
    base_pipe.set_progress_bar_config(disable=True)
    layers = base_pipe.transformer.config.num_layers
    num_blocks = args.num_blocks or min(13, layers - 1)
    write_features(base_pipe, out / "features", args.images, args.control)
    cls = type(base_pipe.transformer).__name__
    common = [f"model.cls={'PixArtTransformer' if 'Transformer2DModel' in cls else cls}",
              f"model.pretrained={base / 'transformer'}", f"data.path={out / 'features'}",
              f"validation.pipeline={base}", f"checkpoint_every={10**9}",
              *objective_overrides(base_pipe.scheduler), *args.overrides]  # fmt: skip
    full, full_s = train("full", out, [*common, f"controlnet.num_blocks={num_blocks}", f"max_steps={args.steps}"])

    scenes, width_height = control_scenes(args.n), image_size(base_pipe)
    run_eval = lambda adapter: evaluate(base_pipe, adapter, scenes, args.sample_steps, args.guidance, args.control)  # noqa: E731
    evaluations = {"base_no_control": run_eval(None), "full": run_eval(full)}
    zero = scale_zero(base_pipe, full, scenes[:8], args.sample_steps, args.guidance, *width_height)
    metric = microshapes_metric(base_pipe, args.relevance_n, args.sample_steps, args.guidance, args.control)
    report = relevance(full, metric, key="iou")
    keep = most_relevant(report, args.keep or max(1, math.ceil(num_blocks / 2)))
    evaluations["slim_selected"] = run_eval(full.select(keep))
    slim_steps = args.slim_steps or args.steps
    positions = "[" + ",".join(map(str, keep)) + "]"
    slim, slim_s = train("slim", out, [*common, "controlnet.num_blocks=null", f"controlnet.positions={positions}",
                                       f"max_steps={slim_steps}"])  # fmt: skip
    evaluations["slim_trained"] = run_eval(slim)

    full_params = full.num_parameters()
    result = {
        "benchmark": "controlnet_quality", "device": device, "machine": machine(device),
        "settings": {"base": str(base), "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps,
                     "slim_steps": slim_steps, "num_blocks": num_blocks, "keep": keep, "control": args.control,
                     "images": args.images, "n": args.n, "relevance_n": args.relevance_n,
                     "sample_steps": args.sample_steps, "guidance_scale": args.guidance, "overrides": common},
        "train_seconds": {"full": full_s, "slim": slim_s},
        "parameters": {"base_transformer": base_pipe.transformer.num_parameters(), "full": full_params,
                       "slim": slim.num_parameters(), "slim_fraction": slim.num_parameters() / full_params},
        "evaluations": evaluations, "scale_zero": zero, "relevance": report,
        "targets": {"iou >= 0.8": evaluations["full"]["iou"] >= TARGETS["iou"],
                    "color_accuracy >= 0.9": evaluations["full"]["color_accuracy"] >= TARGETS["color_accuracy"],
                    "scale_zero_exact": zero["exact"]},
    }  # fmt: skip
    print(json.dumps({k: result[k] for k in ("parameters", "targets")}, indent=2))
    tiny = args.tiny and args.out is None
    write_json(out / "controlnet_quality_tiny.json" if tiny else args.out, result, f"controlnet_quality_{device}.json")


if __name__ == "__main__":
    main()
