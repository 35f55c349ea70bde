"""Training features as plug-ins: one check of the whole set at trainer start, capabilities read from class
attributes, what each feature adds to a step, a distillation method that plugs in without touching the loop, and the
split of the objectives into losses and parametrisations."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dit import MicroDiTTransformer, PixArtTransformer
from dit.nn.masking import patch_loss_mask
from dit.pipelines.schedulers import prediction_of
from dit.train import Trainer, load_config
from dit.train.config import DISTILLATIONS, ConfigError, LCMConfig, MaskingConfig, ObjectiveConfig
from dit.train.data.dataset import padding_mask
from dit.train.features.base import Contribution, Feature, StepInputs, check_features, merge
from dit.train.features.controlnet import ControlNetTraining
from dit.train.features.masking import TokenMasking
from dit.train.features.mixed_sizes import MixedSizes
from dit.train.objectives.build import build_objective, distillation_class
from dit.train.objectives.consistency import ConsistencyDistillation
from dit.train.objectives.distillation import Distillation, HybridDistillation
from dit.train.objectives.losses import OBJECTIVES
from dit.train.objectives.parametrisation import PARAMETRISATIONS, Parametrisation
from tests.tiny import MICRODIT, TINY, _losses, make_features, randomize_

PIXART = load_config(TINY, ["data.path=x"]).model.kwargs

#: Every pair of features that cannot be combined (a distillation by its objective.distill name).
EXCLUDED = {
    ("masking", "controlnet"), ("masking", "mixed_sizes"), ("masking", "lcm"), ("mixed_sizes", "controlnet"),
    ("mixed_sizes", "hybrid"), ("mixed_sizes", "lcm"), ("controlnet", "hybrid"), ("controlnet", "lcm"),
}  # fmt: skip


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(3)
    randomize_(PixArtTransformer(**PIXART), std=0.05).save_pretrained(folder)
    return folder


def _overrides(name: str, teacher: Path) -> list[str]:
    """The settings that turn feature ``name`` on."""
    return {
        "masking": ["masking.ratio=0.5"],
        "mixed_sizes": ["data.mixed_sizes=true"],
        "controlnet": ["controlnet.num_blocks=1"],
        "hybrid": [f"objective.teacher={teacher}"],
        "lcm": ["objective.distill=lcm", f"objective.teacher={teacher}"],
    }[name]


def _classes() -> dict[str, type]:
    """The feature classes by the setting's name that turns each on (a distillation: its ``objective.distill``)."""
    distillations = {name: distillation_class(name) for name in DISTILLATIONS}
    return {"masking": TokenMasking, "mixed_sizes": MixedSizes, "controlnet": ControlNetTraining, **distillations}


def test_the_distillation_table_is_the_one_place_their_names_live():
    """``objective.distill``'s names are the keys of ``config.DISTILLATIONS``, known without importing any method
    (``dit train --help`` and the config need no torch); asking for one imports the class the table names. No class
    carries the name or registers itself: every method is the feature ``distillation``."""
    code = (
        "import sys; from dit.train.config import DISTILLATIONS; from dit.train.objectives import build; "
        "assert not {'dit.train.objectives.consistency', 'dit.train.objectives.distillation'} & set(sys.modules); "
        "print(sorted(DISTILLATIONS), build.distillation_class('lcm').__name__, "
        "build.distillation_class('hybrid').__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['hybrid',", "'lcm']", "ConsistencyDistillation", "HybridDistillation"]
    for name, where in DISTILLATIONS.items():
        cls = distillation_class(name)
        assert f"{cls.__module__}:{cls.__qualname__}" == where and issubclass(cls, Distillation)
        assert cls.name == "distillation" and name not in vars(cls).values()
    assert distillation_class(None) is None
    with pytest.raises(ConfigError, match="unknown distillation 'nope'; use 'hybrid' or 'lcm'"):
        distillation_class("nope")
    with pytest.raises(ConfigError, match="unknown distillation 'nope'"):
        load_config(TINY, ["data.path=x", "objective.distill=nope", "objective.teacher=t"])


# ----- the one check ---------------------------------------------------------------------------------------------
def test_the_declared_exclusions_are_the_pairs_refused():
    classes = _classes()
    declared = {
        frozenset((a, b))
        for a, b in itertools.combinations(sorted(classes), 2)
        if classes[b].name in classes[a].excludes or classes[a].name in classes[b].excludes
    }
    assert declared == {frozenset(pair) for pair in EXCLUDED}


