"""LCM consistency distillation: boundary condition, DDIM solver step, guidance modes, target network, LoRA
students, exact resume."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from dit import PixArtTransformer
from dit.pipelines import TextToImagePipeline
from dit.pipelines.lcm import lcm_defaults
from dit.train import Trainer, load_config
from dit.train.config import ConfigError, LCMConfig, ObjectiveConfig
from dit.train.ema import target_network as TargetNetwork
from dit.train.objectives.build import build_objective
from dit.train.objectives.consistency import ConsistencyDistillation, consistency_loss
from tests.tiny import TINY, _losses, launch_two_processes, make_features, tiny_t5, tiny_tokenizer, tiny_vae

SHAPE = (3, 4, 6, 10)
PREDICTION_TYPES = {"ddpm_eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _lcm(name: str = "v", **lcm) -> ConsistencyDistillation:
    config = ObjectiveConfig(name=name, distill="lcm", teacher="teacher", lcm=LCMConfig(**lcm))
    return build_objective(config)


def _randn(*shape, seed=0):
    return torch.randn(shape or SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ddpm_eps", "v", "x0", "flow"])
def test_boundary_condition_at_the_smallest_timestep(name):
    """f(x, 0) = x exactly (c_skip = 1, c_out = 0), whatever the network predicts; not so one solver step up."""
    objective = _lcm(name)
    x, pred = _randn(seed=1), _randn(seed=2)
    assert torch.equal(objective.consistency(pred, x, torch.zeros(SHAPE[0], dtype=objective.grid.dtype)), x)
    first = objective.grid[:1].expand(SHAPE[0])
    assert not torch.allclose(objective.consistency(pred, x, first), x, atol=1e-3)


def test_lcm_scalings_are_diffusers_lcm_schedulers():
    """c_skip, c_out with timestep scaling 10 and sigma_data 0.5: the values LCMScheduler samples with."""
    objective = _lcm("v")
    scheduler = objective.sampling_scheduler()
    for t in (0, 19, 499, 999):
        ours = objective.parametrisation.consistency_scalings(torch.tensor([t]), 10.0)
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert torch.allclose(torch.cat(ours), torch.tensor(theirs, dtype=torch.float32), atol=1e-7)


def test_solver_grid_and_skip():
    objective = _lcm("v", num_ddim_timesteps=50)
    assert objective.grid[:3].tolist() == [19, 39, 59] and objective.grid[-1] == 999
    assert objective.previous[:3].tolist() == [0, 19, 39]  # t_n = max(t_{n+k} - 20, 0), as PixArt-δ's solver
    with pytest.raises(ConfigError, match="lcm.num_ddim_timesteps: 0 is out of range"):
        _lcm("v", num_ddim_timesteps=0)
    with pytest.raises(ConfigError, match="the solver grid of a discrete schedule has at most"):
        _lcm("v", num_ddim_timesteps=1001)
    assert len(_lcm("flow", num_ddim_timesteps=1001).grid) == 1001  # flow's grid is continuous


@pytest.mark.parametrize("name", ["ddpm_eps", "v", "x0"])
def test_solver_step_is_a_ddim_step(name):
    """One solver step x_t -> x_{t-20} equals diffusers' DDIMScheduler.step (eta 0) on the same prediction."""
    objective = _lcm(name)
    ddim = DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type=PREDICTION_TYPES[name],
        set_alpha_to_one=False, clip_sample=False,
    )  # fmt: skip
    ddim.set_timesteps(50)  # previous timestep = t - 1000 // 50
    for t in (19, 39, 519, 999):
        x, pred = _randn(seed=t), _randn(seed=t + 1)
        ours = objective.solver_step(pred, x, torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), max(t - 20, 0)))
        theirs = ddim.step(pred, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_flow_solver_step_is_an_euler_step():
    objective = _lcm("flow", num_ddim_timesteps=10)
    x, v = _randn(seed=1), _randn(seed=2)
    t, t_prev = torch.full((SHAPE[0],), 0.6), torch.full((SHAPE[0],), 0.5)
    torch.testing.assert_close(objective.solver_step(v, x, t, t_prev), x + (0.5 - 0.6) * v)


def _networks(teacher_cond, teacher_uncond, target_out, seen: dict):
    def teacher(xt, t, uncond=False):
        return teacher_uncond if uncond else teacher_cond

    def target(xt, t, guidance=None):
        seen.update(target_x=xt, target_t=t, target_guidance=guidance)
        return target_out

    def student(xt, t, guidance=None):
        seen.update(student_t=t, student_guidance=guidance)
        return torch.zeros_like(xt)

    return student, teacher, target


@pytest.mark.parametrize("embedded", [False, True])
def test_loss_uses_the_guided_teacher_step_and_the_target(embedded):
    """The target is f_target(DDIM step of the guided teacher) and the student sees the guidance only when it is
    embedded; the loss is LCM's pseudo-Huber between student and target."""
    lcm = dict(guidance_range=(2.0, 6.0)) if embedded else dict(guidance_scale=4.5)
    objective = _lcm("v", loss="huber", **lcm)
    x0, noise, u, gu = _randn(seed=1), _randn(seed=2), torch.tensor([0.0, 0.5, 0.99]), torch.tensor([0.0, 0.5, 1.0])
    cond, uncond, target_out, seen = _randn(seed=3), _randn(seed=4), _randn(seed=5), {}
    student, teacher, target = _networks(cond, uncond, target_out, seen)
    loss, _ = objective.loss(student, x0, noise, u, teacher_fn=teacher, target_fn=target, guidance_uniform=gu)

    t, t_prev = objective.timesteps(u), objective.previous[(u * 50).long().clamp(max=49)]
    g = torch.tensor([2.0, 4.0, 6.0]) if embedded else torch.full((3,), 4.5)
    noisy = objective.parametrisation.add_noise(x0, noise, t)
    guided = uncond + g.view(-1, 1, 1, 1) * (cond - uncond)
    x_prev = objective.solver_step(guided, noisy, t, t_prev)
    expected_target = objective.consistency(target_out, x_prev, t_prev)
    prediction = objective.consistency(torch.zeros_like(x0), noisy, t)
    torch.testing.assert_close(seen["target_x"], x_prev)
    torch.testing.assert_close(loss, consistency_loss(prediction, expected_target, "huber", 0.001))
    if embedded:
        torch.testing.assert_close(seen["student_guidance"], g) and torch.testing.assert_close(
            seen["target_guidance"], g
        )
    else:
        assert seen["student_guidance"] is None and seen["target_guidance"] is None


def test_huber_and_l2():
    a, b = torch.zeros(2, 3), torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    assert torch.allclose(consistency_loss(a, b, "l2", 0.001), torch.tensor([0.0, 25 / 3]))
    huber = consistency_loss(a, b, "huber", 1.0)
    assert torch.allclose(huber, torch.tensor([0.0, (math.sqrt(10) - 1 + math.sqrt(17) - 1) / 3]))


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="lcm.loss"):
        _lcm(loss="l1")
    with pytest.raises(ConfigError, match="guidance_range"):
        _lcm(guidance_range=(5.0, 2.0))
    with pytest.raises(ConfigError, match="target_ema"):
        _lcm(target_ema=1.0)
    with pytest.raises(ConfigError, match="objective.teacher"):
        build_objective(ObjectiveConfig(name="v", distill="lcm"))


