"""``dit convert FAMILY CHECKPOINT OUT [--config YAML] [--pipeline BASE]``: a published checkpoint of PixArt-α/Σ,
PixArt-δ ControlNet, FiT/FiTv2 or MicroDiT as a diffusers-format folder (safetensors, loaded strictly).

Without ``--pipeline``, ``OUT`` holds the converted models in subfolders (``transformer/``, and ``controlnet/`` for a
ControlNet), each loadable with ``from_pretrained(OUT, subfolder=...)``. With ``--pipeline BASE`` (a pipeline folder
giving the other components: tokenizer, text encoder, VAE, scheduler), ``OUT`` is a complete pipeline folder that our
pipelines and diffusers' ``DiffusionPipeline.from_pretrained`` (after ``import dit``) load. The folder is written
beside ``OUT`` first and renamed at the end, so an error or Ctrl-C leaves no half-written ``OUT``; an ``OUT`` that
exists and is not empty is refused. A ``dit`` command (:mod:`dit.cli`'s convention).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit.cli_checks import DTYPES, SETUP_ERRORS, usage_errors
from dit.errors import UsageError, as_usage_error

HELP_CONFIG = (
    "YAML options. pixart, pixart-controlnet: load_original_pixart's keyword arguments (sample_size, "
    "attention_head_dim, interpolation_scale, kv_compress); fit: the original model's YAML (its constructor "
    "arguments, required); microdit: the original DiT's constructor arguments, or a preset name such as "
    "MicroDiT_XL_2 (default)"
)


@dataclass(frozen=True)
class Family:
    """How ``dit convert`` converts one family: ``load(checkpoint, options, args) -> {component: model}``,
    ``pipeline_class`` (a name in :mod:`dit.pipelines`), the components ``others`` it takes from a base pipeline,
    whether ``--config`` is required, and the ``sampling`` defaults a pipeline folder records (the original's)."""

    load: Callable[[str, Any, argparse.Namespace], dict[str, Any]]
    pipeline_class: str
    others: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "scheduler")
    needs_config: bool = False
    sampling: dict[str, Any] | None = None


