"""bf16 compute weights with fp32 masters (``mixed_precision_weights: bf16``), and the loss read one step late.

The masters are checked against a reference loop written here with explicit bf16 copies (exact), one step against an
autocast step (bf16 tolerance); the trainer's checkpoints hold the fp32 masters and resume exactly; a non-finite loss,
read one step late, still stops the run at its step before anything updated from it is saved.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from dit import PixArtTransformer
from dit.train import Trainer, TrainingDiverged, load_config
from dit.train.config import ConfigError
from dit.train.ema import EMA
from dit.train.precision import MasterWeights, full_precision, master_weights
from dit.train.run.checkpointing import list_checkpoints
from tests.tiny import TINY, _losses, make_features

BF16 = ["mixed_precision=bf16", "mixed_precision_weights=bf16"]
WEIGHTS = {"fp32": ["mixed_precision=bf16"], "bf16": BF16}


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: these tests train in bf16, others in fp32; each starts and leaves it
    fresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _config(features: Path, out: Path, *overrides: str):
    return load_config(TINY, [f"data.path={features}", f"output_dir={out}", "report_to=none", *overrides])


# ----- the option ------------------------------------------------------------------------------------------------
def test_the_option_loads_from_yaml_and_bad_values_name_the_allowed_ones(tmp_path):
    assert load_config(TINY).mixed_precision_weights == "fp32"  # off by default: existing runs are unchanged
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "mixed_precision": "bf16",
                                    "mixed_precision_weights": "bf16"}))  # fmt: skip
    assert load_config(path).mixed_precision_weights == "bf16"
    with pytest.raises(ConfigError, match=r"config.mixed_precision_weights: 'fp16' is not one of 'fp32', 'bf16'"):
        load_config(TINY, ["mixed_precision_weights=fp16"])
    with pytest.raises(ConfigError, match=r"mixed_precision_weights=bf16 needs mixed_precision=bf16 \(got 'no'\)"):
        load_config(TINY, ["mixed_precision_weights=bf16"])


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_sharded_engines_are_refused(engine):
    accelerator = SimpleNamespace(
        is_fsdp2=engine == "fsdp2",
        distributed_type=DistributedType.FSDP if engine == "fsdp2" else DistributedType.DEEPSPEED,
        device=torch.device("cpu"),
    )
    config = load_config(TINY, BF16)
    expected = "MixedPrecisionPolicy" if engine == "fsdp2" else "bf16.enabled in the DeepSpeed config"
    with pytest.raises(ConfigError, match=f"mixed_precision_weights=bf16 does not combine .*{expected}"):
        master_weights(torch.nn.Linear(2, 2), config, accelerator)
    assert master_weights(torch.nn.Linear(2, 2), load_config(TINY), accelerator) is None  # off: nothing refused


# ----- fp32-master semantics against a reference loop -------------------------------------------------------------
class Net(torch.nn.Module):
    """A small MLP with a LayerNorm (autocast runs it in fp32), a frozen layer and a parameter that gets no gradient."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.out(self.norm(F.gelu(self.inp(x)))))  # (B, 4)


def _batches(steps: int, accumulate: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1)
    return [[(torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)) for _ in range(accumulate)]
            for _ in range(steps)]  # fmt: skip


