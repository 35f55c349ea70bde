"""The ``dit`` command: ``dit generate "PROMPT" --model PATH -o out.png``, ``dit train --config ...``,
``dit controlnet-relevance --model BASE --controlnet ADAPTER``.

Building the parser imports neither torch nor diffusers (``dit --help`` answers at once); every command runs
through :func:`dit.errors.run_command`: a bad value is one line ``error: ...`` (``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dit import __version__
from dit.cli_checks import SETUP_ERRORS, check_output, check_report_path, read_prompts, resolve_device
from dit.controlnet_relevance import add_parser as add_relevance_parser
from dit.errors import DEBUG_ENV, UsageError, as_usage_error, run_command, take_debug_flag
from dit.microshapes.shipped import default_lcm, default_model
from dit.report import print_report

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Errors of ``dit generate`` / ``eval`` / ``controlnet-relevance`` printed as one line (exit code).
USER_ERRORS = {UsageError: 2, OSError: 1}


def _check_sampling_args(args: argparse.Namespace) -> None:
    """The sampling options given on the command line, checked before the model loads; a bad one raises a
    ``SamplingValueError`` that names the option, the value and the allowed range."""
    from functools import partial

    from dit.pipelines import checks

    options = {
        "--steps": (args.steps, checks.check_num_inference_steps),
        "--guidance": (args.guidance, checks.check_guidance_scale),
        "--height": (args.height, partial(checks.check_image_side, "height")),
        "--width": (args.width, partial(checks.check_image_side, "width")),
        "--num-images": (getattr(args, "num_images", None), checks.check_num_images_per_prompt),
    }
    for flag, (value, check) in options.items():
        if value is None:
            continue
        try:
            check(value)
        except checks.SamplingValueError as error:
            raise checks.SamplingValueError(f"{flag}: {error}") from None


def _model_folder(model: Path | None) -> Path:
    """The pipeline folder to load: the shipped model when ``model`` is None, else ``model`` or, for a training run
    folder, the ``pipeline/`` inside it (said on stderr, so stdout keeps only results)."""
    from dit.pipelines.loading import pipeline_folder

    if model is None:
        if not (default_model() / "model_index.json").is_file():
            raise FileNotFoundError(f"no default model in this install ({default_model()}); pass --model PATH.")
        return default_model()
    folder = pipeline_folder(model)
    if folder != Path(model):
        print(f"model: {folder} (the pipeline of the run folder {model})", file=sys.stderr)
    return folder


def _load_pipeline(folder: Path, lcm: Path | None, dtype: str, device: str):
    """The pipeline in ``folder`` (with the LCM student of ``lcm``), strict, in ``dtype`` on ``device``."""
    import torch

    from dit.pipelines import TextToImagePipeline, load_lcm

    pipe = TextToImagePipeline.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]))
    if lcm is not None:
        load_lcm(pipe, lcm)
    return pipe.to(device)


def _check_lcm_guidance(pipe, guidance: float | None) -> None:
    """``--guidance`` with an LCM student whose guidance is baked in (distilled at a fixed scale: its lcm_config.json
    records guidance_scale 1.0 and the transformer has no guidance embedding) is an error: it samples without a CFG
    batch, so a scale <= 1 changes nothing and one > 1 stacks CFG on the distilled guidance."""
    baked_in = not pipe.guidance_embedded and pipe.sampling_defaults["guidance_scale"] == 1.0
    if guidance is None or not baked_in or guidance == 1.0:
        return
    raise ValueError(
        f"--guidance {guidance:g} does not apply to this LCM student: its guidance is baked in (distilled at a fixed "
        "scale; lcm_config.json records guidance_scale 1.0, no CFG batch), so a scale below 1 has no effect and one "
        "above 1 stacks CFG on the distilled guidance. Leave --guidance out, or distil a guidance-embedding student "
        "(objective.lcm.guidance_range with a time_cond_proj_dim)."
    )


def output_paths(output: str | Path, count: int) -> list[Path]:
    """Where ``dit generate`` writes ``count`` images: ``output`` for one, else ``STEM-0.png``, ``STEM-1.png``, ...
    beside it (prompt by prompt, ``--num-images`` each)."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix or '.png'}") for k in range(count)]


