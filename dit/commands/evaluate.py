"""``dit eval microshapes --model PATH``: prompt-adherence evaluation on MicroShapes prompts (one-object, two-object
and held-out). A ``dit`` command (:mod:`dit.cli`'s convention)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dit.cli_checks import (
    SETUP_ERRORS,
    check_report_path,
    check_sampling_args,
    model_folder,
    resolve_device,
    usage_errors,
)
from dit.errors import UsageError, as_usage_error
from dit.report import print_report


def add_parser(commands) -> None:
    """The ``dit eval`` subcommand of ``commands`` (argparse sub-parsers)."""
    ev = commands.add_parser("eval", help="prompt-adherence evaluation: dit eval microshapes --model PATH")
    ev.add_argument("world", choices=["microshapes"])
    ev.add_argument("--model", required=True, type=Path, help="diffusers-format pipeline folder, or a training run "
                    "folder (its pipeline/)")  # fmt: skip
    ev.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 20)")
    ev.add_argument("--guidance", type=float, help="guidance scale (default: the model's, else 4.5)")
    ev.add_argument("--n", type=int, default=60, help="one-object prompts (half as many two-object and held-out)")
    ev.add_argument("--size", default="64x64", help="WxH in pixels")
    ev.add_argument("--batch-size", type=int, default=10)
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--json", help="write the report here too")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar over the prompts (on stderr)")
    ev.set_defaults(func=run, user_errors=usage_errors)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the pipeline, evaluate and print the report (``--json``: also written there)."""
    from dit.microshapes.suite import evaluate, pipeline_generator

    width, height = _size(args.size)
    args.width, args.height = width, height
    with as_usage_error(*SETUP_ERRORS):
        check_sampling_args(args)
        _check_counts(n=args.n, batch_size=args.batch_size)
        check_report_path(args.json)
        device = resolve_device(args.device)
        folder = model_folder(args.model)
        from dit.pipelines import TextToImagePipeline

        pipe = TextToImagePipeline.from_pretrained(folder).to(device)
    defaults = pipe.sampling_defaults  # the folder's sampling_defaults.json, else PixArt's
    args.steps = defaults["num_inference_steps"] if args.steps is None else args.steps
    args.guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
    pipe.set_progress_bar_config(disable=True)
    generate = pipeline_generator(pipe, args.steps, args.guidance, height, width)
    report = evaluate(generate, n=args.n, batch_size=args.batch_size, progress=not args.no_progress)
    report["settings"] = {"model": str(args.model), "steps": args.steps, "guidance_scale": args.guidance,
                          "size": f"{width}x{height}", "n": args.n, "device": device}  # fmt: skip
    print_report(report, args.json)
    return 0


def _size(size: str) -> tuple[int, int]:
    """``--size WxH`` as (width, height)."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must look like 64x64, got {size!r}") from None
    return width, height


def _check_counts(**counts) -> None:
    """Each of ``counts`` (``--n``, ``--batch-size``) is >= 1."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