def _backward(model: torch.nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        (loss / len(micro)).backward()


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _with_masters(model: torch.nn.Module, batches, clip: float | None) -> MasterWeights:
    masters = MasterWeights(model)
    optimizer = _adamw(masters.masters)
    for micro in batches:
        _backward(model, micro)
        masters.grads_to_masters()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(masters.masters, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.refresh()
    return masters


def _reference(model: torch.nn.Module, batches, clip: float | None) -> list[torch.Tensor]:
    """fp32 masters stepped with fp32 copies of the gradients of a bf16 copy of the model made anew every step."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_() for n, p in model.named_parameters() if n in names]
    optimizer = _adamw(masters)
    for micro in batches:
        compute = copy.deepcopy(model)
        params = dict(compute.named_parameters())
        with torch.no_grad():
            for name, master in zip(names, masters):
                params[name].data = master.detach().to(torch.bfloat16)
        _backward(compute, micro)
        for name, master in zip(names, masters):
            grad = params[name].grad
            master.grad = None if grad is None else grad.float()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(masters, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return masters


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_masters_follow_the_reference_loop_exactly(accumulate, clip):
    torch.manual_seed(0)
    model = Net()
    unused = model.unused.detach().clone()
    reference = _reference(copy.deepcopy(model), _batches(4, accumulate), clip)
    masters = _with_masters(model, _batches(4, accumulate), clip)
    assert len(masters.masters) == len(reference) == 7  # trainable only: the frozen layer has none
    for name, ours, theirs in zip(masters.names, masters.masters, reference):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), name
    for name, param in model.named_parameters():
        expected = torch.bfloat16 if param.requires_grad else torch.float32
        assert param.dtype == expected, name
    for param, master in zip(masters.params, masters.masters):
        assert torch.equal(param, master.to(torch.bfloat16))  # the compute weights are the rounded masters
    assert torch.equal(masters.named()["unused"], unused)  # no gradient: the optimizer skips it


def test_one_step_equals_an_autocast_step_within_bf16_tolerance():
    torch.manual_seed(0)
    model = Net()
    autocast = copy.deepcopy(model)
    batches = _batches(1, 1)
    masters = _with_masters(model, batches, clip=None)
    optimizer = _adamw([p for p in autocast.parameters() if p.requires_grad])
    _backward(autocast, batches[0])
    optimizer.step()
    for name, ours in masters.named().items():
        theirs = dict(autocast.named_parameters())[name]
        torch.testing.assert_close(ours, theirs, rtol=1.6e-2, atol=1e-3)


def test_full_precision_shows_the_masters_to_the_ema_and_to_loads():
    torch.manual_seed(0)
    model = Net()
    masters = MasterWeights(model)
    with full_precision(masters):
        ema = EMA(model, 0.5)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(ema.shadow[n], m) for n, m in masters.named().items())
    assert any(not torch.equal(m, p.float()) for m, p in zip(masters.masters, masters.params))  # bf16 is rounded
    with full_precision(masters, writes=True):
        model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    assert torch.equal(masters.named()["inp.weight"], ema.shadow["inp.weight"] + 1)
    assert torch.equal(model.inp.weight, (ema.shadow["inp.weight"] + 1).to(torch.bfloat16))  # refreshed


# ----- the trainer ------------------------------------------------------------------------------------------------
def test_checkpoints_hold_the_fp32_masters_and_resume_exactly(features, tmp_path, monkeypatch):
    followed, update = [], EMA.update

    def recorded(self, model):
        followed.append({p.dtype for p in self._followed(model)})
        return update(self, model)

    monkeypatch.setattr(EMA, "update", recorded)
    full = Trainer(_config(features, tmp_path / "full", *BF16))
    losses = full.train()
    assert followed == [{torch.float32}] * 6  # the EMA follows the fp32 masters
    assert len(losses) == 6 and all(p.dtype == torch.bfloat16 for p in full.masters.params)
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-6"
    saved = load_file(checkpoint / "model" / "diffusion_pytorch_model.safetensors")
    state = load_file(checkpoint / "state" / "model.safetensors")
    for name, master in full.masters.named().items():
        assert saved[name].dtype == state[name].dtype == torch.float32, name
        assert torch.equal(saved[name], master.cpu()) and torch.equal(state[name], master.cpu()), name
    first = Trainer(_config(features, tmp_path / "split", *BF16, "max_steps=3")).train()
    resumed = Trainer(_config(features, tmp_path / "split", *BF16, "resume=latest")).train()
    assert first + resumed == losses
    for folder in ("model", "model_ema"):
        split = tmp_path / "split" / "checkpoints" / "checkpoint-6" / folder / "diffusion_pytorch_model.safetensors"
        ours = load_file(split)
        for name, tensor in load_file(checkpoint / folder / "diffusion_pytorch_model.safetensors").items():
            assert torch.equal(ours[name], tensor), (folder, name)


def test_a_step_of_the_trainer_is_an_autocast_step_within_bf16_tolerance(features, tmp_path):
    weights = {}
    for name, overrides in WEIGHTS.items():
        Trainer(_config(features, tmp_path / name, *overrides, "max_steps=1", "pipeline=false")).train()
        model = tmp_path / name / "checkpoints" / "checkpoint-1" / "model"
        weights[name] = PixArtTransformer.from_pretrained(model).state_dict()
    for name, tensor in weights["bf16"].items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, weights["fp32"][name], rtol=1.6e-2, atol=2e-3, msg=name)


def test_a_lora_run_keeps_masters_of_the_lora_only(features, tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(_config(features, tmp_path, *BF16, "model.lora_rank=4", "max_steps=2", "optim.lr=0.05"))
    losses = trainer.train()
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    assert trainer.masters.names and all("lora_" in name for name in trainer.masters.names)
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float32 for p in frozen)
    fused = PixArtTransformer.from_pretrained(tmp_path / "pipeline" / "transformer")
    assert fused.proj_out.weight.dtype == torch.float32


# ----- the loss read one step late ----------------------------------------------------------------------------------
def test_each_loss_is_read_after_the_next_step_was_launched_or_before_a_save(features, tmp_path, monkeypatch):
    events = []
    step, read = Trainer._optimizer_step, Trainer._read_figures

    def stepped(self, *args):
        events.append(("step", self.step + 1))
        return step(self, *args)

    monkeypatch.setattr(Trainer, "_optimizer_step", stepped)
    monkeypatch.setattr(Trainer, "_read_figures", lambda self, figures: events.append("read") or read(self, figures))
    Trainer(_config(features, tmp_path, *BF16, "checkpoint_every=3", "pipeline=false")).train()
    launched = [e for e in events if e != "read"]
    assert launched == [("step", s) for s in range(1, 7)]
    # step k's loss is read after step k+1 was launched, except at the checkpoint steps 3 and 6 (read before saving)
    order = ["s1", "s2", "r", "s3", "r", "r", "s4", "s5", "r", "s6", "r", "r"]
    assert ["r" if e == "read" else f"s{e[1]}" for e in events] == order
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5, 6
    ]  # fmt: skip


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
@pytest.mark.parametrize("bad_step", [3, 5, 6])
def test_a_non_finite_loss_read_late_stops_at_its_step_before_any_save(features, tmp_path, monkeypatch, weights,
                                                                        bad_step):  # fmt: skip
    """Checkpoints every 3 steps of 6: a NaN at a checkpoint step (3), between two (5) and at the last step (6)."""
    original = Trainer._loss

    def poisoned(self, batch, micro_step):
        loss, per_sample = original(self, batch, micro_step)
        if micro_step >= bad_step - 1:
            return loss * float("nan"), per_sample * float("nan")
        return loss, per_sample

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=f"Loss is nan at step {bad_step};"):
        Trainer(_config(features, tmp_path, *WEIGHTS[weights], "checkpoint_every=3")).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == (["checkpoint-3"] if bad_step > 3 else [])
    assert not (tmp_path / "pipeline").exists()
    assert len(_losses(tmp_path)) == bad_step - 1  # the steps before it were logged, the bad one never
    for checkpoint in list_checkpoints(tmp_path):
        for folder in ("model", "model_ema"):
            tensors = load_file(checkpoint / folder / "diffusion_pytorch_model.safetensors")
            assert all(torch.isfinite(t).all() for t in tensors.values()), (checkpoint, folder)


def test_compiled_blocks_train_in_bf16(features, tmp_path):
    """compile: true with mixed_precision: bf16 and bf16 compute weights (the CPU's half-precision probe used to
    break the graph, with fp32 weights under autocast too): the eager run's losses."""
    import torch._dynamo

    torch._dynamo.reset()
    common = ["max_steps=2", *BF16]
    eager = Trainer(_config(features, tmp_path / "eager", *common)).train()
    compiled = Trainer(_config(features, tmp_path / "compiled", *common, "compile=true", "compile_backend=aot_eager"))
    torch.testing.assert_close(torch.tensor(compiled.train()), torch.tensor(eager), rtol=2e-2, atol=1e-3)
    torch._dynamo.reset()
