"""Our PixArt forward against diffusers' PixArtTransformer2DModel with the same weights.

PixArt-XL-shaped blocks (16 heads x 72, 4096-wide T5 captions; ``--preset`` names another PixArt size of
``dit.models.presets``) with fewer layers, batch 2, 512px and 1024px latents, fp32 and bf16 (weights cast, not
autocast), for an α config (micro-conditions, 120-token text with 40 real) and a Σ config (300-token padding, a
20-token prompt). Each model gets the text as its pipeline passes it: diffusers the full padding, ours the padding
trimmed to a 64-multiple on the host (``trim_text_padding``, once per pipeline call; exact). Runs alternate and flip
order; medians are compared. Peak memory is the forward's peak resident memory above its start in a fresh process
on CPU (``max_memory_allocated`` on CUDA). Writes the JSON to ``--out`` (``bench/results/backbone_forward_<device>.json``
records it; default ``runs/bench/``).

    python bench/backbone_forward.py                       # CPU, everything
    python bench/backbone_forward.py --device cuda --dtypes bf16 --sizes 1024
    python bench/backbone_forward.py --preset tiny-pixart --sizes 64 --dtypes fp32   # seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dit.models.presets import PRESETS, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_out_argument,
    alternate,
    machine,
    matmul_peak,
    reset_peak_rss,
    rss_bytes,
    write_json,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = {
    "alpha": {"config": {"use_additional_conditions": True}, "text_tokens": 120, "real_tokens": 40},
    "sigma": {"config": {"use_additional_conditions": False}, "text_tokens": 300, "real_tokens": 20},
}
#: The presets this benchmark can time: ours against diffusers' class, so PixArt ones only.
PIXART_PRESETS = [name for name, preset in PRESETS.items() if preset.cls == "PixArtTransformer"]
#: PixArt-XL-2 at 1024 px (the XL blocks; ``--layers`` of its 28 are timed).
DEFAULT_PRESET = "PixArt-XL-2-1024"


def base_config(preset: str = DEFAULT_PRESET) -> dict:
    """The preset's config without its micro-conditions (each variant sets its own)."""
    config = preset_config(preset)
    config.pop("use_additional_conditions", None)
    return config


