"""EDM as a training parametrisation (``objective.name: edm``): the preconditioning, the log-normal sigmas and the
weighted loss against EDM's formulas written out by hand, the same numbers as diffusers' EDM schedulers use, the
``objective.edm`` section, and a tiny run."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from dit.models import config_checks
from dit.nn.masking import patch_loss_mask
from dit.pipelines import TextToImagePipeline
from dit.pipelines.schedulers import EDM_SETTINGS, default_scheduler, prediction_of
from dit.train import Trainer, load_config
from dit.train.config import ConfigError, EDMConfig, ObjectiveConfig
from dit.train.objectives.build import build_objective
from dit.train.objectives.distillation import HybridDistillation
from dit.train.objectives.losses import EDMDenoising
from tests.tiny import MICRODIT, TINY, assert_fp32_close, make_features, tiny_backbone

SIGMAS = torch.tensor([0.002, 0.05, 0.9, 1.0, 3.5, 80.0])


def _edm(**settings) -> EDMDenoising:
    return EDMDenoising(ObjectiveConfig(name="edm", edm=EDMConfig(**settings)))


def _hand_scalings(sigma: float, sd: float) -> tuple[float, float, float]:
    """EDM's c_skip, c_out, c_in (Karras et al. 2022, table 1), in float64."""
    return sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2), 1 / math.sqrt(sigma**2 + sd**2)


# ----- the parametrisation against EDM's formulas -------------------------------------------------------------
@pytest.mark.parametrize("sd", [0.9, 0.5])
def test_scalings_time_and_input_are_edms(sd):
    p = _edm(sigma_data=sd).parametrisation
    x = torch.randn(len(SIGMAS), 4, 2, 2, generator=torch.Generator().manual_seed(0))
    c_skip, c_out, c_in = p.scalings(SIGMAS, x)
    for i, sigma in enumerate(SIGMAS.tolist()):
        expected = _hand_scalings(sigma, sd)
        for value, hand in zip((c_skip, c_out, c_in), expected):
            assert value.shape == (len(SIGMAS), 1, 1, 1)
            assert math.isclose(value[i].item(), hand, rel_tol=1e-6)
        assert math.isclose(p.model_time(SIGMAS)[i].item(), math.log(sigma) / 4, rel_tol=1e-6, abs_tol=1e-7)
        assert_fp32_close(p.model_input(x, SIGMAS)[i], x[i] * expected[2])
    assert (p.model_time(SIGMAS)[:3] < 0).all()  # c_noise is negative below sigma 1