@pytest.mark.parametrize("pair", sorted(EXCLUDED), ids="+".join)
def test_a_pair_that_cannot_combine_is_refused_at_start_naming_both(features, teacher, tmp_path, pair):
    overrides = [f"data.path={features}", f"output_dir={tmp_path}", *_overrides(pair[0], teacher)]
    config = load_config(TINY, [*overrides, *_overrides(pair[1], teacher)])
    with pytest.raises(ConfigError) as caught:
        Trainer(config)
    message, classes = str(caught.value), _classes()
    assert classes[pair[0]].label in message and classes[pair[1]].label in message
    assert "does not combine with" in message
    assert caught.traceback[-1].name == "check_features"  # one place refuses every pair
    assert not (tmp_path / ".lock").exists()


class _Dummy(nn.Module):
    """A backbone that declares its capabilities as class attributes, whatever its forward takes."""

    supports_token_masking = False
    supports_image_sizes = True
    supports_block_controls = False
    needs_full_grid = False

    def forward(self, hidden_states, keep_indices=None, image_sizes=None, block_controls=None):
        return hidden_states


def test_capabilities_are_the_backbones_class_attributes():
    masking = TokenMasking(MaskingConfig(ratio=0.5), patch_size=2, max_steps=4)
    with pytest.raises(ConfigError, match=r"token masking.*keep_indices; _Dummy does not \(supports_token_masking"):
        check_features([masking], _Dummy())  # its forward takes keep_indices: the declaration decides
    check_features([MixedSizes()], _Dummy())
    capable = type("Capable", (_Dummy,), {"supports_token_masking": True})
    check_features([masking], capable())
    grid = type("NeedsGrid", (capable,), {"needs_full_grid": True})
    with pytest.raises(ConfigError, match="full grid"):
        check_features([masking], grid())
    config = load_config(TINY, ["data.path=x", "controlnet.num_blocks=1", "model.pretrained=x"])
    with pytest.raises(ConfigError, match=r"ControlNet training.*block_controls.*supports_block_controls is false"):
        check_features([ControlNetTraining(config)], _Dummy())


def test_the_real_backbones_declare_what_the_features_read():
    from dit import FiTTransformer, LiTTransformer

    assert PixArtTransformer.supports_token_masking and not PixArtTransformer.supports_image_sizes
    assert FiTTransformer.supports_image_sizes and FiTTransformer.supports_block_controls
    assert MicroDiTTransformer.supports_token_masking
    assert LiTTransformer(**PIXART).needs_full_grid and not PixArtTransformer(**PIXART).needs_full_grid


# ----- what features add to a step -------------------------------------------------------------------------------
def _inputs(step: int = 0, **batch) -> StepInputs:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 6, 10, generator=gen)
    draws = {"mask": torch.rand(2, 6, 10, generator=gen), "noise": torch.randn(2, 4, 6, 10, generator=gen)}
    return StepInputs(step, batch, latents, draws)


def test_masking_contributes_kept_tokens_and_their_loss_mask_on_masked_steps_only():
    masking = TokenMasking(MaskingConfig(ratio=0.5, unmasked_steps=1), patch_size=2, max_steps=3)
    inputs = _inputs(step=1)
    part = masking.contribute(inputs)
    keep, mask = masking.draw(inputs.draws["mask"])
    assert set(part.student) == {"keep_indices"} and torch.equal(part.student["keep_indices"], keep)
    assert torch.equal(part.loss_mask, mask) and torch.equal(mask, patch_loss_mask(keep, (3, 5), 2))
    assert masking.needs_token_draws(1) and not masking.needs_token_draws(2)
    assert masking.contribute(_inputs(step=2)) == Contribution()  # the unmasked fine-tune
    assert masking.stats(2) == {"mask_ratio": 0.5} and masking.stats(3) == {"mask_ratio": 0.0}


def test_mixed_sizes_and_controlnet_contribute_their_batch_entries():
    sizes, control = torch.tensor([[6, 10], [4, 6]]), torch.randn(2, 4, 6, 10)
    inputs = _inputs(image_sizes=sizes, control_latent=control)
    part = MixedSizes().contribute(inputs)
    assert part.student == {"image_sizes": sizes}
    assert torch.equal(part.loss_mask, padding_mask(sizes, 6, 10))
    config = load_config(TINY, ["data.path=x", "controlnet.num_blocks=1"])
    part = ControlNetTraining(config).contribute(inputs)
    assert torch.equal(part.student["controlnet_cond"], control) and part.loss_mask is None


