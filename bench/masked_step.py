"""Training step time of one MicroDiT model at token-mask ratio 0, 0.5 and 0.75 (deferred masking).

Each ratio is our real training step (``Trainer._optimizer_step``: data plan, per-sample draws with the mask, x0 loss
on the kept patches, backward, clipping, AdamW) on the same model and weights; runs alternate and medians are
compared. Target (issue: micro-budget training): the 0.75 step takes <= 0.4x the unmasked step.

Presets: ``tiny`` (default): a small MicroDiT at 256 px (32x32 latents, patch 2 -> 256 tokens, width 256,
8 backbone blocks, a 1-block patch-mixer, 4 experts every other block); ``microshapes``: the MicroShapes ablation
model (64 tokens; the ``microshapes-microdit`` size preset of ``dit.models.presets``), whose ratios set the ablation's
equal-budget step counts.

    python bench/masked_step.py [--preset microshapes] [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit.models.presets import preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, alternate, machine, write_json  # noqa: E402

PRESETS = {
    "tiny": dict(
        model=dict(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=8,
                   cross_attention_dim=256, sample_size=32, patch_size=2, caption_channels=256,
                   use_additional_conditions=False, interpolation_scale=1, patch_mixer_layers=1, num_experts=4),
        batch=8, text_tokens=77, latent_channels=4,
    ),
    "microshapes": dict(
        model=preset_config("microshapes-microdit"), batch=32, text_tokens=24, latent_channels=8,
    ),
}  # fmt: skip
RATIOS = (0.0, 0.5, 0.75)
TARGET = 0.4


def write_features(folder: Path, preset: dict) -> None:
    """Random shards of the preset's latent and caption shapes (step time does not depend on the values)."""
    gen = torch.Generator().manual_seed(0)
    n, side, width = preset["batch"] * 4, preset["model"]["sample_size"], preset["model"]["caption_channels"]
    mask = torch.zeros(n, preset["text_tokens"], dtype=torch.long)
    for i in range(n):
        mask[i, : 8 + i % (preset["text_tokens"] - 8)] = 1
    save_file({"latent_mean": torch.randn(n, preset["latent_channels"], side, side, generator=gen),
               "text_embeds": torch.randn(n, preset["text_tokens"], width, generator=gen), "text_mask": mask},
              folder / "shard-000.safetensors")  # fmt: skip


def trainer_at(ratio: float, folder: Path, preset: dict, dtype: str, steps: int):
    """Our trainer for a MicroDiT with the preset's config, masking ``ratio`` of the tokens at every step."""
    from dit.train import Trainer, load_config

    overrides = [f"data.path={folder}", f"data.batch_size={preset['batch']}", "data.caption_dropout=0",
                 "ema_decay=null", "model.cls=MicroDiTTransformer", f"output_dir={folder / f'run{ratio}'}",
                 "objective.name=x0", "objective.x0.weighting=uniform", "report_to=none", "pipeline=false",
                 f"masking.ratio={ratio}",
                 f"max_steps={steps}", f"mixed_precision={'no' if dtype == 'fp32' else dtype}"]  # fmt: skip
    config = load_config(None, overrides)
    config.model.kwargs = dict(preset["model"])
    return Trainer(config)


def step_times(preset: dict, device: str, dtype: str, runs: int, ratios=RATIOS) -> dict[str, dict]:
    """Median training-step seconds at each mask ratio, alternating; the same initial weights everywhere."""
    with tempfile.TemporaryDirectory() as tmp:
        write_features(Path(tmp), preset)
        steps = 2 * runs + 10
        trainers = {ratio: trainer_at(ratio, Path(tmp), preset, dtype, steps) for ratio in ratios}
        fns = {}
        for ratio, trainer in trainers.items():
            batches = trainer._batches(0, steps)
            fns[f"ratio_{ratio}"] = lambda t=trainer, b=batches: (
                t._optimizer_step(b, 1),
                setattr(t, "step", t.step + 1),
            )
        return alternate(fns, device, runs, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=7)
    add_out_argument(parser, "masked_step_<preset>_<device>.json")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    timing = step_times(preset, args.device, args.dtype, args.runs)
    unmasked = timing["ratio_0.0"]["median_s"]
    for entry in timing.values():
        entry["relative_to_unmasked"] = round(entry["median_s"] / unmasked, 3)
    relative = timing["ratio_0.75"]["relative_to_unmasked"]
    side = preset["model"]["sample_size"] // preset["model"]["patch_size"]
    payload = {
        "benchmark": "masked_step",
        "device": args.device,
        "machine": machine(args.device),
        "config": {
            "preset": args.preset,
            **preset,
            "tokens": side * side,
            "dtype": args.dtype,
            "runs": args.runs,
            "masking": "deferred (after the patch-mixer)",
        },  # fmt: skip
        "step_time": timing,
        "target": f"ratio 0.75 step <= {TARGET}x the unmasked step",
        "met": relative <= TARGET,
    }
    path = write_json(args.out, payload, f"masked_step_{args.preset}_{args.device}.json")
    summary = ", ".join(f"{name} {v['median_s']:.3f}s ({v['relative_to_unmasked']}x)" for name, v in timing.items())
    print(f"{summary}; wrote {path}")


if __name__ == "__main__":
    main()
