"""``dit extract``: T5 features with masks and VAE latent mean/std, written as safetensors shards.

Training can then run from these features without loading T5 or the VAE, as PixArt trains. Images go to the
nearest PixArt aspect-ratio bin of the chosen resolution (resized to cover, centre-cropped), so each shard holds
one bucket. Broken samples are skipped and counted; more than ``max_broken_fraction`` of a batch is an error.
With several processes (``accelerate launch``) each process encodes every n-th sample and writes its own shards.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import NULL_CAPTION_FILE
from .sources import BrokenSample, open_source

PIXART_BIN_RESOLUTIONS = (256, 512, 1024, 2048)


def bucket_of(width: int, height: int, resolution: int, bucketing: bool = True) -> tuple[int, int]:
    """(height, width) of the PixArt aspect-ratio bin nearest to the image, or a square of ``resolution``."""
    if not bucketing:
        return resolution, resolution
    if resolution not in PIXART_BIN_RESOLUTIONS:
        raise ValueError(
            f"Aspect-ratio bins exist for {PIXART_BIN_RESOLUTIONS}; got {resolution} (or disable bucketing)."
        )
    from diffusers.image_processor import PixArtImageProcessor

    from dit.pipelines.resolution import ASPECT_RATIO_BINS

    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=ASPECT_RATIO_BINS[resolution])


def image_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize to cover ``height x width``, centre-crop, and scale to [-1, 1]: (3, H, W)."""
    scale = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class FeatureWriter:
    """Encodes batches with the VAE and T5 and writes shards of at most ``shard_size`` samples per bucket."""

    def __init__(self, out: Path, tokenizer, text_encoder, vae, max_length: int, shard_size: int, rank: int):
        self.out, self.tokenizer, self.text_encoder, self.vae = out, tokenizer, text_encoder, vae
        self.max_length, self.shard_size, self.rank = max_length, shard_size, rank
        self.pending: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
        self.shards = 0

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            [c.lower().strip() for c in captions], padding="max_length", max_length=self.max_length,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        device = self.text_encoder.device
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
        return embeds.float().cpu(), tokens.attention_mask.long()

    @torch.no_grad()
    def add(self, bucket: tuple[int, int], images: torch.Tensor, captions: list[str]) -> None:
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        factor = self.vae.config.scaling_factor
        embeds, mask = self.encode_text(captions)
        parts = self.pending.setdefault(
            bucket, {k: [] for k in ("latent_mean", "latent_std", "text_embeds", "text_mask")}
        )
        parts["latent_mean"].append(posterior.mean.float().cpu() * factor)
        parts["latent_std"].append(posterior.std.float().cpu() * factor)
        parts["text_embeds"].append(embeds)
        parts["text_mask"].append(mask)
        if sum(len(x) for x in parts["text_mask"]) >= self.shard_size:
            self.flush(bucket)

    def write_null_caption(self) -> None:
        """The empty caption's features, which caption dropout substitutes when the model has no null caption."""
        embeds, mask = self.encode_text([""])
        save_file({"text_embeds": embeds[0], "text_mask": mask[0]}, self.out / NULL_CAPTION_FILE)

    def flush(self, bucket: tuple[int, int] | None = None) -> None:
        for key in [bucket] if bucket is not None else list(self.pending):
            parts = self.pending.pop(key, None)
            if parts and parts["text_mask"]:
                tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
                name = f"{key[0]}x{key[1]}-p{self.rank}-{self.shards:05d}.safetensors"
                save_file(tensors, self.out / name)
                self.shards += 1


def load_encoders(pipeline: str | Path, device: torch.device) -> tuple:
    """(tokenizer, text_encoder, vae) from a pipeline folder, in eval mode on ``device``."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    root = Path(pipeline)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(root / "text_encoder").to(device).eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").to(device).eval()
    return tokenizer, text_encoder, vae


def extract(
    source: str,
    path: str,
    pipeline: str,
    out: str,
    resolution: int = 256,
    max_length: int = 120,
    batch_size: int = 8,
    shard_size: int = 1024,
    max_broken_fraction: float = 0.5,
    bucketing: bool = True,
) -> dict:
    """Extract features from ``path`` (a ``source``) with the tokenizer, T5 and VAE of a pipeline folder."""
    from accelerate import PartialState

    state = PartialState()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(
        out_dir, *load_encoders(pipeline, state.device), max_length, shard_size, state.process_index
    )
    report = {"records": 0, "written": 0, "broken": 0, "broken_samples": [], "buckets": {}}
    records = [r for i, r in enumerate(open_source(source, path)) if i % state.num_processes == state.process_index]
    waiting: dict[tuple[int, int], list[tuple[torch.Tensor, str]]] = {}
    for start in tqdm(range(0, len(records), batch_size), disable=not state.is_main_process, desc="extract"):
        chunk, broken = records[start : start + batch_size], []
        for record in chunk:
            try:
                image, caption = record.load()
            except BrokenSample as err:
                broken.append(str(err))
                continue
            bucket = bucket_of(image.width, image.height, resolution, bucketing)
            waiting.setdefault(bucket, []).append((image_tensor(image, *bucket), caption))
            report["buckets"][f"{bucket[0]}x{bucket[1]}"] = report["buckets"].get(f"{bucket[0]}x{bucket[1]}", 0) + 1
        report["records"] += len(chunk)
        report["broken"] += len(broken)
        report["broken_samples"] += broken[: max(0, 100 - len(report["broken_samples"]))]
        if len(broken) > max_broken_fraction * len(chunk):
            raise RuntimeError(
                f"{len(broken)} of {len(chunk)} samples in a batch are broken (limit {max_broken_fraction:.0%}): "
                + "; ".join(broken[:5])
            )
        for bucket, items in list(waiting.items()):
            if len(items) >= batch_size:
                _encode(writer, bucket, items)
                report["written"] += len(items)
                waiting[bucket] = []
    for bucket, items in waiting.items():
        if items:
            _encode(writer, bucket, items)
            report["written"] += len(items)
    writer.flush()
    if state.is_main_process:
        writer.write_null_caption()
    (out_dir / f"extract_report-p{state.process_index}.json").write_text(json.dumps(report, indent=2))
    return report


def _encode(writer: FeatureWriter, bucket, items) -> None:
    writer.add(bucket, torch.stack([image for image, _ in items]), [caption for _, caption in items])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit extract", description=__doc__)
    parser.add_argument("data", help="image folder, tar shards folder, or saved HF dataset")
    parser.add_argument("--source", default="imagefolder", choices=["imagefolder", "webdataset", "hf"])
    parser.add_argument("--pipeline", required=True, help="pipeline folder with tokenizer/, text_encoder/ and vae/")
    parser.add_argument("--out", required=True, help="output folder for the feature shards")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--max-broken-fraction", type=float, default=0.5)
    parser.add_argument("--no-bucketing", action="store_true", help="square centre crops instead of PixArt's bins")
    args = parser.parse_args(argv)
    report = extract(
        args.source, args.data, args.pipeline, args.out, args.resolution, args.max_length, args.batch_size,
        args.shard_size, args.max_broken_fraction, not args.no_bucketing,
    )  # fmt: skip
    print(f"{report['written']} samples written, {report['broken']} broken skipped, buckets {report['buckets']}")
    return 0