def _partly_frozen() -> torch.nn.Linear:
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    return layer


def test_target_network_is_an_ema_of_the_trainable_weights():
    student = _partly_frozen()
    target = TargetNetwork(student, decay=0.95)
    before_w, before_b = target.module.weight.clone(), target.module.bias.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
        student.bias.add_(1.0)
    target.update(student)
    torch.testing.assert_close(target.module.weight, before_w + 0.05)
    assert torch.equal(target.module.bias, before_b)  # frozen weights are not tracked
    state = target.state_dict()
    other = TargetNetwork(_partly_frozen(), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.95 and torch.equal(other.module.weight, target.module.weight)


# ----- in the trainer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(3)
    model = PixArtTransformer(**load_config(TINY, ["data.path=x"]).model.kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


def _config(features: Path, teacher: Path, out: Path, *overrides: str):
    return load_config(
        TINY,
        [f"data.path={features}", f"output_dir={out}", "objective.name=v", "objective.distill=lcm",
         f"objective.teacher={teacher}", f"model.pretrained={teacher}", "data.caption_dropout=0",
         "ema_decay=null", *overrides],
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["fixed", "embedded", "lora"])
def test_exact_resume(features, teacher, tmp_path, mode):
    """Steps 4-6 after resuming from step 3 equal the uninterrupted run's, target network included."""
    extra = {
        "fixed": [],
        "embedded": ["model.pretrained=null", f"model.inherit_from={teacher}", "model.kwargs.time_cond_proj_dim=16",
                     "objective.lcm.guidance_range=[2.0,6.0]"],
        "lora": ["model.lora_rank=4", "objective.lcm.target_ema=null"],
    }[mode]  # fmt: skip
    uninterrupted = Trainer(_config(features, teacher, tmp_path / "full", *extra))
    full = uninterrupted.train()
    assert len(full) == 6 and all(map(math.isfinite, full))
    Trainer(_config(features, teacher, tmp_path / "split", *extra, "max_steps=3")).train()
    resumed = Trainer(_config(features, teacher, tmp_path / "split", *extra, "resume=latest"))
    assert resumed.train() == full[3:]
    assert (resumed.target is None) == (mode == "lora")  # LCM-LoRA: the student is its own target
    if resumed.target is not None:
        for name in resumed.target.names:
            assert torch.equal(resumed.target._params[name], uninterrupted.target._params[name]), name
    # the run ends with an LCM folder for load_lcm / dit generate --lcm-folder
    lcm = tmp_path / "full" / "lcm"
    assert lcm_defaults(lcm) == {"num_inference_steps": 4, "guidance_scale": 4.5 if mode == "embedded" else 1.0}
    assert (lcm / "transformer").is_dir() == (mode != "lora") and (lcm / "scheduler").is_dir()


def test_guidance_modes_must_match_the_student(features, teacher, tmp_path):
    with pytest.raises(ConfigError, match="time_cond_proj_dim"):
        Trainer(_config(features, teacher, tmp_path, "objective.lcm.guidance_range=[2.0,6.0]"))


def test_lora_student_loads_onto_the_base(features, teacher, tmp_path):
    """LCM-LoRA: only the LoRA trains, the checkpoint holds the LoRA alone, and the pipeline's load_lora_weights
    puts it on the base model so that it computes what the trained student computes."""
    trainer = Trainer(_config(features, teacher, tmp_path, "model.lora_rank=4", "objective.lcm.target_ema=null",
                              "optim.lr=0.05", "max_steps=3"))  # fmt: skip
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.model).eval().cpu()  # beside the pipeline (CUDA in tests/gpu)
    folder = tmp_path / "checkpoints" / "checkpoint-3" / "model"
    assert [p.name for p in folder.iterdir()] == ["pytorch_lora_weights.safetensors"]

    pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=PixArtTransformer.from_pretrained(teacher), scheduler=None)  # fmt: skip
    x, text, t = _randn(2, 4, 8, 8, seed=1), _randn(2, 6, 32, seed=2), torch.tensor([500, 20])
    with torch.no_grad():
        base_out = pipe.transformer(x, text, t).sample
        pipe.load_lora_weights(folder)
        loaded_out = pipe.transformer(x, text, t).sample
        student_out = student(x, text, t).sample
    torch.testing.assert_close(loaded_out, student_out, rtol=1e-5, atol=1e-6)
    assert (loaded_out - base_out).abs().max() > 1e-4  # the LoRA changed the model
    frozen = PixArtTransformer.from_pretrained(teacher)
    base_weight = dict(student.named_parameters())["proj_out.base_layer.weight"]
    assert torch.equal(base_weight, frozen.proj_out.weight)  # the base stays frozen


