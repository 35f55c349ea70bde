"""The backbones on CUDA: no host synchronisation in a forward (CUDA's sync debug mode), fp32 agreement with the
CPU, finite bf16 forward and backward, and the trainer's state on the GPU after prepare."""

import pytest
import torch

from tests.tiny import FORWARD_VARIANTS, variant_inputs, variant_model


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_forward_never_synchronises(variant):
    """``set_sync_debug_mode("error")`` turns every blocking host/device synchronisation into an error."""
    model, inputs = variant_model(variant).cuda(), variant_inputs(variant, "cuda")
    with torch.no_grad():
        model(**inputs)  # first call: the position table is cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_cuda_fp32_matches_cpu(variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, inputs = variant_model(variant), variant_inputs(variant)
    with torch.no_grad():
        expected = model(**inputs).sample
        actual = model.cuda()(**variant_inputs(variant, "cuda")).sample.cpu()
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_bf16_forward_and_backward_are_finite(variant):
    model, inputs = variant_model(variant).cuda(), variant_inputs(variant, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = model(**inputs).sample
    output.float().square().mean().backward()
    assert torch.isfinite(output).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_trainer_state_lives_on_the_gpu(tmp_path):
    """The crash that started this package: the default config's EMA on the CPU beside a CUDA model."""
    from dit.train import Trainer, load_config
    from tests.tiny import TINY, make_features, state_beside_the_model

    features = make_features(tmp_path / "features")
    trainer = Trainer(load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path / 'run'}", "max_steps=2"]))
    assert {t.device.type for t in state_beside_the_model(trainer).values()} == {"cuda"}
    trainer.train()