def _generate(args: argparse.Namespace) -> int:
    from dit.pipelines.checks import SamplingValueError

    with as_usage_error(*SETUP_ERRORS):
        prompts = read_prompts(args.prompt, args.prompt_file)
        _check_sampling_args(args)
        check_output(args.output)
        device = resolve_device(args.device)
        folder = _model_folder(args.model)
        lcm = args.lcm_folder or (default_lcm() if args.lcm else None)
        if lcm is not None:
            _check_lcm_folder(lcm)
        pipe = _load_pipeline(folder, lcm, args.dtype, device)
        if lcm is not None:
            _check_lcm_guidance(pipe, args.guidance)
    if args.compile:
        pipe.compile_transformer()
    paths = output_paths(args.output, len(prompts) * args.num_images)
    images = _draw(pipe, prompts, args, paths, SamplingValueError)
    for path, image, prompt in zip(paths, images, [p for p in prompts for _ in range(args.num_images)]):
        image.save(path)
        print(f"saved {path} ({image.width}x{image.height}): {prompt}")
    return 0


def _draw(pipe, prompts: list[str], args: argparse.Namespace, paths: list[Path], value_error: type) -> list:
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(args.seed + k) for k in range(len(paths))]
    with as_usage_error(value_error):
        return pipe(
            prompts,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,  # None: the pipeline's sampling defaults (its folder's, or the LCM's)
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            height=args.height,
            width=args.width,
            generator=generators,
            clean_caption=False,  # captions as the trainer encodes them: lower-cased and stripped
        ).images


def _check_lcm_folder(lcm: Path) -> None:
    """``lcm`` is an LCM folder (it has ``lcm_config.json``), checked before any model loads."""
    from dit.pipelines.lcm import lcm_defaults

    try:
        lcm_defaults(lcm)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} (train one with objective.distill=lcm).") from None


def _evaluate(args: argparse.Namespace) -> int:
    from dit.microshapes.suite import evaluate, pipeline_generator

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must look like 64x64, got {args.size!r}") from None
    args.width, args.height = width, height
    with as_usage_error(*SETUP_ERRORS):
        _check_sampling_args(args)
        _check_counts(n=args.n, batch_size=args.batch_size)
        check_report_path(args.json)
        device = resolve_device(args.device)
        folder = _model_folder(args.model)
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


def _check_counts(**counts) -> None:
    """Each of ``counts`` (``--n``, ``--batch-size``) is >= 1."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def build_parser() -> argparse.ArgumentParser:
    """The ``dit`` command line (``train`` and ``extract`` parse their own arguments); imports no torch."""
    parser = argparse.ArgumentParser(
        prog="dit",
        description="Diffusion-transformer toolkit.",
        epilog=f"An error is one line 'error: ...' on stderr; --debug (or {DEBUG_ENV}=1) shows its traceback.",
    )
    parser.add_argument("--version", action="version", version=f"dit-toolkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also accepted "
                        f"after the command; or set {DEBUG_ENV}=1)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt", nargs="*", help="one or several prompts; @FILE reads the prompts of FILE (as "
                     "--prompt-file FILE)")  # fmt: skip
    gen.add_argument("--prompt-file", metavar="FILE", help="one prompt per non-empty line ('-': stdin), drawn after "
                     "the prompts given as arguments")  # fmt: skip
    gen.add_argument(
        "--model",
        type=Path,
        help="diffusers-format pipeline folder, or a training run folder (its pipeline/) "
        "(default: the shipped MicroShapes model)",
    )
    gen.add_argument("-o", "--output", default="out.png", help="output PNG path (default: out.png); several images "
                     "go to OUT-0.png, OUT-1.png, ... (prompt by prompt)")  # fmt: skip
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 20; with --lcm the "
                     "student's, 4)")  # fmt: skip
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model's sampling_defaults.json, "
                     "else 4.5; with --lcm the student's)")  # fmt: skip
    gen.add_argument("--lcm", action="store_true", help="few-step sampling with the LCM student shipped beside the "
                     "default model (or the one given by --lcm-folder)")  # fmt: skip
    gen.add_argument("--lcm-folder", type=Path, help="an LCM folder written by the trainer (implies --lcm)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--seed", type=int, default=0, help="image k is drawn with seed SEED + k (default: 0)")
    gen.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks first "
                     "(regional: seconds to compile, then faster steps on a GPU)")  # fmt: skip
    gen.set_defaults(func=_generate)
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
    ev.set_defaults(func=_evaluate)
    add_relevance_parser(commands)
    commands.add_parser("train", help="train with accelerate: dit train --config configs/NAME.yaml [key=value ...]")
    commands.add_parser(
        "extract",
        help="pre-extract T5 features and VAE latents (resumable; --control for ControlNet): "
        "dit extract DATA --pipeline P --out D",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dit COMMAND ...``: the command's exit code; an error is one line on stderr (see :mod:`dit.errors`)."""
    argv = take_debug_flag(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer parses its own arguments (config path plus key=value overrides)
        from dit.train.__main__ import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["extract"]:
        from dit.train.extract import main as extract_main

        return extract_main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
