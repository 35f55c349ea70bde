"""Objectives: zero loss at the exact target, the VLB term, min-SNR weights, logit-normal timesteps."""

import pytest
import torch

from dit.train.config import ConfigError, ObjectiveConfig
from dit.train.objectives import DDPMEpsilon, RectifiedFlow, VPrediction, build_objective

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
    abar = v.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(v.loss(lambda xt, tt: target, x0, noise, u)[0], torch.zeros(3), atol=1e-10)
    flow = RectifiedFlow(ObjectiveConfig(name="flow"))
    assert torch.allclose(flow.loss(lambda xt, tt: noise - x0, x0, noise, u)[0], torch.zeros(3), atol=1e-10)


def test_min_snr_weights():
    config = ObjectiveConfig(min_snr_gamma=5.0)
    eps, vpred = DDPMEpsilon(config), VPrediction(config)
    t = torch.tensor([10, 500, 990])
    snr = eps.snr(t)
    assert torch.allclose(eps._min_snr_weight(t, False), torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(vpred._min_snr_weight(t, True), torch.clamp(snr, max=5.0) / (snr + 1))
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        RectifiedFlow(ObjectiveConfig(name="flow", min_snr_gamma=5.0))


def test_logit_normal_timesteps():
    flow = RectifiedFlow(ObjectiveConfig(name="flow", logit_normal_mean=0.0, logit_normal_std=1.0))
    t = flow.timesteps(torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item()) < 0.05 and abs(logits.std().item() - 1.0) < 0.05


def test_unknown_objective_is_named():
    with pytest.raises(ConfigError, match="'edm'"):
        build_objective(ObjectiveConfig(name="edm"))