def test_merge_joins_the_students_arguments_and_multiplies_the_masks():
    a = Contribution({"keep_indices": 1}, torch.tensor([1.0, 1.0, 0.0]))
    b = Contribution({"image_sizes": 2}, torch.tensor([1.0, 0.0, 1.0]))
    merged = merge([a, Contribution(), b])
    assert merged.student == {"keep_indices": 1, "image_sizes": 2}
    assert merged.loss_mask.tolist() == [1.0, 0.0, 0.0]
    assert merge([]) == Contribution()


def test_distillations_add_nothing_to_the_students_call():
    config = ObjectiveConfig(name="v", teacher="t")
    for objective in (
        build_objective(config),
        ConsistencyDistillation(build_objective(ObjectiveConfig()), LCMConfig()),
    ):
        assert isinstance(objective, Feature) and objective.contribute(_inputs()) == Contribution()


def test_teacher_calls_get_no_student_feature(features, teacher, tmp_path):
    """Masked hybrid distillation: the student sees keep_indices, the teacher the same inputs without them."""
    masked = [*MICRODIT, "max_steps=2", "masking.unmasked_steps=0"]
    config = load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path}", *masked,
                                f"objective.teacher={teacher}"])  # fmt: skip
    trainer = Trainer(config)
    calls = {"student": [], "teacher": []}
    for name, model in (("student", trainer.accelerator.unwrap_model(trainer.model)), ("teacher", trainer.teacher)):
        model.register_forward_pre_hook(lambda m, a, kw, seen=calls[name]: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        trainer._loss(next(trainer._batches(0, 1)), 0)
    (student,), (teacher_call,) = calls["student"], calls["teacher"]
    assert "keep_indices" in student and "keep_indices" not in teacher_call
    assert set(teacher_call) == {"encoder_attention_mask"}


# ----- a distillation method of one's own -----------------------------------------------------------------------
class _Counter:
    def __init__(self):
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


class _Echo(Distillation):
    """The base loss and a zero-weighted teacher term; counts optimizer steps and exports a file."""

    label = "objective.distill=echo_test"

    def __init__(self, base):
        super().__init__(base)
        self.counter = _Counter()

    def checkpoint_states(self) -> list:
        return [self.counter]

    def after_optimizer_step(self, model) -> None:
        self.counter.steps += 1

    def export(self, run) -> Path:
        path = run.root / "echo.txt"
        path.write_text(str(self.counter.steps))
        return path

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None, teacher_fn=None):
        seen = []

        def student(noisy, t):
            seen.append((noisy, t))
            return model_fn(noisy, t)

        loss, extra = self.base.loss(student, latents, noise, uniform, loss_mask)
        with torch.no_grad():
            teacher = teacher_fn(*seen[0])
        return loss + 0.0 * teacher.float().mean(), extra


@pytest.fixture
def echo(monkeypatch):
    """A row of the distillation table for ``_Echo`` (a method of one's own is one more row)."""
    monkeypatch.setitem(DISTILLATIONS, "echo_test", f"{__name__}:_Echo")
    return _Echo


def test_a_distillation_of_the_table_plugs_in_without_touching_the_loop(features, teacher, tmp_path, echo):
    common = [f"data.path={features}", "max_steps=3", "checkpoint_every=3"]
    plain = Trainer(load_config(TINY, [*common, f"output_dir={tmp_path / 'plain'}"])).train()
    echo_run = [
        f"output_dir={tmp_path / 'echo'}",
        "objective.distill=echo_test",
        f"objective.teacher={teacher}",
    ]
    trainer = Trainer(load_config(TINY, [*common, *echo_run]))
    assert isinstance(trainer.objective, echo) and trainer.objective in trainer.features
    assert trainer.teacher.device == trainer.accelerator.device and not trainer.teacher.training
    assert trainer.accelerator._custom_objects[-1] is trainer.objective.counter  # after the scheduler and the EMA
    assert trainer.train() == plain == _losses(tmp_path / "echo")
    assert trainer.objective.counter.steps == 3 and (tmp_path / "echo" / "echo.txt").read_text() == "3"
    state = tmp_path / "echo" / "checkpoints" / "checkpoint-3" / "state"
    assert {p.name for p in state.glob("custom_checkpoint_*")} == {f"custom_checkpoint_{i}.pkl" for i in range(3)}
    resumed = Trainer(load_config(TINY, [*common, *echo_run, "max_steps=4", "resume=latest"]))
    resumed.train()
    assert resumed.objective.counter.steps == 4  # 3 from the checkpoint, one more


