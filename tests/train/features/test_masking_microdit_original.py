"""Masked training of MicroDiT as published (``model.cls=MicroDiTOriginalTransformer``): the kept tokens reach the
backbone, the unmasked fine-tune follows, expert routing is logged, caption dropout uses the zero caption, resuming
is exact, and the run's pipeline folder holds the class."""

from __future__ import annotations

import json

import pytest
import torch

from dit import MicroDiTOriginalTransformer
from dit.models.presets import preset_config
from dit.models.registry import load_backbone
from dit.train import Trainer, load_config
from tests.tiny import TINY, make_features

KWARGS = json.dumps(preset_config("tiny-microdit-original", use_text_mask=True))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"))  # 8x8 and 6x10 latents, padded text


def _config(features, out, *overrides):
    return load_config(
        TINY,
        [f"data.path={features}", f"output_dir={out}", "model.cls=MicroDiTOriginalTransformer",
         f"model.kwargs={KWARGS}", "masking.ratio=0.75", "masking.unmasked_steps=2", "max_steps=4",
         "checkpoint_every=2", "ema_decay=null", *overrides],
    )  # fmt: skip


def test_masked_then_unmasked_steps_with_the_zero_caption(features, tmp_path):
    trainer = Trainer(_config(features, tmp_path / "run"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    caption, mask = trainer.null_caption
    assert not caption.any() and mask is None  # caption dropout: the original's all-zero caption
    seen = []
    model.transformer_blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    losses = trainer.train()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    kept = {16: 4, 15: 3}  # 75% of a 4x4 and of a 3x5 grid masked
    assert all(n in kept.values() for n in seen[:2]) and all(n in kept for n in seen[2:])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mask_ratio"] for r in records] == [0.75, 0.75, 0.0, 0.0]
    assert all(r["moe_experts_per_token"] > 0 for r in records)
    assert type(load_backbone(tmp_path / "run" / "pipeline")) is MicroDiTOriginalTransformer


def test_masked_resume_is_exact(features, tmp_path):
    full = Trainer(_config(features, tmp_path / "full")).train()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    resumed = Trainer(_config(features, tmp_path / "resumed", f"resume={checkpoint}")).train()
    assert resumed == full[2:]


@pytest.mark.parametrize("use_text_mask", [True, False])
def test_a_model_without_a_text_mask_trains_on_every_token(tmp_path, use_text_mask):
    """As the original reads all 77 CLIP tokens: no mask reaches the model and the text is not trimmed to the batch's
    64-token multiple (80 tokens here, 12 at most kept by the masks); a model that reads masks gets both."""
    features = make_features(tmp_path / "features", text_len=80)
    kwargs = json.dumps(preset_config("tiny-microdit-original", use_text_mask=use_text_mask))
    trainer = Trainer(_config(features, tmp_path / "run", f"model.kwargs={kwargs}", "max_steps=2", "pipeline=false"))
    seen = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[1].shape[1], kwargs.get("encoder_attention_mask"))),
        with_kwargs=True,
    )
    trainer.train()
    assert seen and all(length == (64 if use_text_mask else 80) for length, _ in seen)
    assert all((mask is None) == (not use_text_mask) for _, mask in seen)
