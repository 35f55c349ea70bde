"""Size buckets too small for a batch are merged into the nearest one (train/data/buckets.py), and a data set smaller
than a batch repeats within it: every extracted sample trains, and the run says so in one line."""

import pytest
import torch
from safetensors.torch import save_file

from dit.train.data.batch_plan import BatchPlan
from dit.train.data.buckets import bucket_summary, bucketed, cover_crop_latent, merge_buckets
from dit.train.data.dataset import FeatureDataset, collate
from dit.train.features.mixed_sizes import MixedSizes


def _groups(counts: dict) -> dict:
    groups, start = {}, 0
    for size, n in counts.items():
        groups[size] = list(range(start, start + n))
        start += n
    return groups


@pytest.mark.parametrize(
    "counts, batch, expected",
    [
        ({(8, 8): 8, (6, 6): 3, (10, 10): 1}, 4, {(6, 6): (8, 8), (10, 10): (8, 8)}),  # square
        ({(8, 8): 8, (4, 12): 8, (5, 13): 2, (9, 8): 1}, 4, {(5, 13): (4, 12), (9, 8): (8, 8)}),  # non-square
        ({(4, 12): 3, (12, 4): 2, (8, 8): 1}, 8, None),  # none fills a batch: all into one, which repeats
        ({(8, 8): 1, (4, 12): 4, (6, 10): 1, (10, 6): 1, (12, 4): 1, (9, 9): 10}, 32, None),  # the case
    ],
    ids=["square", "non-square", "none-fills", "issue"],
)
def test_small_buckets_merge_into_the_nearest_one_and_nothing_is_lost(counts, batch, expected):
    groups = _groups(counts)
    merge = merge_buckets(groups, batch)
    merged = sorted(i for indices in merge.buckets.values() for i in indices)
    assert merged == list(range(sum(counts.values())))  # every sample, once
    assert set(merge.targets) == set(counts) and set(merge.targets.values()) == set(merge.buckets)
    if expected is not None:
        assert merge.resized == expected
        assert all(len(indices) >= batch for indices in merge.buckets.values())
    else:
        assert len(merge.buckets) == 1
    assert merge_buckets(groups, batch).buckets == merge.buckets  # a pure function of the sizes
    line = bucket_summary(merge)
    assert line.startswith(f"training on {len(merged)} of {len(merged)} samples")
    assert all(f"{counts[s]} from {s[0]}x{s[1]}" in line for s in merge.resized)


def test_buckets_that_fill_a_batch_are_left_alone():
    merge = merge_buckets(_groups({(8, 8): 4, (4, 12): 5}), 4)
    assert merge.resized == {} and not merge.repeated and len(merge.buckets) == 2


def test_cover_crop_keeps_the_centre_and_scales_to_cover():
    latent = torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8)
    assert torch.equal(cover_crop_latent(latent, (4, 4)), latent[:, :, 2:6])  # wide -> square: centre columns
    assert cover_crop_latent(latent, (4, 8)) is latent
    up = cover_crop_latent(torch.full((3, 2, 3), 5.0), (6, 6))  # scaled x3 to cover 6x9, then cropped
    assert up.shape == (3, 6, 6) and torch.allclose(up, torch.full_like(up, 5.0))
    down = cover_crop_latent(torch.randn(3, 16, 12), (4, 4))
    assert down.shape == (3, 4, 4)


def _shards(folder, counts: dict, std: bool, control: bool):
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for k, ((h, w), n) in enumerate(counts.items()):
        tensors = {"latent_mean": torch.randn(n, 4, h, w, generator=gen), "text_embeds": torch.randn(n, 6, 8),
                   "text_mask": torch.ones(n, 6, dtype=torch.long)}  # fmt: skip
        if std:
            tensors["latent_std"] = torch.rand(n, 4, h, w, generator=gen)
        if control:
            tensors["control_latent"] = torch.randn(n, 4, h, w, generator=gen)
        save_file(tensors, folder / f"{h}x{w}-p0-{k:05d}.safetensors")
    return folder


@pytest.mark.parametrize("std", [True, False], ids=["std", "no-std"])
@pytest.mark.parametrize("control", [True, False], ids=["control", "no-control"])
def test_merged_samples_are_read_at_their_bucket_size(tmp_path, std, control):
    counts = {(8, 8): 6, (6, 10): 2, (10, 6): 1}
    dataset = FeatureDataset(_shards(tmp_path / "f", counts, std, control))
    originals = [dataset[i] for i in range(len(dataset))]
    batching = bucketed(dataset, 4)
    buckets, line = batching.buckets, batching.summary
    assert [sorted(b) for b in buckets] == [list(range(9))] and line.startswith("training on 9 of 9 samples")
    assert not batching.pad and batching.draw_size is None  # one size per batch: nothing padded
    for i in range(len(dataset)):
        sample = dataset[i]
        for key in ("latent_mean", "latent_std", "control_latent"):
            present = key == "latent_mean" or (key == "latent_std" and std) or (key == "control_latent" and control)
            if not present:
                assert sample.get(key) is None
                continue
            assert sample[key].shape == (4, 8, 8)
            assert torch.equal(sample[key], cover_crop_latent(originals[i][key], (8, 8)))
    plan = BatchPlan(buckets, 4, seed=0)
    for batch in plan.epoch_batches(0):
        collated = collate([dataset[i] for i in batch])
        assert collated["latent_mean"].shape == (4, 4, 8, 8)


@pytest.mark.parametrize("batch", [8, 32])
def test_a_data_set_smaller_than_a_batch_repeats_to_fill_it(tmp_path, batch):
    dataset = FeatureDataset(_shards(tmp_path / "f", {(8, 8): 3, (6, 10): 2}, std=True, control=False))
    batching = bucketed(dataset, batch)
    buckets, line = batching.buckets, batching.summary
    assert line.startswith("training on 5 of 5 samples") and f"global batch of {batch} is more than the 5" in line
    plan = BatchPlan(buckets, batch, seed=3)
    for step in range(3):
        indices = plan.global_batch_at(step)
        assert len(indices) == batch and set(indices) == set(range(5))  # every sample in every batch
        assert plan.global_batch_at(step) == BatchPlan(buckets, batch, seed=3).global_batch_at(step)  # (seed, step)
    shares = [next(plan.local_batches(0, rank, 2)) for rank in range(2)]  # two processes read the global batch
    assert shares[0] + shares[1] == plan.global_batch_at(0)


def test_mixed_sizes_keep_one_bucket_of_every_sample(tmp_path):
    """The mixed-sizes feature decides the batching: one bucket of every sample, padded, noise drawn at the largest
    size; nothing is resized."""
    dataset = FeatureDataset(_shards(tmp_path / "f", {(8, 8): 3, (6, 10): 2}, std=False, control=False))
    batching = MixedSizes().batching(dataset, 4)
    assert batching.buckets == [list(range(5))] and dataset.targets == {}
    assert batching.pad and batching.draw_size == (8, 10) == dataset.max_size
    assert batching.summary.startswith("training on 5 of 5 samples (mixed sizes")
    assert "global batch of 8 is more than the 5" in MixedSizes().batching(dataset, 8).summary
    assert {tuple(dataset[i]["latent_mean"].shape) for i in range(5)} == {(4, 8, 8), (4, 6, 10)}  # as extracted
