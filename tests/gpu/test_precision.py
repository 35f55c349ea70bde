"""bf16 compute weights with fp32 masters and the loss read one step late, on CUDA (the Trainer picks CUDA when it is
there; the optimizer is fused AdamW over the masters): the trainer-level tests of tests/train/test_precision.py."""

import torch

from dit.train import Trainer
from tests.train.test_precision import (  # noqa: F401  (collected here again, marked gpu)
    BF16,
    _config,
    features,
    fresh_accelerate_state,
    test_a_non_finite_loss_read_late_stops_at_its_step_before_any_save,
    test_a_step_of_the_trainer_is_an_autocast_step_within_bf16_tolerance,
    test_checkpoints_hold_the_fp32_masters_and_resume_exactly,
    test_each_loss_is_read_after_the_next_step_was_launched_or_before_a_save,
)


def test_masters_live_on_the_gpu_with_a_fused_optimizer(features, tmp_path):  # noqa: F811
    trainer = Trainer(_config(features, tmp_path, *BF16, "max_steps=2", "pipeline=false"))
    trainer.train()
    assert {m.device.type for m in trainer.masters.masters} == {"cuda"}
    assert {p.dtype for p in trainer.masters.params} == {torch.bfloat16}
    assert all(group.get("fused") for group in trainer.optimizer.param_groups)
