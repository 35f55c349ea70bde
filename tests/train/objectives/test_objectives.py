"""Objectives: zero loss at the exact target, the VLB term, min-SNR weights, logit-normal timesteps."""

import pytest
import torch

from dit.train.config import ConfigError, DiscreteConfig, FlowConfig, ObjectiveConfig, SampleConfig
from dit.train.objectives.build import build_objective
from dit.train.objectives.losses import DDPMEpsilon, RectifiedFlow, SamplePrediction, VPrediction

SHAPE = (3, 4, 6, 10)


def _draws():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen), torch.tensor([0.05, 0.5, 0.95])


def test_eps_loss_is_zero_for_the_true_noise():
    x0, noise, u = _draws()
    loss, extra = DDPMEpsilon(ObjectiveConfig()).loss(lambda xt, t: noise, x0, noise, u)
    assert torch.allclose(loss, torch.zeros(3), atol=1e-10) and "vlb" not in extra


def test_learned_sigma_vlb_is_zero_at_the_true_posterior():
    """With the exact noise and the variance channel at -1 (= posterior log-variance), KL is 0 for t > 0."""
    x0, noise, u = _draws()
    objective = DDPMEpsilon(ObjectiveConfig())
    loss, extra = objective.loss(lambda xt, t: torch.cat([noise, -torch.ones_like(noise)], 1), x0, noise, u)
    assert torch.allclose(extra["vlb"], torch.zeros(3), atol=1e-5)
    _, off = objective.loss(lambda xt, t: torch.cat([noise + 0.3, -torch.ones_like(noise)], 1), x0, noise, u)
    assert (off["vlb"] > 5e-4).all()  # a wrong mean costs KL
    _, first = objective.loss(lambda xt, t: torch.cat([noise, -torch.ones_like(noise)], 1), x0, noise, torch.zeros(3))
    assert (first["vlb"] > 0.5).all()  # t = 0: the discretised decoder NLL, not a KL


def test_v_and_flow_targets():
    x0, noise, u = _draws()
    v = VPrediction(ObjectiveConfig())
    t = v.timesteps(u)
    abar = v.parametrisation.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(v.loss(lambda xt, tt: target, x0, noise, u)[0], torch.zeros(3), atol=1e-10)
    flow = RectifiedFlow(ObjectiveConfig(name="flow"))
    assert torch.allclose(flow.loss(lambda xt, tt: noise - x0, x0, noise, u)[0], torch.zeros(3), atol=1e-10)


def test_x0_loss_is_the_v_loss_with_a_floored_sigma():
    """x0-prediction: zero at x0; otherwise |x0_hat - x0|^2 / sigma^2, which equals the v-prediction loss of the
    implied v (above the floor) and is capped by the floor at the first timesteps."""
    x0, noise, u = _draws()
    objective, v = SamplePrediction(ObjectiveConfig(name="x0")), VPrediction(ObjectiveConfig())
    assert torch.allclose(objective.loss(lambda xt, t: x0, x0, noise, u)[0], torch.zeros(3), atol=1e-10)
    x0_hat = x0 + 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    loss, _ = objective.loss(lambda xt, t: x0_hat, x0, noise, u)
    t = objective.timesteps(u)
    a, s = objective.parametrisation.coefficients(t, x0)
    implied_v = (a * (a * x0 + s * noise) - x0_hat) / s  # v = a * x_t - ... solved from x0 = a x_t - s v
    v_loss, _ = v.loss(lambda xt, tt: implied_v, x0, noise, u)
    assert torch.allclose(loss, v_loss, rtol=1e-4)
    first, _ = objective.loss(lambda xt, t: x0_hat, x0, noise, torch.zeros(3))  # t = 0: sigma 0.01 < floor
    assert torch.allclose(first, ((x0_hat - x0) ** 2).mean((1, 2, 3)) / 0.05**2, rtol=1e-5)
    uniform, _ = SamplePrediction(ObjectiveConfig(name="x0", x0=SampleConfig(weighting="uniform"))).loss(
        lambda xt, t: x0_hat, x0, noise, u
    )
    assert torch.allclose(uniform, ((x0_hat - x0) ** 2).mean((1, 2, 3)))
    with pytest.raises(ConfigError, match="x0.weighting: 'snr' is not one of"):
        build_objective(ObjectiveConfig(name="x0", x0=SampleConfig(weighting="snr")))


