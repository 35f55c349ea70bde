"""FiT forward on a mixed-resolution batch: one padded forward (padding + key mask) against size buckets.

The same images (latent sizes of a FiT-style 256-token budget at several aspect ratios, ``--repeat`` each) go
through the model two ways:

- ``padded``: one forward over a zero-padded canvas with ``image_sizes``; every sample becomes a sequence as long
  as the longest one, and real tokens attend to real tokens only.
- ``bucketed``: one forward per distinct size, each a full, unpadded batch of that size.

Runs alternate and flip order; medians are compared. Reported: padded tokens / real tokens (and the same for
attention score entries, which grow with the square of the length), the padded/bucketed time ratio, images per
second, and the largest difference between the two arms' outputs (the same numbers up to float error). Writes
``bench/results/fit_padding_<device>.json``.

On CPU, glibc serves large buffers with ``mmap`` and unmaps them when freed, so each forward page-faults its
activations in afresh, and the padded arm's larger buffers pay more for it. ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
set high keep them on the heap for reuse (as a caching allocator would); the JSON records which was used.

    python bench/fit_padding.py                                   # CPU, small model
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python bench/fit_padding.py --out fit_padding_cpu_heap_malloc.json
    python bench/fit_padding.py --device cuda --dtype bf16        # FiTv2-XL-shaped blocks
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, alternate, machine, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: latent (h, w): 256, 256, 256, 240, 240, 224, 144, 64 tokens of 2x2 patches (FiT's 256-token budget)
SIZES = [(32, 32), (16, 64), (64, 16), (24, 40), (40, 24), (28, 32), (24, 24), (16, 16)]
#: --device -> model shape (FiTv2-XL blocks on a GPU; a small model on CPU)
SHAPES = {
    "cpu": dict(num_attention_heads=6, attention_head_dim=64, num_layers=4),
    "cuda": dict(num_attention_heads=16, attention_head_dim=72, num_layers=8),
}
TEXT_TOKENS, CAPTION_CHANNELS = 32, 256


def build(args) -> torch.nn.Module:
    from dit import FiTTransformer

    torch.manual_seed(0)
    shape = {**SHAPES[args.device], **({"num_layers": args.layers} if args.layers else {})}
    model = FiTTransformer(**shape, sample_size=32, caption_channels=CAPTION_CHANNELS)
    with torch.no_grad():  # non-zero last layers, so both arms compute (and compare) real outputs
        for block in model.transformer_blocks:
            block.adaln_lora.linear_2.weight.normal_(std=0.02)
        model.proj_out.weight.normal_(std=0.02)
    return model.to(args.device, DTYPES[args.dtype]).eval()


def make_batch(sizes: list[tuple[int, int]], args) -> dict:
    """Per-image latents, text and timesteps, plus the padded canvas of all of them."""
    gen, dtype = torch.Generator().manual_seed(1), DTYPES[args.dtype]
    latents = [torch.randn(4, h, w, generator=gen) for h, w in sizes]
    text = torch.randn(len(sizes), TEXT_TOKENS, CAPTION_CHANNELS, generator=gen)
    timestep = torch.rand(len(sizes), generator=gen) * 1000
    canvas = torch.zeros(len(sizes), 4, max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, latent in enumerate(latents):
        canvas[i, :, : latent.shape[1], : latent.shape[2]] = latent
    move = {"device": args.device, "dtype": dtype}
    return {"latents": [x.to(**move) for x in latents], "canvas": canvas.to(**move), "text": text.to(**move),
            "timestep": timestep.to(args.device), "sizes": torch.tensor(sizes)}  # fmt: skip


def padded(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["canvas"], batch["text"], batch["timestep"], image_sizes=batch["sizes"]).sample


def bucketed(model, batch, buckets: dict) -> list[torch.Tensor]:
    outputs = [None] * len(batch["latents"])
    with torch.no_grad():
        for index in buckets.values():
            latents = torch.stack([batch["latents"][i] for i in index])  # (b, C, h, w), one size
            out = model(latents, batch["text"][index], batch["timestep"][index]).sample
            for j, i in enumerate(index):
                outputs[i] = out[j]
    return outputs


def with_cpu_time(fn, record: list[float]):
    """``fn`` that also appends the process CPU seconds of each call to ``record`` (robust on a shared CPU)."""

    def run():
        start = time.process_time()
        fn()
        record.append(time.process_time() - start)

    return run


def token_stats(sizes: list[tuple[int, int]], patch: int) -> dict:
    tokens = [h * w // patch**2 for h, w in sizes]
    longest = max(tokens)
    return {
        "real_tokens": sum(tokens),
        "padded_tokens": longest * len(tokens),
        "token_overhead": round(longest * len(tokens) / sum(tokens), 3),
        "attention_entry_overhead": round(longest**2 * len(tokens) / sum(t * t for t in tokens), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="override the device's default depth")
    parser.add_argument("--repeat", type=int, default=2, help="images per size")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    add_out_argument(parser, "fit_padding_<device>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    sizes = [size for size in SIZES for _ in range(args.repeat)]
    batch = make_batch(sizes, args)
    buckets = defaultdict(list)
    for i, size in enumerate(sizes):
        buckets[size].append(i)

    load_before = os.getloadavg()
    reference = bucketed(model, batch, buckets)
    out = padded(model, batch)
    diff = max((out[i, :, :h, :w] - ref).abs().max().item() for i, ((h, w), ref) in enumerate(zip(sizes, reference)))
    arms = {"padded": lambda: padded(model, batch), "bucketed": lambda: bucketed(model, batch, buckets)}
    cpu = {name: [] for name in arms}
    timing = alternate({name: with_cpu_time(fn, cpu[name]) for name, fn in arms.items()}, args.device, args.runs)
    for name, result in timing.items():
        result["images_per_s"] = round(len(sizes) / result["median_s"], 2)
        result["process_cpu_median_s"] = round(statistics.median(cpu[name][1:]), 4)  # warm-up call dropped
    stats = token_stats(sizes, model.config.patch_size)
    time_ratio = round(timing["padded"]["median_s"] / timing["bucketed"]["median_s"], 3)
    cpu_ratio = round(timing["padded"]["process_cpu_median_s"] / timing["bucketed"]["process_cpu_median_s"], 3)
    payload = {
        "benchmark": "fit_padding",
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine(args.device),
        "config": {
            **{k: v for k, v in model.config.items() if not k.startswith("_")},
            "batch": len(sizes),
            "repeat": args.repeat,
            "runs": args.runs,
            "text_tokens": TEXT_TOKENS,
            "latent_sizes": SIZES,
            "buckets": len(buckets),
        },  # fmt: skip
        "tokens": stats,
        "padded": timing["padded"],
        "bucketed": timing["bucketed"],
        "time_ratio_padded_over_bucketed": time_ratio,
        "process_cpu_ratio_padded_over_bucketed": cpu_ratio,
        "max_abs_diff": diff,
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
        "load_average_1_5_15min": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
        "note": "The CPU is shared: a load average above the thread count means other processes competed with "
        "both arms (alternated, so both equally on average) and wall times are noisier; process CPU seconds "
        "(time.process_time) are not inflated by waiting for a core.",
    }
    path = write_json(args.out, payload, f"fit_padding_{args.device}.json")
    print(f"{len(sizes)} images in {len(buckets)} size buckets: padded tokens / real {stats['token_overhead']}x "
          f"(attention entries {stats['attention_entry_overhead']}x); padded {timing['padded']['median_s']:.3f}s, "
          f"bucketed {timing['bucketed']['median_s']:.3f}s, ratio {time_ratio} (CPU seconds {cpu_ratio}); "
          f"max|diff| {diff:.2e}; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
