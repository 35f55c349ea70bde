"""Attention cost against token count: softmax, KV-compressed (ratio 2) and LiT linear attention.

    python bench/attention_scaling.py [--device cuda] [--tokens 256 1024 4096 16384]

For each square token grid, times one self-attention layer (projections included) and one full PixArt-XL block
(self-attention, 120-token cross-attention, MLP) per variant, alternating and taking medians, and records peak memory.
Writes ``bench/results/attention_scaling_<device>.json`` and a PNG plot of time against tokens (``pip install
".[bench]"`` for matplotlib). Targets at 4096 tokens (1024 px): linear >= 3x faster than softmax, KV ratio 2 >= 2x
faster than softmax; linear time grows at most 4.5x from 1024 to 4096 tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # glibc's cached heap would hide CPU peaks from VmHWM
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, alternate, machine, peak_bytes, write_json  # noqa: E402

from dit.nn.attention import DiTAttention  # noqa: E402
from dit.nn.blocks import PixArtBlock  # noqa: E402
from dit.nn.context import BlockContext  # noqa: E402

WIDTH, HEADS, TEXT = 1152, 16, 120  # PixArt-XL
VARIANTS = {
    "softmax": {},
    "kv_compress_2": {"kv_compress_ratio": 2, "kv_compress_mode": "conv"},
    "linear": {"kernel": "linear", "heads": 4, "conv_kernel_size": 5},  # LiT-XL: 4 heads, 5x5 depthwise conv
}
TARGETS = {"linear_speedup_at_4096": 3.0, "kv2_speedup_at_4096": 2.0, "linear_growth_1024_to_4096": 4.5}


def _modules(options: dict, device: str, dtype: torch.dtype):
    opts = dict(options)
    heads = opts.pop("heads", HEADS)
    layer = DiTAttention(WIDTH, heads, WIDTH // heads, **opts)
    block = PixArtBlock(WIDTH, HEADS, WIDTH // HEADS, cross_attention_dim=WIDTH, self_attention_options=options)
    return layer.to(device, dtype).eval(), block.to(device, dtype).eval()


@torch.inference_mode()
def measure(tokens: int, device: str, dtype: torch.dtype, runs: int) -> dict:
    side = int(math.isqrt(tokens))
    grid = (side, side)
    x = torch.randn(1, side * side, WIDTH, device=device, dtype=dtype)
    text = torch.randn(1, TEXT, WIDTH, device=device, dtype=dtype)
    t6 = torch.randn(1, 6 * WIDTH, device=device, dtype=dtype)
    context = BlockContext(encoder_hidden_states=text, shared_modulation=t6, grid=grid)
    layers, blocks = {}, {}
    for name, options in VARIANTS.items():
        layer, block = _modules(options, device, dtype)
        layers[name] = lambda layer=layer: layer(x, grid=grid)
        blocks[name] = lambda block=block: block(x.clone(), context)
    result = {"tokens": side * side, "grid": list(grid)}
    for kind, fns in (("layer", layers), ("block", blocks)):
        times = alternate(fns, device, runs)
        result[kind] = {name: {**times[name], "peak_memory_bytes": peak_bytes(fns[name], device)} for name in fns}
    return result


def _plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("layer", "block")):
        for name in VARIANTS:
            ax.loglog([r["tokens"] for r in rows], [r[kind][name]["median_s"] for r in rows], "o-", label=name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("seconds")
        ax.set_title(f"one {kind} (PixArt-XL width)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 on CPU, bf16 on CUDA by default")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    tokens = args.tokens or ([256, 1024, 4096, 16384, 65536] if args.device == "cuda" else [256, 1024, 4096, 16384])
    rows = []
    for n in tokens:
        rows.append(measure(n, args.device, dtype, args.runs))
        print(n, {k: round(v["median_s"], 4) for k, v in rows[-1]["layer"].items()}, flush=True)
    at = {r["tokens"]: r["layer"] for r in rows}
    figures, met = {}, {}
    if 4096 in at:
        figures["linear_speedup_at_4096"] = at[4096]["softmax"]["median_s"] / at[4096]["linear"]["median_s"]
        figures["kv2_speedup_at_4096"] = at[4096]["softmax"]["median_s"] / at[4096]["kv_compress_2"]["median_s"]
        met["linear_speedup_at_4096"] = figures["linear_speedup_at_4096"] >= TARGETS["linear_speedup_at_4096"]
        met["kv2_speedup_at_4096"] = figures["kv2_speedup_at_4096"] >= TARGETS["kv2_speedup_at_4096"]
    if 1024 in at and 4096 in at:
        growth = at[4096]["linear"]["median_s"] / at[1024]["linear"]["median_s"]
        figures["linear_growth_1024_to_4096"] = growth
        met["linear_growth_1024_to_4096"] = growth <= TARGETS["linear_growth_1024_to_4096"]
    stem = f"attention_scaling_{args.device}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot = _plot(rows, RESULTS / f"{stem}.png")
    payload = {
        "benchmark": "attention_scaling",
        "device": args.device,
        "dtype": dtype_name,
        "machine": machine(args.device),
        "config": {
            "width": WIDTH,
            "heads": HEADS,
            "text_tokens": TEXT,
            "batch": 1,
            "variants": VARIANTS,
            "runs": args.runs,
            "figures_from": "one attention layer (projections included)",
        },  # fmt: skip
        "rows": rows,
        "figures": figures,
        "targets": {k: (f">= {v}" if "speedup" in k else f"<= {v}") for k, v in TARGETS.items()},
        "met": met,
        "all_met": bool(met) and all(met.values()),
        "plot": plot,
    }
    path = write_json(f"{stem}.json", payload)
    print({k: round(v, 2) for k, v in figures.items()}, met, f"wrote {path}")


if __name__ == "__main__":
    main()
