"""Training data: pre-extracted feature shards, read sample by sample and collated into batches.

A shard is a safetensors file with ``latent_mean`` (N, C, h, w), optional ``latent_std`` (N, C, h, w),
``text_embeds`` (N, L, C_text) and ``text_mask`` (N, L): the layout PixArt trains from (VAE mean/std re-sampled
every time, T5 features with their masks). Each shard holds one latent size, so a batch holds one bucket; a bucket
too small for a batch is read at the size of the nearest one that fills it (:mod:`dit.train.data.buckets`: resized to
cover, centre-cropped), so that every sample trains. With ``data.mixed_sizes`` (flexible-resolution backbones, FiT:
:mod:`dit.train.features.mixed_sizes`) batches draw across buckets instead, and :func:`collate` zero-pads their
latents to one canvas and reports each sample's ``image_sizes``.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from dit.nn.text_padding import trimmed_text_length

from .buckets import cover_crop_latent

REQUIRED_KEYS = ("latent_mean", "text_embeds", "text_mask")
OPTIONAL_KEYS = ("control_latent",)  # passed through when a shard has them (ControlNet's control latents)
NULL_CAPTION_FILE = "null_caption.safetensors"  # the empty caption's features, beside the shards


class ShardError(ValueError):
    """A feature shard that cannot be read (truncated or corrupt); the message names the file and the cause."""


def _open_shard(file: Path):
    """``safe_open`` of a shard, with errors that name it."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as error:
        raise ShardError(
            f"Feature shard {file}: {error} (a truncated or corrupt file); extract it again or move it away."
        ) from error


def feature_files(path: str | Path) -> list[Path]:
    """The feature shards in ``path`` (``*.safetensors`` but the null caption); none is a FileNotFoundError."""
    files = sorted(p for p in Path(path).glob("*.safetensors") if p.name != NULL_CAPTION_FILE)
    if not files:
        raise FileNotFoundError(f"No feature shards (*.safetensors) in {str(path)!r}; run `dit extract` first.")
    return files


class FeatureDataset(Dataset):
    """Samples from a folder of feature shards (``*.safetensors``), loaded lazily shard by shard."""

    def __init__(self, path: str | Path):
        self.files = feature_files(path)
        self.lengths, self.sizes = [], []
        for file in self.files:
            with _open_shard(file) as f:
                missing = [k for k in REQUIRED_KEYS if k not in f.keys()]
                if missing:
                    raise KeyError(f"Feature shard {file} lacks {', '.join(missing)}.")
                shape = f.get_slice("latent_mean").get_shape()
            self.lengths.append(shape[0])
            self.sizes.append(tuple(shape[1:]))
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self.targets: dict[tuple[int, int], tuple[int, int]] = {}  # latent (h, w) -> the size it is read at

    def size_groups(self) -> dict[tuple[int, int], list[int]]:
        """Sample indices by latent (height, width), in shard order (what :func:`~dit.train.data.buckets.merge_buckets`
        takes)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(tuple(size[-2:]), []).extend(range(self.offsets[i], self.offsets[i + 1]))
        return groups

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def max_size(self) -> tuple[int, int]:
        """The largest latent height and the largest latent width over all shards."""
        return max(size[-2] for size in self.sizes), max(size[-1] for size in self.sizes)

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._cache:
            with _open_shard(self.files[index]) as f:
                try:
                    self._cache[index] = {k: f.get_tensor(k) for k in f.keys()}
                except SafetensorError as error:
                    raise ShardError(f"Feature shard {self.files[index]}: {error} (a corrupt file).") from error
        return self._cache[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard = bisect.bisect_right(self.offsets, index) - 1
        tensors, row = self._shard(shard), index - self.offsets[shard]
        sample = {k: tensors[k][row] for k in REQUIRED_KEYS}
        sample["latent_std"] = tensors["latent_std"][row] if "latent_std" in tensors else None
        sample.update({k: tensors[k][row] for k in OPTIONAL_KEYS if k in tensors})
        target = self.targets.get(tuple(self.sizes[shard][-2:]))
        if target is not None:  # a bucket merged into a larger one (train/data/buckets.py)
            for key in ("latent_mean", "latent_std", *OPTIONAL_KEYS):
                if sample.get(key) is not None:
                    sample[key] = cover_crop_latent(sample[key], target)
        sample["index"] = index
        return sample


def collate(samples: list[dict], pad: bool = False, min_text_length: int = 0) -> dict[str, torch.Tensor]:
    """Stack samples into a batch. ``pad``: samples may differ in latent size; latents (and ``latent_std`` and the
    optional latents) are zero-padded at the bottom/right to the largest height and width in the batch, and
    ``image_sizes`` (B, 2) holds each sample's latent (height, width).

    The text is cut to the batch's :func:`~dit.nn.text_padding.trimmed_text_length` (a multiple of 64, exact), never
    below ``min_text_length`` (what a caption substituted later keeps), before it is stacked: the backbone then sees
    a few fixed key lengths, and no padding is copied."""
    stack = _padded_stack if pad else torch.stack
    batch = {"latent_mean": stack([s["latent_mean"] for s in samples])}
    masks = torch.stack([s["text_mask"] for s in samples])  # (B, L)
    length = min(masks.shape[1], max(trimmed_text_length(masks), min_text_length))
    batch["text_mask"] = masks[:, :length]
    batch["text_embeds"] = torch.stack([s["text_embeds"][:length] for s in samples])  # (B, L', C)
    stds = [s["latent_std"] for s in samples]
    batch["latent_std"] = None if any(s is None for s in stds) else stack(stds)
    for key in OPTIONAL_KEYS:
        if any(key in s for s in samples):
            if not all(key in s for s in samples):
                raise KeyError(f"Some feature shards carry {key!r} and some do not; a run needs it in all or none.")
            batch[key] = stack([s[key] for s in samples])
    batch["index"] = torch.tensor([s["index"] for s in samples])
    if pad:
        batch["image_sizes"] = torch.tensor([list(s["latent_mean"].shape[-2:]) for s in samples])  # (B, 2)
    return batch


def _padded_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(C, h_i, w_i) tensors -> (B, C, max h, max w), each zero-padded at the bottom/right."""
    height, width = max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)
    out = tensors[0].new_zeros(len(tensors), *tensors[0].shape[:-2], height, width)  # (B, C, H, W)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out


def padding_mask(image_sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2) latent sizes -> (B, 1, height, width) float mask, 1 on each sample's valid (top-left) region."""
    rows = torch.arange(height, device=image_sizes.device)[None, :, None] < image_sizes[:, 0, None, None]  # (B, H, 1)
    cols = torch.arange(width, device=image_sizes.device)[None, None, :] < image_sizes[:, 1, None, None]  # (B, 1, W)
    return (rows & cols).float()[:, None]  # (B, 1, H, W)
