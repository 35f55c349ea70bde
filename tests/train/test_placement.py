"""Device and dtype placement: everything the trainer keeps beside the model lives where the model lives.

On a GPU, accelerate moves the model to CUDA in ``prepare``; a tensor made before that stays on the CPU and the first
step that mixes the two crashes (the EMA did, at its first update). Here accelerate is made to place the model on
the ``meta`` device instead, so a CPU machine sees the same move: every piece of state must follow the model, and a
step (loss, backward, EMA and target-network updates) must not mix devices. ``meta`` tensors also have no data, so
any read on the host in that step fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from dit import PixArtTransformer
from dit.train import Trainer, load_config
from tests.tiny import FIT_KWARGS, MICRODIT, TINY, make_features, randomize_, state_beside_the_model
from tests.tiny import SIZES as MIXED_SIZES

PIXART = load_config(TINY, ["data.path=x"]).model.kwargs


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Features (with control latents), mixed-size features, and a saved PixArt (teacher, ControlNet base)."""
    root = tmp_path_factory.mktemp("placement")
    features = make_features(root / "features")
    gen = torch.Generator().manual_seed(7)
    for shard in sorted(features.glob("shard-*.safetensors")):
        tensors = load_file(shard)
        tensors["control_latent"] = torch.randn(tensors["latent_mean"].shape, generator=gen)
        save_file(tensors, shard)
    torch.manual_seed(3)
    randomize_(PixArtTransformer(**PIXART), std=0.05).save_pretrained(root / "pixart")
    mixed = make_features(root / "mixed", n=8, sizes=MIXED_SIZES)
    return {"features": features, "mixed": mixed, "pixart": root / "pixart"}


def _variants(folders: dict[str, Path]) -> dict[str, list[str]]:
    pixart = folders["pixart"]
    return {
        "ema": [],
        "lcm": ["objective.name=v", "objective.distill=lcm", f"objective.teacher={pixart}",
                f"model.pretrained={pixart}", "data.caption_dropout=0"],
        "lit-distill": ["model.cls=LiTTransformer", f"model.inherit_from={pixart}", f"objective.teacher={pixart}"],
        "controlnet": [f"model.pretrained={pixart}", "controlnet.num_blocks=1"],
        "masking": [*MICRODIT, "masking.unmasked_steps=0", "ema_decay=0.9"],
        "mixed-sizes": [f"data.path={folders['mixed']}", "model.cls=FiTTransformer", f"model.kwargs={FIT_KWARGS}",
                        "objective.name=flow", "data.mixed_sizes=true"],
    }  # fmt: skip


VARIANTS = ["ema", "lcm", "lit-distill", "controlnet", "masking", "mixed-sizes"]


def _trainer(folders: dict[str, Path], variant: str, out: Path, *extra: str) -> Trainer:
    overrides = [f"data.path={folders['features']}", f"output_dir={out}", "report_to=none"]
    return Trainer(load_config(TINY, [*overrides, *_variants(folders)[variant], *extra]))


@pytest.fixture
def on_meta(monkeypatch):
    """accelerate places the model (and what it prepares) on the ``meta`` device, as it would on CUDA."""
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_follows_the_model_and_a_step_does_not_mix_devices(folders, tmp_path, on_meta, variant):
    trainer = _trainer(folders, variant, tmp_path)
    state = state_beside_the_model(trainer)
    elsewhere = {name: str(t.device) for name, t in state.items() if t.device.type != "meta"}
    assert not elsewhere, f"not on the model's device: {elsewhere}"
    if trainer.ema is not None:
        assert {t.dtype for t in trainer.ema.shadow.values()} == {torch.float32}
    loss, per_sample = trainer._loss(next(trainer._batches(0, 1)), 0)
    assert loss.device.type == per_sample.device.type == "meta"
    trainer.accelerator.backward(loss)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert any(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    for follower in (trainer.ema, trainer.target):
        if follower is not None:
            follower.update(model)


def test_ema_refuses_a_parameter_on_another_device(folders, tmp_path):
    """The crash this file guards against, named: an EMA whose shadows stayed behind when the model moved."""
    trainer = _trainer(folders, "ema", tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.ema.shadow = {name: t.to("meta") for name, t in trainer.ema.shadow.items()}
    with pytest.raises(RuntimeError, match="EMA tensor is on meta and the parameter it follows on cpu"):
        trainer.ema.update(model)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test with another precision starts and leaves it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_fp32_weights_and_shadows(folders, tmp_path, fresh_accelerate_state):
    trainer = _trainer(folders, "ema", tmp_path, "mixed_precision=bf16")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {t.dtype for t in trainer.ema.shadow.values()} == {torch.float32}
    with trainer.accelerator.autocast():
        loss, _ = trainer._loss(next(trainer._batches(0, 1)), 0)
    trainer.accelerator.backward(loss)
    trainer.ema.update(model)
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in trainer.ema.shadow.values())


def test_ema_update_is_the_written_out_lerp(folders, tmp_path):
    trainer = _trainer(folders, "ema", tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {name: t.clone() for name, t in trainer.ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trainer.ema.update(model)
    params = dict(model.named_parameters())
    for name, shadow in trainer.ema.shadow.items():
        expected = 0.9 * before[name] + 0.1 * params[name].float()
        torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-6)