def add_parser(commands) -> None:
    """The ``dit convert`` subcommand of ``commands`` (argparse sub-parsers)."""
    conv = commands.add_parser("convert", help="convert a published checkpoint to a diffusers-format folder")
    conv.add_argument("family", choices=sorted(FAMILIES), help="the checkpoint's model family")
    conv.add_argument("checkpoint", help="the original checkpoint (.safetensors, .pth, .pt, .bin; pixart-controlnet: "
                      "also diffusers' research adapter, a folder or file, with --transformer or --pipeline)")  # fmt: skip
    conv.add_argument("out", type=Path, help="the folder to write (must not exist, or be empty)")
    conv.add_argument("--config", help=HELP_CONFIG)
    conv.add_argument("--pipeline", type=Path, help="a base pipeline folder whose other components complete OUT as "
                      "a pipeline folder (its transformer is the base of a research ControlNet adapter)")  # fmt: skip
    conv.add_argument("--transformer", type=Path, help="pixart-controlnet from a research adapter: the base "
                      "transformer's folder (default: --pipeline's transformer)")  # fmt: skip
    conv.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], type=_key_value, help="fit: a "
                      "FiTTransformer config field (e.g. rope_extrapolation=vision_ntk); microdit: an original DiT "
                      "argument (e.g. in_channels=16 for the 16-channel release); repeatable")  # fmt: skip
    conv.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    conv.add_argument("--allow-pickle", action="store_true", help="unpickle in full a .pth/.pt/.bin that weights-only "
                      "loading cannot read (this runs code from the file: only for files you trust)")  # fmt: skip
    conv.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the weights' dtype (default: fp32)")
    conv.set_defaults(func=run, user_errors=usage_errors)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, convert, write ``OUT`` (one line per component on stdout)."""
    family = FAMILIES[args.family]
    args.set = dict(args.set)
    with as_usage_error(*SETUP_ERRORS):
        check_options(args)
        check_out(args.out)
        options = read_config(args.config, required=family.needs_config, family=args.family)
        components = family.load(args.checkpoint, options, args)
        components = _cast(components, args.dtype)
        pipeline = None if args.pipeline is None else complete_pipeline(components, family, args.pipeline)
    write_folder(args.out, components if pipeline is None else pipeline)  # a failed write: OSError, exit code 1
    for name, model in components.items():
        print(f"wrote {args.out / name} ({type(model).__name__})")
    if args.pipeline is not None:
        print(f"wrote {args.out} ({family.pipeline_class}, other components from {args.pipeline})")
    return 0


# ----- arguments ----------------------------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: the value read as YAML (numbers, booleans, lists), the key as given."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


#: options that apply to some families only: (families, what to do instead)
FAMILY_OPTIONS = {
    "set": (("fit", "microdit"), "give the options with --config"),
    "transformer": (("pixart-controlnet",), "leave it out: the checkpoint holds the whole model"),
    "ema": (("pixart", "pixart-controlnet"), "the released checkpoint holds one set of weights"),
}


def check_options(args: argparse.Namespace) -> None:
    """An option given to a family it does not apply to is an error, not silently ignored."""
    for name, (families, instead) in FAMILY_OPTIONS.items():
        if getattr(args, name) and args.family not in families:
            flag = "--" + name
            raise UsageError(f"{flag} is for {' and '.join(families)}; for {args.family}, {instead}.")


def check_out(out: Path) -> None:
    """``OUT`` must not exist, or be an empty folder, and its parent must exist (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; give a new folder (nothing is overwritten).")
    if not out.parent.is_dir():
        raise UsageError(f"the folder {out.parent} does not exist; create it first.")


def read_config(config: str | None, required: bool, family: str) -> Any:
    """``--config``: a YAML file's mapping, a preset name (a string that is no file), or None."""
    if config is None:
        if required:
            raise UsageError(
                f"dit convert {family} needs --config: the original model's YAML (constructor arguments)."
            )
        return None
    path = Path(config)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml", ".json"):
            raise UsageError(f"--config {config}: no such file.")
        return config  # a preset name, checked by the family's loader
    import yaml

    options = yaml.safe_load(path.read_text())
    if not isinstance(options, dict):
        raise UsageError(f"--config {config}: expected a mapping of options, got {type(options).__name__}.")
    return options


def _pixart_options(options: Any, args: argparse.Namespace) -> dict:
    if options is not None and not isinstance(options, dict):
        raise UsageError(f"--config {options!r}: expected a YAML file of load_original_pixart's options.")
    return {**(options or {}), "use_ema": args.ema, "allow_pickle": args.allow_pickle}


# ----- the families -------------------------------------------------------------------------------------------
def _load_pixart(checkpoint: str, options: Any, args: argparse.Namespace) -> dict[str, Any]:
    from dit.convert import load_original_pixart

    return {"transformer": load_original_pixart(checkpoint, **_pixart_options(options, args))}


def _load_pixart_controlnet(checkpoint: str, options: Any, args: argparse.Namespace) -> dict[str, Any]:
    """An original checkpoint holds its base; a research adapter (a folder, or a file with ``--transformer``) runs on
    ``--transformer``, else on the transformer of ``--pipeline``."""
    from dit.convert import load_original_pixart_controlnet

    base = args.transformer
    if base is None and args.pipeline is not None and Path(checkpoint).is_dir():
        base = args.pipeline / "transformer"
    if base is None:
        kwargs = _pixart_options(options, args)
    else:
        if options:
            raise UsageError("--config describes the base of an original checkpoint; a research adapter runs on "
                             "--transformer (or --pipeline's transformer).")  # fmt: skip
        kwargs = {"transformer": base, "allow_pickle": args.allow_pickle}
    transformer, controlnet = load_original_pixart_controlnet(checkpoint, **kwargs)
    return {"transformer": transformer, "controlnet": controlnet}


def _load_fit(checkpoint: str, options: Any, args: argparse.Namespace) -> dict[str, Any]:
    from dit.convert import load_original_fit

    return {"transformer": load_original_fit(checkpoint, options, allow_pickle=args.allow_pickle, **args.set)}


def _load_microdit(checkpoint: str, options: Any, args: argparse.Namespace) -> dict[str, Any]:
    from dit.convert import load_original_microdit

    model = load_original_microdit(checkpoint, options or "MicroDiT_XL_2", allow_pickle=args.allow_pickle, **args.set)
    return {"transformer": model}


FAMILIES: dict[str, Family] = {
    "pixart": Family(_load_pixart, "TextToImagePipeline"),
    "pixart-controlnet": Family(_load_pixart_controlnet, "ControlNetPipeline"),
    # FiT guides latent channels 0-2 (forward_with_cfg); MicroDiT samples 30 steps at guidance 5 (micro_diffusion)
    "fit": Family(
        _load_fit,
        "ClassToImagePipeline",
        ("vae", "scheduler", "id2label"),
        needs_config=True,
        sampling={"guidance_channels": 3},
    ),
    "microdit": Family(
        _load_microdit, "TextToImagePipeline", sampling={"num_inference_steps": 30, "guidance_scale": 5.0}
    ),
}


# ----- writing ------------------------------------------------------------------------------------------------
def _cast(components: dict[str, Any], dtype: str) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, DTYPES[dtype])
    return {name: model if model.dtype == dtype else model.to(dtype) for name, model in components.items()}