def build(variant: str, layers: int, dtype: torch.dtype, device: str, preset: str = DEFAULT_PRESET):
    """diffusers' model with random weights and ours with the same weights, both cast to ``dtype``."""
    from diffusers import PixArtTransformer2DModel

    from dit import PixArtTransformer

    config = {**base_config(preset), **VARIANTS[variant]["config"], "num_layers": layers}
    torch.manual_seed(0)
    reference = PixArtTransformer2DModel(**config).eval()
    ours = PixArtTransformer(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.to(device, dtype), ours.to(device, dtype), dict(ours.config)  # every field, defaults included


def inputs(
    variant: str,
    size: int,
    batch: int,
    dtype: torch.dtype,
    device: str,
    trimmed: bool = False,
    width: int = 4096,
    channels: int = 4,
) -> dict:
    """One forward's inputs, captions ``width`` wide, latents of ``channels``; ``trimmed``: the text as our pipeline
    passes it (padding cut to a 64-multiple)."""
    from dit.nn.text_padding import trim_text_padding

    spec = VARIANTS[variant]
    gen = torch.Generator().manual_seed(1)
    latent = size // 8
    mask = torch.zeros(batch, spec["text_tokens"], dtype=torch.long)
    mask[:, : spec["real_tokens"]] = 1
    kwargs = {
        "hidden_states": torch.randn(batch, channels, latent, latent, generator=gen).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, spec["text_tokens"], width, generator=gen).to(device, dtype),
        "encoder_attention_mask": mask.to(device),
        "timestep": torch.full((batch,), 500, device=device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    if spec["config"]["use_additional_conditions"]:
        kwargs["added_cond_kwargs"] = {
            "resolution": torch.tensor([[size, size]] * batch, dtype=dtype, device=device),
            "aspect_ratio": torch.ones(batch, 1, dtype=dtype, device=device),
        }
    if trimmed:
        text, mask = trim_text_padding(kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"])
        kwargs.update(encoder_hidden_states=text, encoder_attention_mask=mask)
    return kwargs


def forward_flops(config: dict, batch: int, size: int, text_tokens: int) -> float:
    """Multiply-add FLOPs of one forward as diffusers executes it (padded text included)."""
    d, layers = config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    n = (size // 8 // config["patch_size"]) ** 2
    t, text = batch * n, batch * text_tokens
    per_layer = (
        2 * t * d * d * 4  # self-attention projections
        + 4 * batch * n * n * d  # self-attention scores and values
        + 2 * t * d * d * 2
        + 2 * text * d * d * 2  # cross-attention q/out and k/v
        + 4 * batch * n * text_tokens * d  # cross-attention scores and values
        + 2 * t * d * 4 * d * 2  # MLP
    )
    caption = 2 * text * (config["caption_channels"] * d + d * d)
    return layers * per_layer + caption


def run(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def model_inputs(variant: str, size: int, batch: int, dtype: torch.dtype, device: str, config: dict, trimmed: bool):
    """:func:`inputs` shaped for ``config`` (its latent channels and caption width)."""
    shape = {"width": config["caption_channels"], "channels": config["in_channels"]}
    return inputs(variant, size, batch, dtype, device, trimmed=trimmed, **shape)


def memory_probe(which: str, variant: str, size: int, dtype: str, args) -> int:
    """Peak memory of one forward above its start (fresh process on CPU)."""
    device = args.device
    reference, ours, config = build(variant, args.layers, DTYPES[dtype], device, args.preset)
    model = reference if which == "diffusers" else ours
    del reference, ours
    kwargs = model_inputs(variant, size, args.batch, DTYPES[dtype], device, config, trimmed=which == "ours")
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run(model, kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    reset_peak_rss()
    start = rss_bytes("VmRSS")
    run(model, kwargs)
    return rss_bytes("VmHWM") - start


def measure_memory(which, variant, size, dtype, args) -> int:
    if args.device == "cuda":
        return memory_probe(which, variant, size, dtype, args)
    cmd = [sys.executable, __file__, "--memory-probe", which, variant, str(size), dtype,
           "--layers", str(args.layers), "--batch", str(args.batch), "--preset", args.preset]  # fmt: skip
    # Every allocation of 64 KiB or more gets its own mapping, returned on free: resident memory then follows
    # live tensors instead of whatever glibc kept cached from building the model.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def bench_case(variant: str, size: int, dtype: str, args, peaks: dict) -> dict:
    reference, ours, config = build(variant, args.layers, DTYPES[dtype], args.device, args.preset)
    kwargs = model_inputs(variant, size, args.batch, DTYPES[dtype], args.device, config, trimmed=False)
    ours_kwargs = model_inputs(variant, size, args.batch, DTYPES[dtype], args.device, config, trimmed=True)
    diff = (run(ours, ours_kwargs).float() - run(reference, kwargs).float()).abs().max().item()
    calls = {"diffusers": functools.partial(run, reference, kwargs), "ours": functools.partial(run, ours, ours_kwargs)}
    timing = alternate(calls, args.device, args.runs)
    del calls, reference, ours
    gc.collect()
    flops = forward_flops(config, args.batch, size, VARIANTS[variant]["text_tokens"])
    case = {"variant": variant, "size_px": size, "dtype": dtype, "text_tokens": VARIANTS[variant]["text_tokens"],
            "ours_text_tokens": ours_kwargs["encoder_hidden_states"].shape[1],
            "real_text_tokens": VARIANTS[variant]["real_tokens"], "forward_gflop": round(flops / 1e9, 2),
            "max_abs_diff": diff}  # fmt: skip
    for name in ("diffusers", "ours"):
        result = timing[name]
        result["gflops"] = round(flops / result["median_s"] / 1e9, 1)
        result["share_of_matmul_peak"] = round(result["gflops"] / peaks[dtype], 3)
        result["peak_memory_bytes"] = measure_memory(name, variant, size, dtype, args)
        case[name] = result
    case["time_ratio"] = round(case["ours"]["median_s"] / case["diffusers"]["median_s"], 3)
    case["memory_ratio"] = round(case["ours"]["peak_memory_bytes"] / case["diffusers"]["peak_memory_bytes"], 3)
    limit = (0.95 if variant == "sigma" else 1.0) if args.device == "cpu" else 1 / 1.3
    case["time_target"] = f"<= {limit:.3f}x diffusers"
    case["met"] = case["time_ratio"] <= limit and case["memory_ratio"] <= 1.0
    print(f"{variant:5s} {size:4d}px {dtype}: diffusers {case['diffusers']['median_s']:.3f}s, "
          f"ours {case['ours']['median_s']:.3f}s (x{case['time_ratio']}), memory x{case['memory_ratio']}, "
          f"max|diff| {diff:.2e}", flush=True)  # fmt: skip
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=PIXART_PRESETS, help="the model size (its width)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--variants", default="alpha,sigma")
    parser.add_argument("--layers", type=int, default=2, help="how many of the preset's layers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    add_out_argument(parser, "backbone_forward_<device>.json")
    parser.add_argument("--memory-probe", nargs=4, metavar=("MODEL", "VARIANT", "SIZE", "DTYPE"))
    args = parser.parse_args()
    if args.memory_probe:
        which, variant, size, dtype = args.memory_probe
        peak = memory_probe(which, variant, int(size), dtype, args)
        print(json.dumps({"peak_bytes": peak}))
        return

    dtypes = args.dtypes.split(",")
    peaks = {dtype: round(matmul_peak(DTYPES[dtype], args.device), 1) for dtype in dtypes}
    print("matmul peak GFLOP/s:", peaks, flush=True)
    cases = [
        bench_case(variant, int(size), dtype, args, peaks)
        for dtype in dtypes
        for size in args.sizes.split(",")
        for variant in args.variants.split(",")
    ]
    payload = {
        "benchmark": "backbone_forward",
        "device": args.device,
        "machine": machine(args.device),
        "preset": args.preset,
        "config": {
            **base_config(args.preset),
            "num_layers": args.layers,
            "batch": args.batch,
            "runs": args.runs,
            "variants": VARIANTS,
        },
        "matmul_peak_gflops": peaks,
        "flop_basis": "multiply-adds of the forward as diffusers executes it, padded text included",
        "targets": "CPU: ours <= 1.0x diffusers' median time in every case, <= 0.95x for the Σ 300-token cases, "
        "peak memory <= diffusers'. CUDA: >= 1.3x diffusers' speed.",
        "cases": cases,
        "all_met": all(c["met"] for c in cases),
    }
    print(f"all targets met: {payload['all_met']}")
    write_json(args.out, payload, f"backbone_forward_{args.device}.json")


if __name__ == "__main__":
    main()
