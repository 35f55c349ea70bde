"""Masked (MicroDiT) training: loss on kept patches only, the unmasked fine-tune, exact resume, two processes."""

import json

import pytest
import torch

from dit import PixArtTransformer
from dit.nn.masking import patch_loss_mask
from dit.train import Trainer, load_config
from dit.train.config import ConfigError, MaskingConfig, ObjectiveConfig
from dit.train.features.masking import TokenMasking
from dit.train.objectives.losses import OBJECTIVES
from tests.tiny import MICRODIT, TINY, launch_two_processes, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"))  # 8x8 and 6x10 latents: square and non-square


def _config(features, out, *overrides):
    return load_config(TINY, [f"data.path={features}", f"output_dir={out}", *MICRODIT, *overrides])


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["ddpm_eps", "v", "x0", "flow"])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)], ids=["square", "wide"])
def test_loss_counts_only_kept_patches(name, size):
    """Changing the target or the prediction at masked patches changes neither the loss nor its gradient."""
    objective = OBJECTIVES[name](ObjectiveConfig(name=name))
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, *size, generator=gen), torch.randn(2, 4, *size, generator=gen)
    uniform = torch.tensor([0.3, 0.8])
    keep = torch.tensor([[0, 3, 5], [1, 2, 7]])
    mask = patch_loss_mask(keep, (size[0] // 2, size[1] // 2), 2)  # (B, 1, H, W)
    pred = torch.randn(2, 4, *size, generator=gen, requires_grad=True)

    def loss(latents, noise, pred):
        per_sample, _ = objective.loss(lambda noisy, t: pred, latents, noise, uniform, loss_mask=mask)
        return per_sample

    base = loss(latents, noise, pred)
    (grad,) = torch.autograd.grad(base.sum(), pred)
    assert torch.all(grad * (1 - mask) == 0) and torch.any(grad != 0)
    outside = (1 - mask).expand_as(latents) * 7.0
    torch.testing.assert_close(loss(latents + outside, noise - outside, pred + 2 * outside), base)
    inside = mask.expand_as(latents) * 0.5
    assert not torch.allclose(loss(latents, noise, pred + inside), base)
    # the masked mean is the mean over the kept values
    unmasked, _ = objective.loss(lambda noisy, t: pred, latents, noise, uniform)
    assert not torch.allclose(unmasked, base)


def test_token_masking_draws_and_schedule():
    masking = TokenMasking(MaskingConfig(ratio=0.75, unmasked_steps=2), patch_size=2, max_steps=5)
    assert [masking.active(step) for step in range(5)] == [True, True, True, False, False]
    keep, mask = masking.draw(torch.rand(3, 6, 10))  # 15 tokens
    assert keep.shape == (3, 3) and mask.shape == (3, 1, 6, 10)
    assert torch.all(keep.diff(dim=1) > 0)
    assert torch.all(mask.flatten(1).sum(1) == 3 * 4)
    with pytest.raises(ConfigError, match="masking.ratio"):
        TokenMasking(MaskingConfig(ratio=1.0), 2, 5)
    with pytest.raises(ConfigError, match="unmasked_steps"):
        TokenMasking(MaskingConfig(ratio=0.5, unmasked_steps=6), 2, 5)


def test_masked_run_feeds_kept_tokens_then_fine_tunes_unmasked(features, tmp_path):
    trainer = Trainer(_config(features, tmp_path / "run", "log_every=1"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    seen = []
    model.transformer_blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    losses = trainer.train()
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    tokens = {16: 4, 15: 3}  # kept tokens of a 4x4 and a 3x5 grid at ratio 0.75
    assert all(n in tokens.values() for n in seen[:3]) and all(n in tokens for n in seen[3:])
    records = _records(tmp_path / "run")
    assert [r["mask_ratio"] for r in records] == [0.75, 0.75, 0.75, 0.0, 0.0]
    assert all(r["moe_experts_per_token"] > 0 for r in records)


def test_masked_resume_is_exact(features, tmp_path):
    """Resuming at step 3 (masked) gives the uninterrupted run's last masked-then-unmasked steps exactly."""
    full = Trainer(_config(features, tmp_path / "full")).train()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-3"
    resumed = Trainer(_config(features, tmp_path / "resumed", f"resume={checkpoint}")).train()
    assert resumed == full[3:]


def test_two_processes_match_one(features, tmp_path):
    overrides = [f"data.path={features}", *MICRODIT, "max_steps=3", "masking.unmasked_steps=1"]
    Trainer(load_config(TINY, [*overrides, f"output_dir={tmp_path / 'one'}"])).train()
    two = launch_two_processes(overrides, tmp_path / "two")
    one = [r["loss"] for r in _records(tmp_path / "one")]
    assert len(one) == len(two) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)


def test_models_and_objectives_that_cannot_mask_are_refused(features, tmp_path):
    masked = [f"data.path={features}", "masking.ratio=0.5"]
    with pytest.raises(ConfigError, match="full grid"):
        Trainer(load_config(TINY, [*masked, "model.kwargs.kv_compress_ratio=2", f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match="value convolution"):
        Trainer(load_config(TINY, [*masked, "model.cls=LiTTransformer", f"output_dir={tmp_path / 'b'}"]))
    PixArtTransformer(**load_config(TINY).model.kwargs).save_pretrained(tmp_path / "teacher")
    lcm = ["objective.distill=lcm", f"objective.teacher={tmp_path / 'teacher'}"]
    with pytest.raises(ConfigError, match="consistency"):
        Trainer(_config(features, tmp_path / "c", *lcm))