def write_folder(out: Path, contents: dict[str, Any] | Any) -> None:
    """Save ``contents`` (a pipeline, or {subfolder: model}) with safetensors into a folder beside ``out``, then
    rename it to ``out``; on any error (Ctrl-C included) the partial folder is removed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if isinstance(contents, dict):
            for name, model in contents.items():
                model.save_pretrained(staging / name, safe_serialization=True)
        else:
            contents.save_pretrained(staging, safe_serialization=True)
        if out.exists():
            out.rmdir()  # empty (check_out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def complete_pipeline(components: dict[str, Any], family: Family, base: Path):
    """A ``family.pipeline_class`` pipeline of ``components`` and the other components of the pipeline folder
    ``base`` (its scheduler unless the converted transformer needs another:
    :func:`~dit.pipelines.schedulers.default_scheduler`)."""
    import dit.pipelines
    from dit.pipelines.schedulers import default_scheduler

    if not (base / "model_index.json").is_file():
        raise UsageError(f"--pipeline {base}: not a pipeline folder (no model_index.json).")
    parts = _base_components(base, [name for name in family.others if name not in components])
    scheduler = parts.get("scheduler")
    if scheduler is None or _needs_own_scheduler(components["transformer"], scheduler):
        parts["scheduler"] = default_scheduler(components["transformer"])
    pipe = getattr(dit.pipelines, family.pipeline_class)(**parts, **components)
    if family.sampling is not None:
        pipe.sampling_defaults = family.sampling
    return pipe


def _base_components(base: Path, names: list[str]) -> dict[str, Any]:
    """The components ``names`` of the pipeline folder ``base``, each loaded by its library class (absent: None)."""
    import json

    index = json.loads((base / "model_index.json").read_text())
    parts: dict[str, Any] = {}
    for name in names:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            parts[name] = entry if name == "id2label" else None
            continue
        library, class_name = entry
        module = __import__(library if library != "dit" else "dit.pipelines", fromlist=[class_name])
        parts[name] = getattr(module, class_name).from_pretrained(base / name)
    return parts


def _needs_own_scheduler(transformer, scheduler) -> bool:
    """Whether the converted ``transformer`` records a prediction (its training parametrisation) that the base
    pipeline's ``scheduler`` does not sample, so it gets its own (:func:`~dit.pipelines.schedulers.default_scheduler`)."""
    from dit.models.capabilities import capability
    from dit.pipelines.schedulers import prediction_of

    recorded = capability(transformer, "prediction_type")
    return recorded is not None and recorded != prediction_of(scheduler)
