"""Size buckets that all fill a batch: a bucket too small for one global batch is merged into the nearest bucket
that fills one, its latents resized to cover the target size and centre-cropped (as PixArt's aspect-ratio bins
treat images), so that no extracted sample is left out of training.

:func:`merge_buckets` decides, from the bucket sizes alone, where each size goes (a pure function of the data and
the batch: every process and every resume plans the same batches); :func:`cover_crop_latent` resizes a sample's
latents when :class:`~dit.train.data.dataset.FeatureDataset` reads it; :func:`bucket_summary` is the one line a run
prints; :func:`bucketed` is a run's :class:`Batching` unless a feature decides another (mixed sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Size = tuple[int, int]  # latent (height, width)


@dataclass
class Batching:
    """How a run groups its samples into batches.

    Args:
        buckets: sample indices grouped so that a batch never mixes groups
            (:class:`~dit.train.data.batch_plan.BatchPlan`'s).
        summary: the one line the run prints about them.
        pad: whether :func:`~dit.train.data.dataset.collate` pads a batch's latents to one canvas and reports every
            sample's ``image_sizes``.
        draw_size: the latent (height, width) every sample's noise is drawn at and cropped from, so that it does not
            depend on the batch's canvas; None: the batch's own size.
    """

    buckets: list[list[int]]
    summary: str
    pad: bool = False
    draw_size: Size | None = None


@dataclass
class BucketMerge:
    """Where the samples of each latent size train.

    Args:
        buckets: sample indices per target size (a batch never mixes targets).
        targets: every latent size found -> the size its samples train at (itself when kept).
        counts: samples per latent size found.
        global_batch: samples per global batch.
    """

    buckets: dict[Size, list[int]]
    targets: dict[Size, Size]
    counts: dict[Size, int] = field(default_factory=dict)
    global_batch: int = 1

    @property
    def resized(self) -> dict[Size, Size]:
        """The sizes whose latents are resized, and the size each goes to."""
        return {size: target for size, target in self.targets.items() if size != target}

    @property
    def repeated(self) -> bool:
        """True when the whole data set is smaller than one global batch (its samples repeat within a batch)."""
        return sum(self.counts.values()) < self.global_batch


def _distance(size: Size, target: Size) -> tuple[float, float]:
    """How far ``size`` is from ``target``: aspect-ratio change first (what the crop loses), then scale."""
    aspect = abs(math.log((size[0] / size[1]) / (target[0] / target[1])))
    return round(aspect, 9), abs(math.log(size[0] * size[1] / (target[0] * target[1])))


def merge_buckets(groups: dict[Size, list[int]], global_batch: int) -> BucketMerge:
    """Merge buckets smaller than ``global_batch`` until every bucket fills a batch or one is left.

    The smallest bucket goes first, into the nearest bucket (aspect ratio, then scale) that fills a batch, else
    into the nearest other bucket; ties go to the smaller size, so the result depends on the sizes alone. A sole
    bucket smaller than a batch stays: :class:`~dit.train.data.batch_plan.BatchPlan` repeats its samples to fill one.
    """
    merged = {size: list(indices) for size, indices in groups.items() if indices}
    counts = {size: len(indices) for size, indices in merged.items()}
    targets = {size: size for size in merged}
    while len(merged) > 1:
        small = [size for size, indices in merged.items() if len(indices) < global_batch]
        if not small:
            break
        source = min(small, key=lambda size: (len(merged[size]), size))
        others = [size for size in merged if size != source]
        full = [size for size in others if len(merged[size]) >= global_batch]
        target = min(full or others, key=lambda size: (_distance(source, size), size))
        merged[target] += merged.pop(source)
        targets = {size: target if goes == source else goes for size, goes in targets.items()}
    return BucketMerge(merged, targets, counts, global_batch)


def cover_crop_latent(latent: torch.Tensor, size: Size) -> torch.Tensor:
    """(C, h, w) -> (C, *size): resized (bilinear, antialiased) to cover ``size`` and centre-cropped."""
    height, width = latent.shape[-2:]
    if (height, width) == tuple(size):
        return latent
    scale = max(size[0] / height, size[1] / width)
    cover = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    resized = F.interpolate(
        latent[None].float(), size=cover, mode="bilinear", antialias=scale < 1, align_corners=False
    )
    top, left = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    return resized[0, :, top : top + size[0], left : left + size[1]].to(latent.dtype)


def _name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def bucket_summary(merge: BucketMerge) -> str:
    """One line: how many samples train out of how many were extracted, per bucket with what was merged into it."""
    total, parts = sum(merge.counts.values()), []
    for target in sorted(merge.buckets, key=lambda size: (-len(merge.buckets[size]), size)):
        sources = sorted((s for s, t in merge.resized.items() if t == target), key=lambda s: (-merge.counts[s], s))
        parts.append(
            f"{_name(target)}: {merge.counts[target]}"
            + "".join(f" + {merge.counts[s]} from {_name(s)}" for s in sources)
        )
    used = sum(len(indices) for indices in merge.buckets.values())
    line = f"training on {used} of {total} samples (latent buckets {', '.join(parts)})"
    if merge.resized:
        line += (f"; smaller buckets are merged into the nearest one (latents resized to cover, centre-cropped) to "
                 f"fill the global batch of {merge.global_batch}")  # fmt: skip
    return line + (repeats_note(total, merge.global_batch) if merge.repeated else "")


def repeats_note(total: int, global_batch: int) -> str:
    """What a summary adds when the whole data set is smaller than one global batch."""
    return f"; the global batch of {global_batch} is more than the {total} samples: each batch repeats them"


def bucketed(dataset, global_batch: int) -> Batching:
    """A run's batching by default: one latent size per batch, every size bucket of a
    :class:`~dit.train.data.dataset.FeatureDataset` filling one (:func:`merge_buckets`); sets the dataset's
    ``targets`` so that merged samples are read at their bucket's size."""
    merge = merge_buckets(dataset.size_groups(), global_batch)
    dataset.targets = merge.resized
    return Batching(list(merge.buckets.values()), bucket_summary(merge))