def test_pipeline_lcm_sampling_modes():
    """Fixed guidance: guidance_scale=1 means one transformer call per step without CFG. Embedded guidance: one
    call per step at any scale, with the scale as the model's guidance input."""
    from tests.tiny import SIGMA

    for dim in (None, 16):
        transformer = PixArtTransformer(**SIGMA, time_cond_proj_dim=dim).eval()
        calls = []
        transformer.register_forward_hook(
            lambda m, a, kwargs, out, calls=calls: calls.append(kwargs), with_kwargs=True
        )
        pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                                   transformer=transformer, scheduler=_lcm("v").sampling_scheduler())  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        scale = 1.0 if dim is None else 4.0
        image = pipe("a red circle", num_inference_steps=2, guidance_scale=scale, output_type="np").images
        assert image.shape == (1, 16, 16, 3) and len(calls) == 2
        assert all(c["encoder_hidden_states"].shape[0] == 1 for c in calls)  # no CFG batch
        assert ("guidance" in calls[0]) == (dim is not None)  # the model embeds the scale itself


def test_two_processes_match_one(features, teacher, tmp_path):
    """LCM distillation over two CPU processes (gloo) gives the one-process losses (same global batch)."""
    overrides = [f"data.path={features}", "objective.name=v", "objective.distill=lcm", "data.caption_dropout=0",
                 f"objective.teacher={teacher}", f"model.pretrained={teacher}", "ema_decay=null",
                 "max_steps=3", "checkpoint_every=100"]  # fmt: skip
    Trainer(load_config(TINY, [*overrides, f"output_dir={tmp_path / 'one'}"])).train()
    two = launch_two_processes(overrides, tmp_path / "two")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(_losses(tmp_path / "one")), rtol=1e-4, atol=1e-6)
