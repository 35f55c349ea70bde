"""Mixed-size training (``data.mixed_sizes``, FiT): padded batches across size buckets, a loss that ignores the
padding, exact resume, two processes, and mixed-size MicroShapes features."""

import pytest
import torch

from dit import FiTTransformer
from dit.train import Trainer, load_config
from dit.train.config import ConfigError
from dit.train.data.dataset import FeatureDataset, collate, padding_mask
from dit.train.loop import sample_draws
from tests.tiny import FIT_KWARGS, SIZES, TINY, _losses, launch_two_processes, make_features


def _fit(features, out, *overrides, mixed: bool = True):
    return load_config(
        TINY,
        [f"data.path={features}", f"output_dir={out}", "model.cls=FiTTransformer", f"model.kwargs={FIT_KWARGS}",
         "objective.name=flow", f"data.mixed_sizes={str(mixed).lower()}", *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("mixed"), n=8, sizes=SIZES)


def _one_per_size(dataset: FeatureDataset) -> list[int]:
    return [indices[0] for indices in dataset.size_groups().values()]


# ----- collate and plan ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [((8, 8), (6, 6)), ((4, 12), (12, 4)), ((8, 8), (4, 12), (12, 4), (6, 6))],
                         ids=["square", "non-square", "all"])  # fmt: skip
def test_collate_pads_bottom_right_and_reports_sizes(sizes):
    gen = torch.Generator().manual_seed(0)
    samples = [
        {"latent_mean": torch.randn(4, h, w, generator=gen), "latent_std": torch.rand(4, h, w, generator=gen),
         "text_embeds": torch.randn(3, 5), "text_mask": torch.ones(3, dtype=torch.long), "index": i}
        for i, (h, w) in enumerate(sizes)
    ]  # fmt: skip
    batch = collate(samples, pad=True)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    assert batch["latent_mean"].shape == (len(sizes), 4, height, width)
    assert batch["image_sizes"].tolist() == [list(size) for size in sizes]
    mask = padding_mask(batch["image_sizes"], height, width)  # (B, 1, H, W)
    for i, (h, w) in enumerate(sizes):
        for key in ("latent_mean", "latent_std"):
            assert torch.equal(batch[key][i, :, :h, :w], samples[i][key])
            assert torch.count_nonzero(batch[key][i] * (1 - mask[i])) == 0  # zeros outside the valid region
        assert mask[i].sum() == h * w and mask[i, 0, :h, :w].all()
    if len({tuple(s) for s in sizes}) > 1:
        with pytest.raises(RuntimeError):
            collate(samples)  # without pad, sizes must agree (bucketed batches)


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "bucketed"])
def test_batches_mix_sizes_only_when_asked(features, tmp_path, mixed):
    trainer = Trainer(_fit(features, tmp_path, mixed=mixed))
    dataset, plan = trainer.dataset, trainer.plan
    size_of = {i: tuple(dataset[i]["latent_mean"].shape) for i in range(len(dataset))}
    epoch = plan.epoch_batches(0)
    assert sorted(i for batch in epoch for i in batch) == list(range(len(dataset)))  # 32 samples, 8 full batches
    distinct = [len({size_of[i] for i in batch}) for batch in epoch]
    if mixed:
        assert max(distinct) > 1
        batch = next(trainer._batches(0, 1))
        sizes = batch["image_sizes"]  # (B, 2)
        assert len({tuple(s) for s in sizes.tolist()}) > 1
        assert tuple(batch["latent_mean"].shape[-2:]) == tuple(sizes.max(dim=0).values.tolist())
    else:
        assert distinct == [1] * len(epoch)
        assert "image_sizes" not in next(trainer._batches(0, 1))


