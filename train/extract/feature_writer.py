"""Feature shards: batches encoded by the VAE and T5 (and the control latents of a ControlNet run), written as
safetensors shards of one bucket each."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dit.pipelines.controlnet import encode_control

from ..data.dataset import NULL_CAPTION_FILE
from .progress import save_atomically, to_ranges

CONTROL_KEY = "control_latent"  # the feature-shard key of the control latents (N, C, h, w)


class FeatureWriter:
    """Encodes batches with the VAE and T5 and writes shards of one bucket each.

    A bucket's shard is written once it holds ``shard_size`` samples or more (a batch is never split), the rest at
    :meth:`flush`, under a temporary name and then renamed. When :meth:`add` gets the samples' record indices
    (ascending, as the shard's rows), the shard's metadata holds them (``record_indices``, :func:`to_ranges`) and
    ``on_shard(name, indices)`` is called after the rename.
    """

    def __init__(self, out: Path, tokenizer, text_encoder, vae, max_length: int, shard_size: int, rank: int):
        self.out, self.tokenizer, self.text_encoder, self.vae = out, tokenizer, text_encoder, vae
        self.max_length, self.shard_size, self.rank = max_length, shard_size, rank
        self.pending: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
        self.indices: dict[tuple[int, int], list[int]] = {}
        self.shards = 0  # the number of the next shard file
        self.on_shard = None

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            [c.lower().strip() for c in captions], padding="max_length", max_length=self.max_length,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        device = self.text_encoder.device
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
        return embeds.float().cpu(), tokens.attention_mask.long()

    def pending_count(self, bucket: tuple[int, int]) -> int:
        """Samples of ``bucket`` encoded but not yet in a shard."""
        return sum(len(x) for x in self.pending.get(bucket, {}).get("text_mask", []))

    @torch.no_grad()
    def add(self, bucket: tuple[int, int], images: torch.Tensor, captions: list[str], indices=None) -> None:
        """Encode images (B, 3, H, W) in [-1, 1] and their captions into ``bucket``'s next shard."""
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
        if indices is not None:
            self.indices.setdefault(bucket, []).extend(indices)
        if self.pending_count(bucket) >= self.shard_size:
            self.flush(bucket)

    def write_null_caption(self) -> None:
        """The empty caption's features, which caption dropout substitutes when the model has no null caption."""
        embeds, mask = self.encode_text([""])
        save_atomically({"text_embeds": embeds[0], "text_mask": mask[0]}, self.out / NULL_CAPTION_FILE)

    def flush(self, bucket: tuple[int, int] | None = None) -> None:
        """Write ``bucket``'s pending samples (all buckets' without one) as shards."""
        for key in [bucket] if bucket is not None else list(self.pending):
            parts, indices = self.pending.pop(key, None), self.indices.pop(key, None)
            if parts and parts["text_mask"]:
                tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
                name = f"{key[0]}x{key[1]}-p{self.rank}-{self.shards:05d}.safetensors"
                metadata = {"record_indices": json.dumps(to_ranges(indices))} if indices else None
                save_atomically(tensors, self.out / name, metadata)
                self.shards += 1
                if indices and self.on_shard is not None:
                    self.on_shard(name, indices)


class ControlFeatureWriter(FeatureWriter):
    """:class:`~dit.train.extract.FeatureWriter` that also writes each sample's control latent (``control_latent``).

    ``add(bucket, images, captions, controls, indices=None)`` takes the control images (B, 3, H, W) in [-1, 1]
    beside the images (and the samples' record indices, as :meth:`FeatureWriter.add`).
    """

    def add(
        self,
        bucket: tuple[int, int],
        images: torch.Tensor,
        captions: list[str],
        controls: torch.Tensor,
        indices: list[int] | None = None,
    ) -> None:
        if controls.shape[0] != images.shape[0] or controls.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"controls {tuple(controls.shape)} must match images {tuple(images.shape)} in batch and size."
            )
        keys = ("latent_mean", "latent_std", "text_embeds", "text_mask", CONTROL_KEY)
        parts = self.pending.setdefault(bucket, {k: [] for k in keys})
        with torch.no_grad():
            parts[CONTROL_KEY].append(encode_control(self.vae, controls).float().cpu())
        super().add(bucket, images, captions, indices)  # appends the rest and writes the shard when it is full