@pytest.mark.parametrize("shift", [1.0, 4.0])
def test_noise_shift_divides_every_snr_and_reaches_the_sampler(shift):
    base = VPrediction(ObjectiveConfig())
    shifted = VPrediction(ObjectiveConfig(discrete=DiscreteConfig(noise_shift=shift)))
    t = torch.arange(0, 1000, 37)
    assert torch.allclose(shifted.parametrisation.snr(t) * shift**2, base.parametrisation.snr(t), rtol=1e-6)
    scheduler = shifted.sampling_scheduler()
    assert torch.allclose(scheduler.alphas_cumprod.double(), shifted.parametrisation.alphas_cumprod, atol=1e-6)
    with pytest.raises(ConfigError, match="discrete.noise_shift: 0.0 is out of range"):
        build_objective(ObjectiveConfig(name="v", discrete=DiscreteConfig(noise_shift=0.0)))


def test_min_snr_weights():
    config = ObjectiveConfig(discrete=DiscreteConfig(min_snr_gamma=5.0))
    eps, vpred = DDPMEpsilon(config), VPrediction(config)
    t = torch.tensor([10, 500, 990])
    snr = eps.parametrisation.snr(t)
    assert torch.allclose(eps._min_snr_weight(t, False), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(vpred._min_snr_weight(t, True), torch.clamp(snr, max=5.0) / (snr + 1))
    with pytest.raises(
        ConfigError, match=r"discrete.min_snr_gamma=5.0 is a setting of objective.name=ddpm_eps or v or x0"
    ):
        build_objective(ObjectiveConfig(name="flow", discrete=DiscreteConfig(min_snr_gamma=5.0)))


def test_logit_normal_timesteps():
    flow = RectifiedFlow(ObjectiveConfig(name="flow", flow=FlowConfig(logit_normal_mean=0.0, logit_normal_std=1.0)))
    t = flow.timesteps(torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item()) < 0.05 and abs(logits.std().item() - 1.0) < 0.05


def test_unknown_objective_is_named():
    with pytest.raises(ConfigError, match="'score'"):
        build_objective(ObjectiveConfig(name="score"))


@pytest.mark.parametrize("sigma", [False, True], ids=["eps_only", "learned_sigma"])
def test_hybrid_distillation_adds_lits_teacher_terms(sigma):
    from dit.train.objectives.distillation import HybridDistillation

    x0, noise, u = _draws()
    channels = 8 if sigma else 4
    student_out = torch.randn(3, channels, 6, 10)
    teacher_out = torch.randn(3, channels, 6, 10)
    seen = []

    def teacher(xt, t):
        seen.append((xt, t))
        return teacher_out

    config = ObjectiveConfig(teacher="unused-here")
    objective = build_objective(config)
    assert isinstance(objective, HybridDistillation)
    loss, extra = objective.loss(lambda xt, t: student_out, x0, noise, u, teacher_fn=teacher)
    base, _ = DDPMEpsilon(config).loss(lambda xt, t: student_out, x0, noise, u)
    kd_eps = ((student_out[:, :4] - teacher_out[:, :4]) ** 2).flatten(1).mean(1)
    expected = base + 0.5 * kd_eps
    if sigma:
        expected = expected + 0.05 * ((student_out[:, 4:] - teacher_out[:, 4:]) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, expected, atol=1e-6) and ("kd_var" in extra) == sigma
    t = objective.timesteps(u)
    assert len(seen) == 1 and torch.equal(seen[0][1], t)  # the teacher sees the student's noisy input and step
    same, _ = objective.loss(lambda xt, t: student_out, x0, noise, u, teacher_fn=lambda xt, t: student_out)
    assert torch.allclose(same, base, atol=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        objective.loss(lambda xt, t: student_out, x0, noise, u)


@pytest.mark.parametrize("name", ["ddpm_eps", "v", "x0", "x0_shifted", "flow"])
def test_sampling_scheduler_inverts_the_objective(name):
    """An oracle that knows x0 and answers in the objective's own parametrisation, sampled with the objective's
    scheduler (as validation and the shipped pipeline do), lands on x0: the two agree on the convention."""
    shift = 4.0 if name.endswith("_shifted") else 1.0
    name = name.removesuffix("_shifted")
    objective = build_objective(ObjectiveConfig(name=name, discrete=DiscreteConfig(noise_shift=shift)))
    x0 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)

    def oracle(xt, t):
        if name == "flow":
            tt = (t / 1000).to(xt.dtype)
            noise = (xt - (1 - tt) * x0) / tt
            return noise - x0
        a, s = objective.parametrisation.coefficients(torch.full((2,), int(t)), xt)
        noise = (xt - a * x0) / s
        return {"ddpm_eps": noise, "v": a * noise - s * x0, "x0": x0}[name]

    scheduler = objective.sampling_scheduler()
    scheduler.set_timesteps(20)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * getattr(
        scheduler, "init_noise_sigma", 1.0
    )
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t), t, x).prev_sample
    assert (x - x0).abs().max() < 1e-3
