"""The trainer under FSDP2 (accelerate's ``fully_shard``) and the ready accelerate configs in configs/accelerate/.

On a CPU, accelerate 1.15 never turns FSDP on: its ``AcceleratorState`` enables FSDP only for a multi-accelerator
distributed type (MULTI_GPU, ...), and ``cpu=True`` gives MULTI_CPU, so ``accelerate launch --use_fsdp`` with
``ACCELERATE_USE_CPU=true`` trains plain data-parallel without a word. torch's ``fully_shard`` itself runs over gloo
on CPU, so the CPU runs here go through this module's ``__main__``: it promotes the MULTI_CPU state to FSDP with the
launcher's own plugin (nothing else of accelerate changes), then runs ``dit.train``. On CUDA, ``launch_fsdp(cuda=True)``
(bench/fsdp_check.py) runs ``dit.train`` as it is.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dit import PixArtTransformer
from dit.train import Trainer, load_config
from tests.tiny import TINY, _losses, free_port, make_features

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"


def launch_fsdp(
    overrides: list[str],
    out: Path,
    port: int | None = None,
    processes: int = 2,
    mixed_precision: str = "no",
    cuda: bool = False,
) -> list[float]:
    """``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` of the trainer with ``processes`` processes,
    on the CPU over gloo (through this module's ``__main__``) or, with ``cuda``, one per GPU as a user launches it;
    returns the run's logged losses. ``port`` defaults to a free one."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    entry = "dit.train" if cuda else "tests.train.test_fsdp"
    cmd = [accelerate, "launch", "--config_file", str(CONFIGS / "fsdp2.yaml"), "--num_processes", str(processes),
           "--mixed_precision", mixed_precision, "--main_process_port", str(port or free_port()), "-m", entry, "--config", str(TINY),
           *overrides, f"mixed_precision={mixed_precision}", f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _losses(out)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return PixArtTransformer.from_pretrained(folder).state_dict()


def test_accelerate_configs_use_accelerates_field_names():
    """Every config loads in accelerate's launcher (unknown keys are an error there), every engine key is a launch
    option, and fsdp2.yaml builds the intended FullyShardedDataParallelPlugin from the launcher's environment."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    options = {action.dest for action in parser._actions}
    launched = {}
    for name in ("fsdp2", "deepspeed_zero2", "multi_gpu", "multi_node"):
        args, config, _ = _validate_launch_command(parser.parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "x.py"]))  # fmt: skip
        assert set(config.fsdp_config) | set(config.deepspeed_config) <= options, name
        assert args.mixed_precision == "bf16" and args.dynamo_backend == "no", name
        launched[name] = args
    assert launched["multi_gpu"].multi_gpu and launched["multi_gpu"].num_processes == 8
    node = launched["multi_node"]
    assert (node.num_machines, node.num_processes, node.machine_rank) == (2, 16, 0) and node.main_process_ip
    deepspeed = launched["deepspeed_zero2"]
    assert deepspeed.use_deepspeed and deepspeed.zero_stage == 2
    zero2 = set(load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config)
    assert zero2 - {"deepspeed_multinode_launcher"} <= set(DeepSpeedPlugin.__dataclass_fields__)  # a launcher key
    args = launched["fsdp2"]
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        plugin = FullyShardedDataParallelPlugin()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and not plugin.cpu_ram_efficient_loading
    # no class named: accelerate wraps the model's `_no_split_modules` (every backbone's block_class)
    assert not plugin.transformer_cls_names_to_wrap and not plugin.activation_checkpointing


def test_sharded_engines_refuse_what_they_cannot_run():
    """FSDP1, main-process sampling and LCM under FSDP2, and accumulation under DeepSpeed are refused at setup;
    DeepSpeed gets the per-process batch size (no dataloader is prepared to tell it)."""
    from accelerate.utils import DistributedType

    from dit.train.config import ConfigError
    from dit.train.loop import _check_engine

    def engine(kind, fsdp2=False):
        plugin = SimpleNamespace(deepspeed_config={})
        return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(deepspeed_plugin=plugin))

    def config(*overrides):
        return load_config(TINY, ["data.path=x", *overrides])

    assert _check_engine(engine(DistributedType.FSDP, fsdp2=True), config()) is True
    assert _check_engine(engine(DistributedType.MULTI_GPU), config("validation.every=2")) is False
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        _check_engine(engine(DistributedType.FSDP), config())
    for overrides, key in (
        (["validation.every=2"], "validation.every"),
        (["objective.distill=lcm", "objective.teacher=t"], "LCM distillation with DDP"),
    ):
        with pytest.raises(ConfigError, match=key):
            _check_engine(engine(DistributedType.FSDP, fsdp2=True), config(*overrides))
    deepspeed = engine(DistributedType.DEEPSPEED)
    assert _check_engine(deepspeed, config("data.batch_size=3")) is False
    assert deepspeed.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        _check_engine(deepspeed, config("gradient_accumulation_steps=2"))


def test_fsdp2_two_processes_match_one_save_full_folders_and_resume(tmp_path):
    """Two FSDP2 processes (gradient accumulation included): the one-process losses, full model/ and model_ema/
    folders from the shards, and a resume from the sharded step-2 checkpoint that repeats steps 3-4."""
    features = make_features(tmp_path / "features")
    common = [f"data.path={features}", "max_steps=4", "gradient_accumulation_steps=2", "report_to=none"]
    Trainer(load_config(TINY, [*common, "data.batch_size=2", f"output_dir={tmp_path / 'one'}"])).train()
    sharded = [*common, "data.batch_size=1", "checkpoint_every=2"]  # 1 per process: the same micro-batch of 2
    full = launch_fsdp(sharded, tmp_path / "fsdp")
    torch.testing.assert_close(torch.tensor(full), torch.tensor(_losses(tmp_path / "one")), rtol=1e-4, atol=1e-5)

    step2 = tmp_path / "fsdp" / "checkpoints" / "checkpoint-2"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (step2 / "state" / "pytorch_model_fsdp_0").iterdir()}
    resumed = launch_fsdp([*sharded, f"resume={step2}"], tmp_path / "resumed")
    assert resumed == full[2:]

    fresh = PixArtTransformer(**load_config(TINY, ["data.path=x"]).model.kwargs).state_dict()
    for folder in ("model", "model_ema"):
        ours = _state(tmp_path / "fsdp" / "checkpoints" / "checkpoint-4" / folder)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in fresh.items()}, folder
        reference = _state(tmp_path / "one" / "checkpoints" / "checkpoint-4" / folder)
        for name, value in ours.items():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-4, msg=f"{folder}.{name}")
        again = _state(tmp_path / "resumed" / "checkpoints" / "checkpoint-4" / folder)
        assert all(torch.equal(value, again[name]) for name, value in ours.items()), folder
    ema, model = _state(step2 / "model_ema"), _state(step2 / "model")
    assert any(not torch.equal(ema[name], model[name]) for name in model)  # the EMA folder holds the EMA weights


def _fsdp_on_cpu() -> None:
    """Let accelerate's FSDP path run on a CPU: a MULTI_CPU state (gloo) with an FSDP plugin becomes an FSDP state."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def promoted(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = promoted


if __name__ == "__main__":  # `accelerate launch ... -m tests.train.test_fsdp --config ...` (CPU runs of launch_fsdp)
    from dit.train.__main__ import main

    _fsdp_on_cpu()
    sys.exit(main())