def test_lcm_registers_the_ema_before_its_target_network(features, teacher, tmp_path):
    config = load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path}", "objective.name=v",
                                "objective.distill=lcm", f"objective.teacher={teacher}",
                                f"model.pretrained={teacher}", "data.caption_dropout=0"])  # fmt: skip
    trainer = Trainer(config)
    assert trainer.accelerator._custom_objects == [trainer.scheduler, trainer.ema, trainer.target]
    assert trainer.target.module is not None and trainer.uncond_caption is not None


# ----- losses and their parametrisations -------------------------------------------------------------------------
def _oracle(parametrisation: Parametrisation, x0, noise, t) -> torch.Tensor:
    """The prediction that stands for (x0, noise) in ``parametrisation``."""
    kind = parametrisation.prediction_type
    if kind == "flow":
        return noise - x0
    if kind == "edm":  # EDM's F
        c_skip, c_out, _ = parametrisation.scalings(t, x0)
        return (x0 - c_skip * parametrisation.add_noise(x0, noise, t)) / c_out
    a, s = parametrisation.coefficients(t, x0)
    return {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[kind]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_loss_works_with_its_parametrisation(name):
    config = ObjectiveConfig(name=name)
    objective = OBJECTIVES[name](config)
    p = objective.parametrisation
    assert isinstance(p, objective.parametrisation_class) and PARAMETRISATIONS[p.prediction_type] is type(p)
    gen = torch.Generator().manual_seed(0)
    x0, noise, uniform = torch.randn(3, 4, 6, 6, generator=gen), torch.randn(3, 4, 6, 6, generator=gen), torch.rand(3)
    t = p.timesteps(uniform)
    oracle = _oracle(p, x0, noise, t)
    estimate = p.x0_and_eps(oracle, p.add_noise(x0, noise, t), t)
    torch.testing.assert_close(estimate[0], x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(estimate[1], noise, rtol=1e-3, atol=1e-3)
    loss, _ = objective.loss(lambda noisy, time: oracle, x0, noise, uniform)
    assert torch.allclose(loss, torch.zeros(3), atol=1e-8)
    shared = OBJECTIVES[name](config, parametrisation=p)  # a loss takes a given parametrisation as it is
    assert shared.parametrisation is p and shared.timesteps(uniform).equal(t)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("distill", [None, "hybrid", "lcm"])
def test_sampling_scheduler_is_the_parametrisations(name, distill):
    config = ObjectiveConfig(name=name, distill=distill, teacher="t" if distill else None)
    if (name, distill) == ("edm", "lcm"):
        with pytest.raises(ConfigError, match="objective.distill=lcm with objective.name=edm"):
            build_objective(config)
        return
    objective = build_objective(config)
    p = objective.parametrisation
    scheduler = objective.sampling_scheduler()
    expected = p.consistency_scheduler(50, 10.0) if distill == "lcm" else p.sampling_scheduler()
    assert type(scheduler) is type(expected) and dict(scheduler.config) == dict(expected.config)
    assert prediction_of(scheduler) == p.prediction_type
    if distill:
        assert objective.base.parametrisation is p  # the wrapped loss's parametrisation, shared
    assert isinstance(objective, HybridDistillation) == (distill == "hybrid")


def test_moving_an_objective_moves_its_parametrisation():
    objective = build_objective(ObjectiveConfig(name="v", distill="lcm", teacher="t"))
    names = dict(objective.named_tensors())
    assert {"grid", "previous", "parametrisation.betas", "parametrisation.alphas_cumprod"} <= set(names)
    objective.to("meta")
    assert all(t.device.type == "meta" for _, t in objective.named_tensors())
    assert objective.base.parametrisation.alphas_cumprod.device.type == "meta"


# ----- one EMA class ---------------------------------------------------------------------------------------------
def test_the_target_network_is_an_ema_that_loads_older_target_states():
    from dit.train.ema import EMA, target_network

    student = nn.Linear(3, 2)
    ema, target = EMA(student, 0.9), target_network(student, 0.9)
    assert type(ema) is type(target) is EMA and ema.module is None and isinstance(target.module, nn.Linear)
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student)
    target.update(student)
    torch.testing.assert_close(target.module.weight, ema.shadow["weight"])
    older = {"decay": 0.5, "params": {name: torch.zeros_like(t) for name, t in target.shadow.items()}}
    target.load_state_dict(older)  # a checkpoint written before the target network was an EMA
    assert target.decay == 0.5 and not target.module.weight.any()
    fresh = target_network(nn.Linear(3, 2), 0.1)
    fresh.load_state_dict(ema.state_dict())
    torch.testing.assert_close(fresh.module.weight, ema.shadow["weight"])