def test_noise_denoised_and_inverse():
    p = _edm().parametrisation
    gen = torch.Generator().manual_seed(1)
    x0, eps, pred = (torch.randn(len(SIGMAS), 4, 3, 3, generator=gen) for _ in range(3))
    noisy = p.add_noise(x0, eps, SIGMAS)
    assert_fp32_close(noisy, x0 + SIGMAS.view(-1, 1, 1, 1) * eps)
    c_skip, c_out, _ = (torch.tensor(v).view(-1, 1, 1, 1) for v in zip(*(_hand_scalings(s, 0.9) for s in SIGMAS)))
    denoised, implied_eps = p.x0_and_eps(pred, noisy, SIGMAS)
    assert_fp32_close(denoised, (c_skip * noisy.double() + c_out * pred.double()).float())
    assert_fp32_close(implied_eps * SIGMAS.view(-1, 1, 1, 1), noisy - denoised)
    # the F that stands for (x0, eps) gives x0 and eps back
    oracle = (x0 - c_skip.float() * noisy) / c_out.float()
    back_x0, back_eps = p.x0_and_eps(oracle, noisy, SIGMAS)
    torch.testing.assert_close(back_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(back_eps[1:], eps[1:], rtol=1e-3, atol=1e-3)  # sigma 0.002 divides fp32 rounding


def test_training_sigmas_are_log_normal_with_microdits_defaults():
    p = _edm().parametrisation
    assert (p.config.edm.p_mean, p.config.edm.p_std) == (-0.6, 1.2)
    assert math.isclose(p.timesteps(torch.tensor([0.5])).item(), math.exp(-0.6), rel_tol=1e-6)
    sigma = p.timesteps(torch.rand(40000, generator=torch.Generator().manual_seed(2)))
    assert sigma.dtype == torch.float32 and (sigma > 0).all()
    assert abs(sigma.log().mean().item() + 0.6) < 0.03 and abs(sigma.log().std().item() - 1.2) < 0.03
    moved = _edm(p_mean=0.4, p_std=0.5).parametrisation.timesteps(torch.tensor([0.5, 0.8413447]))
    torch.testing.assert_close(moved.log(), torch.tensor([0.4, 0.9]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sd", [0.9, 0.5])
def test_loss_is_edms_weighted_denoising_loss(sd):
    """The network gets (c_in x_t, ln(sigma)/4); the loss is lambda |c_skip x_t + c_out F - x0|^2, which equals the
    unweighted |F - (x0 - c_skip x_t) / c_out|^2."""
    objective = _edm(sigma_data=sd)
    gen = torch.Generator().manual_seed(3)
    x0, noise, out = (torch.randn(4, 4, 4, 4, generator=gen) for _ in range(3))
    uniform = torch.tensor([0.05, 0.4, 0.7, 0.99])
    seen = {}

    def model_fn(x, t):
        seen["x"], seen["t"] = x, t
        return torch.cat([out, torch.full_like(out, 100.0)], dim=1)  # learned-sigma channels are not F

    loss, extra = objective.loss(model_fn, x0, noise, uniform)
    sigma = objective.parametrisation.timesteps(uniform)
    for i, s in enumerate(sigma.double().tolist()):
        c_skip, c_out, c_in = _hand_scalings(s, sd)
        noisy = x0[i].double() + s * noise[i].double()
        assert_fp32_close(seen["x"][i], (c_in * noisy).float())
        assert math.isclose(seen["t"][i].item(), math.log(s) / 4, rel_tol=1e-6)
        weight = (s**2 + sd**2) / (s * sd) ** 2
        denoised_error = ((c_skip * noisy + c_out * out[i].double() - x0[i].double()) ** 2).mean().item()
        assert math.isclose(loss[i].item(), weight * denoised_error, rel_tol=1e-4)
        assert math.isclose(extra["mse"][i].item(), denoised_error, rel_tol=1e-4)
        target = (x0[i].double() - c_skip * noisy) / c_out
        assert math.isclose(loss[i].item(), ((out[i].double() - target) ** 2).mean().item(), rel_tol=1e-4)


def test_loss_is_zero_for_edms_target_and_counts_only_kept_patches():
    objective = _edm()
    p = objective.parametrisation
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    uniform = torch.tensor([0.3, 0.8])
    sigma = p.timesteps(uniform)
    c_skip, c_out, _ = p.scalings(sigma, x0)
    target = (x0 - c_skip * p.add_noise(x0, noise, sigma)) / c_out
    loss, _ = objective.loss(lambda x, t: target, x0, noise, uniform)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6)
    mask = patch_loss_mask(torch.tensor([[0, 3, 5], [1, 2, 7]]), (4, 4), 2)  # (B, 1, H, W)
    wrong_outside = target + (1 - mask) * 5.0
    masked, _ = objective.loss(lambda x, t: wrong_outside, x0, noise, uniform, loss_mask=mask)
    assert torch.allclose(masked, torch.zeros(2), atol=1e-6)
    unmasked, _ = objective.loss(lambda x, t: wrong_outside, x0, noise, uniform)
    assert (unmasked > 1).all()


def test_hybrid_distillation_gives_the_teacher_the_preconditioned_input():
    objective = build_objective(ObjectiveConfig(name="edm", teacher="teacher-folder"))
    assert isinstance(objective, HybridDistillation) and isinstance(objective.base, EDMDenoising)
    gen = torch.Generator().manual_seed(5)
    x0, noise, out = (torch.randn(2, 4, 4, 4, generator=gen) for _ in range(3))
    seen = []

    def teacher(x, t):
        seen.append((x, t))
        return out + 1

    loss, extra = objective.loss(lambda x, t: out, x0, noise, torch.tensor([0.2, 0.9]), teacher_fn=teacher)
    sigma = objective.parametrisation.timesteps(torch.tensor([0.2, 0.9]))
    noisy = objective.parametrisation.add_noise(x0, noise, sigma)
    assert_fp32_close(seen[0][0], objective.parametrisation.model_input(noisy, sigma))
    assert torch.equal(seen[0][1], sigma.log() / 4)
    assert torch.allclose(extra["kd_eps"], torch.ones(2))


# ----- training and sampling use the same numbers ----------------------------------------------------------------
@pytest.mark.parametrize("sampler, cls", [("dpmsolver", EDMDPMSolverMultistepScheduler), ("euler", EDMEulerScheduler)])
def test_the_samplers_precondition_as_the_loss(sampler, cls):
    """diffusers' EDM schedulers with ``prediction_type="epsilon"`` feed the network and read its output exactly as
    training does: c_in, c_noise and D = c_skip x + c_out F at the run's sigma_data."""
    settings = dict(sigma_data=0.7, sigma_min=0.01, sigma_max=40.0, rho=5.0)
    p = _edm(sampler=sampler, **settings).parametrisation
    scheduler = p.sampling_scheduler()
    assert type(scheduler) is cls and prediction_of(scheduler) == "edm" == p.prediction_type
    assert {k: scheduler.config[k] for k in settings} == settings and scheduler.config.prediction_type == "epsilon"
    x, pred = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for sigma in (0.02, 0.6, 1.0, 30.0):
        t = torch.full((2,), sigma)
        assert_fp32_close(scheduler.precondition_outputs(x, pred, sigma), p.denoised(pred, x, t))
        assert_fp32_close(scheduler.precondition_inputs(x, sigma), p.model_input(x, t))
        assert_fp32_close(scheduler.precondition_noise(torch.tensor([sigma])), p.model_time(t[:1]))
    scheduler.set_timesteps(4)
    assert scheduler.sigmas[[0, -2]].tolist() == pytest.approx([40.0, 0.01], rel=1e-5)  # sigma_max -> sigma_min


def test_defaults_are_microdits_and_the_pipelines_fallback():
    edm = EDMConfig()
    assert {k: getattr(edm, k) for k in EDM_SETTINGS} == EDM_SETTINGS
    assert EDM_SETTINGS == {"sigma_data": 0.9, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    record = _edm().parametrisation.model_record()
    assert record == {"prediction_type": "edm", "noise_shift": None}


# ----- the objective.edm section ----------------------------------------------------------------------------------
def test_the_section_loads_from_yaml(tmp_path):
    path = tmp_path / "edm.yaml"
    path.write_text("objective:\n  name: edm\n  edm:\n    sigma_data: 0.5\n    p_mean: -1.2\n    sampler: euler\n")
    config = load_config(path)
    assert config.objective.edm == EDMConfig(sigma_data=0.5, p_mean=-1.2, sampler="euler")
    assert isinstance(build_objective(config.objective).sampling_scheduler(), EDMEulerScheduler)


REFUSED = {
    "unknown-key": (["objective.name=edm", "objective.edm.P_mean=-0.6"],
                    r"config.objective.edm: unknown key\(s\) P_mean"),
    "edm-section-on-v": (["objective.name=v", "objective.edm.sigma_data=0.5"],
                         r"objective.edm.sigma_data=0.5 is a setting of objective.name=edm"),
    "sampler": (["objective.name=edm", "objective.edm.sampler=heun"], r"objective.edm.sampler: 'heun' is not one of"),
    "sigma-data": (["objective.name=edm", "objective.edm.sigma_data=0"], r"objective.edm.sigma_data: 0.0 is out of"),
    "sigma-order": (["objective.name=edm", "objective.edm.sigma_min=5", "objective.edm.sigma_max=1"],
                    r"sigma_min=5.0 must be below objective.edm.sigma_max=1.0"),
    "lcm": (["objective.name=edm", "objective.distill=lcm", "objective.teacher=t"],
            r"objective.distill=lcm with objective.name=edm"),
}  # fmt: skip


@pytest.mark.parametrize("overrides, message", REFUSED.values(), ids=REFUSED.keys())
def test_bad_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ----- a tiny run --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"), sizes=((8, 8),))


def _run(features: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(TINY, [f"data.path={features}", f"output_dir={out}", "report_to=none", "max_steps=3",
                                "checkpoint_every=3", "objective.name=edm", "model.kwargs.out_channels=4",
                                *overrides])  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    return trainer


MODELS = {
    "pixart": [],
    "microdit-masked": MICRODIT,
    "microdit-original-masked": ["model.cls=MicroDiTOriginalTransformer", "masking.ratio=0.5",
                                 f"model.kwargs={json.dumps(tiny_backbone('tiny-microdit-original')[1])}"],
}  # fmt: skip


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_a_tiny_run_trains_edm(features, tmp_path, model):
    trainer = _run(features, tmp_path / "run", "pipeline=false", "objective.edm.sigma_data=0.5", *model)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == trainer.config.max_steps
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert trainer.backbone.config.prediction_type == "edm"
    scheduler = trainer.objective.sampling_scheduler()
    assert isinstance(scheduler, EDMDPMSolverMultistepScheduler) and scheduler.config.sigma_data == 0.5
    saved = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-3" / "model" / "config.json").read_text())
    assert saved["prediction_type"] == "edm"


@pytest.mark.skipif(
    "edm" not in config_checks.PREDICTION_TYPES,
    reason="a backbone config that records prediction_type='edm' reloads only once dit.models.config_checks."
    "PREDICTION_TYPES lists 'edm'",
)
def test_a_run_ends_with_a_pipeline_that_samples_edm(features, tmp_path):
    _run(features, tmp_path / "run", "objective.edm.sampler=euler", "objective.edm.sigma_data=0.6")
    pipe = TextToImagePipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    assert isinstance(pipe.scheduler, EDMEulerScheduler) and pipe.scheduler.config.sigma_data == 0.6
    assert pipe.transformer.prediction_type == "edm"
    assert isinstance(default_scheduler(pipe.transformer), EDMDPMSolverMultistepScheduler)  # a folder without one
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=3, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
