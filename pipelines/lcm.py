"""Few-step sampling with a latent consistency model distilled by the trainer (``objective.distill: lcm``).

An LCM folder, as ``dit.train`` writes it at the end of a distillation run (``output_dir/lcm``), holds:

- ``transformer/`` (a full student) or ``pytorch_lora_weights.safetensors`` (an LCM-LoRA for the base);
- ``scheduler/``: the consistency scheduler the student was distilled for (diffusers' ``LCMScheduler``, or
  ``FlowMatchLCMScheduler`` for rectified-flow students);
- ``lcm_config.json``: the sampling defaults, ``{"num_inference_steps": 4, "guidance_scale": 1.0}`` (1.0 for a
  student distilled at a fixed guidance scale: no CFG batch; a guidance-embedding student takes the scale it should
  imitate).
"""

from __future__ import annotations

import json
from pathlib import Path

from .loading import check_scheduler
from .text_to_image import TextToImagePipeline

LCM_CONFIG = "lcm_config.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


def lcm_defaults(folder: str | Path) -> dict:
    """The sampling defaults recorded in an LCM folder (``num_inference_steps``, ``guidance_scale``)."""
    path = Path(folder) / LCM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an LCM folder: it has no {LCM_CONFIG}.")
    return json.loads(path.read_text())


def load_lcm(pipe: TextToImagePipeline, folder: str | Path) -> TextToImagePipeline:
    """``pipe`` with the student of the LCM ``folder``: its transformer (or its LoRA on the pipeline's transformer),
    its consistency scheduler and its sampling defaults (``lcm_config.json``, then the pipeline's
    :attr:`~dit.pipelines.TextToImagePipeline.sampling_defaults`). Returns the same pipeline object."""
    folder = Path(folder)
    defaults = lcm_defaults(folder)  # a clear error for a folder that is not an LCM folder
    has_transformer, has_lora = (folder / "transformer").is_dir(), (folder / LORA_FILE).is_file()
    if has_transformer == has_lora:
        raise FileNotFoundError(f"An LCM folder holds transformer/ or {LORA_FILE} (exactly one); {folder} has "
                                f"{'both' if has_lora else 'neither'}.")  # fmt: skip
    if has_transformer:
        cls = type(pipe.transformer)
        student = cls.from_pretrained(folder / "transformer", dtype=pipe.transformer.dtype)
        pipe.register_modules(transformer=student.to(pipe.transformer.device))
    else:
        pipe.load_lora_weights(folder)
    pipe.register_modules(scheduler=_scheduler(folder / "scheduler"))
    pipe.sampling_defaults = defaults
    return pipe


def _scheduler(folder: Path):
    """The diffusers scheduler saved in ``folder`` (its class named by ``_class_name``)."""
    import diffusers

    config = json.loads((folder / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{folder}: {config.get('_class_name')!r} is not a diffusers scheduler.")
    scheduler = cls.from_pretrained(folder)
    check_scheduler(scheduler)
    return scheduler


def save_lcm(
    folder: str | Path, student, scheduler, num_inference_steps: int = 4, guidance_scale: float = 1.0
) -> Path:
    """Write an LCM folder: the student (a full transformer, or its LoRA when it has one), the scheduler and the
    sampling defaults."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(student, "peft_config", None):
        student.save_lora_adapter(folder)
    else:
        student.save_pretrained(folder / "transformer")
    scheduler.save_pretrained(folder / "scheduler")
    defaults = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    (folder / LCM_CONFIG).write_text(json.dumps(defaults, indent=2) + "\n")
    return folder
