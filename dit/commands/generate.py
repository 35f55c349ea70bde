"""``dit generate "PROMPT" [--model PATH] -o out.png``: images from prompts with a pipeline folder (the shipped
MicroShapes model by default, ``--lcm`` for its few-step student). A ``dit`` command (:mod:`dit.cli`'s convention)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dit.cli_checks import (
    DTYPES,
    SETUP_ERRORS,
    check_output,
    check_sampling_args,
    model_folder,
    read_prompts,
    resolve_device,
    usage_errors,
)
from dit.errors import as_usage_error
from dit.microshapes.shipped import default_lcm


def add_parser(commands) -> None:
    """The ``dit generate`` subcommand of ``commands`` (argparse sub-parsers)."""
    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt", nargs="*", help="one or several prompts; @FILE reads the prompts of FILE (as "
                     "--prompt-file FILE)")  # fmt: skip
    gen.add_argument("--prompt-file", metavar="FILE", help="one prompt per non-empty line ('-': stdin), drawn after "
                     "the prompts given as arguments")  # fmt: skip
    gen.add_argument("--model", type=Path, help="diffusers-format pipeline folder, or a training run folder (its "
                     "pipeline/) (default: the shipped MicroShapes model)")  # fmt: skip
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
    gen.set_defaults(func=run, user_errors=usage_errors)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the pipeline, draw and save every image (one line per image on stdout)."""
    from dit.pipelines.checks import SamplingValueError

    with as_usage_error(*SETUP_ERRORS):
        prompts = read_prompts(args.prompt, args.prompt_file)
        check_sampling_args(args)
        check_output(args.output)
        device = resolve_device(args.device)
        folder = model_folder(args.model)
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


def output_paths(output: str | Path, count: int) -> list[Path]:
    """Where ``dit generate`` writes ``count`` images: ``output`` for one, else ``STEM-0.png``, ``STEM-1.png``, ...
    beside it (prompt by prompt, ``--num-images`` each)."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix or '.png'}") for k in range(count)]


def _load_pipeline(folder: Path, lcm: Path | None, dtype: str, device: str):
    """The pipeline in ``folder`` (with the LCM student of ``lcm``), strict, in ``dtype`` on ``device``."""
    import torch

    from dit.pipelines import TextToImagePipeline, load_lcm

    pipe = TextToImagePipeline.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]))
    if lcm is not None:
        load_lcm(pipe, lcm)
    return pipe.to(device)


def _check_lcm_folder(lcm: Path) -> None:
    """``lcm`` is an LCM folder (it has ``lcm_config.json``), checked before any model loads."""
    from dit.pipelines.lcm import lcm_defaults

    try:
        lcm_defaults(lcm)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} (train one with objective.distill=lcm).") from None


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