# ----- the loss ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("posterior", [True, False], ids=["posterior-sample", "posterior-mean"])
def test_loss_ignores_padding_and_equals_the_unpadded_loss(features, tmp_path, posterior):
    """A padded sample's loss equals its loss computed alone without padding (same noise and timestep), and does
    not change when the padding holds garbage."""
    config = _fit(features, tmp_path, "data.caption_dropout=0", f"data.sample_posterior={str(posterior).lower()}")
    trainer = Trainer(config)
    dataset, model = trainer.dataset, trainer.accelerator.unwrap_model(trainer.model)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero output layers (a fresh FiT predicts zero everywhere)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = collate([dataset[i] for i in _one_per_size(dataset)], pad=True)
    with torch.no_grad():
        _, per_sample = trainer._loss(batch, micro_step=5)
        poisoned = {**batch, "latent_mean": batch["latent_mean"].clone(), "latent_std": batch["latent_std"].clone()}
        outside = 1 - padding_mask(batch["image_sizes"], *batch["latent_mean"].shape[-2:])  # (B, 1, H, W)
        poisoned["latent_mean"] += 100.0 * outside
        poisoned["latent_std"] += 5.0 * outside
        _, per_sample_poisoned = trainer._loss(poisoned, micro_step=5)
    torch.testing.assert_close(per_sample_poisoned, per_sample, rtol=1e-6, atol=1e-7)

    draws = sample_draws(config.seed, 5, list(range(4)), (4, *dataset.max_size), "cpu")
    objective, device = trainer.objective, per_sample.device  # CUDA in tests/gpu
    for i, index in enumerate(_one_per_size(dataset)):
        sample = dataset[index]
        h, w = sample["latent_mean"].shape[-2:]
        x0 = sample["latent_mean"][None]  # (1, 4, h, w), unpadded
        if posterior:
            x0 = x0 + sample["latent_std"][None] * draws["eps"][i : i + 1, :, :h, :w]
        noise, t = (
            draws["noise"][i : i + 1, :, :h, :w],
            objective.timesteps(draws["uniform"][i : i + 1].to(device)),
        )  # (1,)
        x0, noise = x0.to(device), noise.to(device)
        tt = t.view(-1, 1, 1, 1)
        with torch.no_grad():
            pred = model(
                (1 - tt) * x0 + tt * noise, sample["text_embeds"][None].to(device), t * 1000,
                encoder_attention_mask=sample["text_mask"][None].to(device),
            ).sample  # fmt: skip
        alone = ((pred - (noise - x0)) ** 2).mean()
        torch.testing.assert_close(per_sample[i], alone, rtol=1e-5, atol=1e-6)


# ----- reliability ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "bucketed"])
def test_exact_resume(features, tmp_path, mixed):
    full = Trainer(_fit(features, tmp_path / "full", mixed=mixed)).train()
    assert len(full) == 6
    first = Trainer(_fit(features, tmp_path / "split", "max_steps=3", mixed=mixed)).train()
    assert first == full[:3]
    resumed = Trainer(_fit(features, tmp_path / "split", "resume=latest", mixed=mixed)).train()
    assert resumed == full[3:]
    a = FiTTransformer.from_pretrained(tmp_path / "full/checkpoints/checkpoint-6/model")
    b = FiTTransformer.from_pretrained(tmp_path / "split/checkpoints/checkpoint-6/model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_two_processes_match_one_with_mixed_sizes(features, tmp_path):
    """Each process pads its own share to its own canvas; the losses still match one process."""
    overrides = [f"data.path={features}", "max_steps=4", "checkpoint_every=100", "model.cls=FiTTransformer",
                 f"model.kwargs={FIT_KWARGS}", "objective.name=flow", "data.mixed_sizes=true"]  # fmt: skip
    Trainer(load_config(TINY, [*overrides, "data.batch_size=4", f"output_dir={tmp_path / 'one'}"])).train()
    two = launch_two_processes(overrides, tmp_path / "two")
    one = _losses(tmp_path / "one")
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)


def test_mixed_sizes_needs_a_backbone_that_takes_image_sizes(features, tmp_path):
    config = load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path}", "data.mixed_sizes=true"])
    with pytest.raises(ConfigError, match="image_sizes"):
        Trainer(config)  # PixArt: a padded canvas would be read as image content


# ----- MicroShapes features -------------------------------------------------------------------------------------
def test_mixed_size_microshapes_features(tmp_path):
    from dit.microshapes.mixed_sizes import make_mixed_dataset, write_mixed_features
    from dit.tiny import tiny_t5, tiny_tokenizer, tiny_vae

    groups = make_mixed_dataset(24, seed=3, sides=(32, 48, 64))
    assert sum(len(captions) for _, captions in groups.values()) == 24
    for (h, w), (images, captions) in groups.items():
        assert images.shape == (len(captions), 3, h, w) and images.min() >= -1 and images.max() <= 1
    assert any(h != w for h, w in groups) and len(groups) > 2
    counts = write_mixed_features(tmp_path, groups, tiny_tokenizer(), tiny_t5(), tiny_vae(), max_length=24)
    dataset = FeatureDataset(tmp_path)
    assert len(dataset) == 24 and (tmp_path / "null_caption.safetensors").is_file()
    assert sorted(size[1:] for size in dataset.sizes) == sorted((h // 2, w // 2) for h, w in groups)  # 2x VAE
    assert counts == {f"{h}x{w}": len(c) for (h, w), (_, c) in groups.items()}
    assert dataset[0]["text_embeds"].shape[0] == 24
