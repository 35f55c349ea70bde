"""The checks of the ``dit`` commands' arguments, run before any model loads: prompts (``--prompt-file``, ``@FILE``),
class labels (``--class``) and the kind of model they go to, the sampling options, ``-o``, ``--device``, ``--model``
and report paths. A bad one raises
:class:`~dit.errors.UsageError` naming the option and the fix."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dit.errors import UsageError, one_line
from dit.microshapes.shipped import default_model

#: Errors of the checks and the loading before any work: a bad value or folder (one line, exit code 2).
SETUP_ERRORS = (ValueError, KeyError, OSError)
#: ``--dtype`` -> the torch dtype's name.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Pipeline classes (``model_index.json``'s ``_class_name``) that sample class labels (``--class``), not prompts.
CLASS_PIPELINES = ("ClassToImagePipeline",)


def usage_errors() -> dict[type[BaseException], int]:
    """What ``dit generate``, ``eval`` and ``controlnet-relevance`` print as one line ``error: ...`` (exit code): a
    bad value or folder met while setting up (2), a file that cannot be written (1)."""
    return {UsageError: 2, OSError: 1}


def read_prompts(prompts: Sequence[str], prompt_file: str | None) -> list[str]:
    """The prompts to draw: each of ``prompts`` (``@FILE`` reads FILE), then those of ``prompt_file`` (``-``: stdin);
    a prompt file holds one prompt per non-empty line."""
    found = []
    for prompt in prompts:
        found += _prompts_of(prompt[1:], f"prompt {prompt!r}") if prompt.startswith("@") else [prompt]
    if prompt_file is not None:
        found += _prompts_of(prompt_file, f"--prompt-file {prompt_file}")
    if not found:
        raise UsageError("no prompt: give one or several prompts, or --prompt-file FILE (one prompt per line).")
    return found


def read_class_labels(values: Sequence[str] | None) -> list[str]:
    """The ``--class`` values (the option repeated, each a comma-separated list), in order: label names or ids."""
    found = []
    for value in values or ():
        parts = [part.strip() for part in value.split(",")]
        if not all(parts):
            raise UsageError(f"--class {value!r}: an empty class; give label names or class ids, separated by commas.")
        found += parts
    return found


def is_class_model(folder: Path) -> bool:
    """Whether the pipeline folder samples class labels (its ``model_index.json`` names a class pipeline)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {folder}: cannot read model_index.json ({one_line(error)}).") from error
    return index.get("_class_name") in CLASS_PIPELINES


def check_conditions(folder: Path, class_model: bool, classes: list[str], prompts: Sequence[str], prompt_file) -> None:
    """A class-conditional model takes ``--class`` and no prompt; a text model takes prompts and no ``--class``."""
    if class_model and not classes:
        raise UsageError(
            f"{folder} is a class-conditional model: give --class NAME (a label name or a class id; repeat it or "
            "separate several by commas) instead of a prompt."
        )
    if class_model and (prompts or prompt_file is not None):
        raise UsageError(f"{folder} is a class-conditional model: it takes --class only, no prompt or --prompt-file.")
    if not class_model and classes:
        raise UsageError(
            f"--class {','.join(classes)}: {folder} is a text-to-image model (no class labels); give a prompt instead."
        )


def _prompts_of(file: str, what: str) -> list[str]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{what}: cannot read the prompt file ({one_line(error)}).") from error
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{what}: the prompt file has no prompts (one prompt per non-empty line).")
    return prompts


def check_output(output: str | Path) -> None:
    """``-o``: a file name with an image extension, in a folder that exists (checked before the model loads)."""
    from PIL import Image

    output = Path(output)
    if output.is_dir():
        raise UsageError(f"-o {output}: is a folder; give a file name such as {output / 'out.png'}.")
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: the folder {output.parent} does not exist; create it first.")
    if output.suffix and output.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"-o {output}: {output.suffix} is not an image format; use .png or .jpg.")


def resolve_device(device: str | None) -> str:
    """``--device``, checked before the model loads (default: cuda when available, else cpu)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise UsageError(f"--device {device}: not a device ({one_line(error)}); use cpu or cuda.") from error
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(kind)
    if backend is not None and not backend.is_available():
        raise UsageError(f"--device {device}: {kind} is not available on this machine; use --device cpu.")
    return device


def check_report_path(path: str | None, flag: str = "--json") -> None:
    """A report file's folder exists (checked before any work)."""
    if path is not None and not Path(path).parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it first.")


def check_sampling_args(args) -> None:
    """The sampling options given on the command line (``--steps``, ``--guidance``, ``--height``, ``--width``,
    ``--num-images``, ``--guidance-channels``), checked before the model loads; a bad one raises a
    ``SamplingValueError`` that names the option, the value and the allowed range."""
    from functools import partial

    from dit.pipelines import checks

    options = {
        "--steps": (args.steps, checks.check_num_inference_steps),
        "--guidance": (args.guidance, checks.check_guidance_scale),
        "--height": (args.height, partial(checks.check_image_side, "height")),
        "--width": (args.width, partial(checks.check_image_side, "width")),
        "--num-images": (getattr(args, "num_images", None), checks.check_num_images_per_prompt),
        "--guidance-channels": (getattr(args, "guidance_channels", None), checks.check_guidance_channels),
    }
    for flag, (value, check) in options.items():
        if value is None:
            continue
        try:
            check(value)
        except checks.SamplingValueError as error:
            raise checks.SamplingValueError(f"{flag}: {error}") from None


def model_folder(model: Path | None) -> Path:
    """``--model``: the pipeline folder to load: the shipped model when ``model`` is None, else ``model`` or, for a
    training run folder, the ``pipeline/`` inside it (said on stderr, so stdout keeps only results)."""
    from dit.pipelines.loading import pipeline_folder

    if model is None:
        if not (default_model() / "model_index.json").is_file():
            raise FileNotFoundError(f"no default model in this install ({default_model()}); pass --model PATH.")
        return default_model()
    folder = pipeline_folder(model)
    if folder != Path(model):
        print(f"model: {folder} (the pipeline of the run folder {model})", file=sys.stderr)
    return folder
