"""Mixed-size MicroShapes features for flexible-resolution training (FiT): scenes at random sizes and aspect ratios.

    python -m dit.microshapes.mixed_sizes --out runs/fit/features --images 20000 [--encoders dit/assets/microshapes]

Like :func:`~dit.microshapes.recipe.make_dataset` (30% two-object scenes, paraphrased captions, no held-out pair), but
each scene is rendered at its own height and width, drawn from ``SIDES`` (32 to 64 px in steps of 8: 25 sizes,
aspect ratios from 1:2 to 2:1). The images are encoded with the MicroShapes encoders (the 2x-down, 8-channel
autoencoder, the trained T5 and its tokenizer, captions padded to 24 tokens) into feature shards, one bucket per
size, which ``dit.train`` reads with ``data.mixed_sizes: true``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..train.extract.extraction import load_encoders
from ..train.extract.feature_writer import FeatureWriter
from ..train.run.validation import record_extraction
from .recipe import to_tensor
from .world import paraphrase, random_scene, render

#: image sides in pixels (latent sides = half of them with the 2x autoencoder)
SIDES = (32, 40, 48, 56, 64)
MAX_LENGTH = 24  # caption tokens, as the shipped model
REPORT = "mixed_sizes_report.json"


def shipped_encoders() -> Path:
    """The shipped MicroShapes pipeline folder, whose tokenizer, T5 and autoencoder encode the features."""
    return Path(__file__).resolve().parents[1] / "assets" / "microshapes"


def make_mixed_dataset(
    n: int, seed: int = 0, sides: tuple[int, ...] = SIDES
) -> dict[tuple[int, int], tuple[torch.Tensor, list[str]]]:
    """``n`` training scenes, each at a random (height, width) from ``sides``, grouped by size: (height, width) ->
    (images (k, 3, height, width) in [-1, 1], captions)."""
    rng = random.Random(seed)
    groups: dict[tuple[int, int], tuple[list[np.ndarray], list[str]]] = {}
    for _ in range(n):
        scene = random_scene(rng, two_objects=0.3, held_out=False)
        size = (rng.choice(sides), rng.choice(sides))
        images, captions = groups.setdefault(size, ([], []))
        images.append(render(scene, width=size[1], height=size[0]))  # (H, W, 3)
        captions.append(paraphrase(scene, rng))
    return {size: (to_tensor(np.stack(images)), captions) for size, (images, captions) in sorted(groups.items())}


def write_mixed_features(
    out: str | Path,
    groups: dict[tuple[int, int], tuple[torch.Tensor, list[str]]],
    tokenizer,
    text_encoder,
    vae,
    max_length: int = MAX_LENGTH,
    batch_size: int = 256,
) -> dict[str, int]:
    """Encode every size group into shards under ``out`` (one bucket per size) plus the empty caption's features;
    returns the number of samples per ``"HxW"`` pixel size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(out, tokenizer, text_encoder, vae, max_length, shard_size=4096, rank=0)
    counts = {}
    for size, (images, captions) in groups.items():
        for start in range(0, len(images), batch_size):
            writer.add(size, images[start : start + batch_size], captions[start : start + batch_size])
        counts[f"{size[0]}x{size[1]}"] = len(images)
    writer.flush()
    writer.write_null_caption()
    return counts


def build(
    out: str | Path, n: int, seed: int = 0, encoders: str | Path | None = None, sides: tuple[int, ...] = SIDES
) -> dict:
    """Render, encode and write ``n`` mixed-size scenes to ``out``, unless ``out`` already holds the same (its
    ``mixed_sizes_report.json`` names the same ``n``, seed, sides and encoders); returns that report."""
    out, encoders = Path(out), Path(encoders) if encoders else shipped_encoders()
    wanted = {"images": n, "seed": seed, "sides": list(sides), "encoders": str(encoders)}
    report_file = out / REPORT
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        if {k: report.get(k) for k in wanted} == wanted:
            record_extraction(out, encoders)  # features built before the record existed get it too
            return report
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    tokenizer, text_encoder, vae = load_encoders(encoders, torch.device("cpu"))
    counts = write_mixed_features(out, make_mixed_dataset(n, seed, sides), tokenizer, text_encoder, vae)
    record_extraction(out, encoders)  # a run on these features links the encoders into its pipeline folder
    report = {**wanted, "samples_per_size": counts}
    report_file.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fit/features")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--encoders", default=None, help="folder with tokenizer/, text_encoder/, vae/ (default: shipped)"
    )
    args = parser.parse_args()
    report = build(args.out, args.images, args.seed, args.encoders)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
