"""The ``dit`` command: ``dit generate "PROMPT" --model PATH -o out.png``, ``dit train --config ...``,
``dit controlnet-relevance --model BASE --controlnet ADAPTER``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from dit.controlnet_relevance import add_parser as add_relevance_parser

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_model() -> Path:
    """The MicroShapes pipeline shipped inside the package."""
    return Path(str(resources.files("dit") / "assets" / "microshapes"))


def default_lcm() -> Path:
    """The LCM student shipped beside the default model (``dit generate --lcm``)."""
    return Path(str(resources.files("dit") / "assets" / "microshapes_lcm"))


def print_report(report: dict, path: str | None = None) -> None:
    """Print ``report`` as indented JSON, and write it to ``path`` too when given (``--json``)."""
    import json

    text = json.dumps(report, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from dit.pipelines import TextToImagePipeline, load_lcm
    from dit.pipelines.defaults import sampling_defaults
    from dit.pipelines.lcm import lcm_defaults

    if args.model is None:
        args.model = default_model()
        if not (args.model / "model_index.json").is_file():
            print(f"error: no default model in this install ({args.model}); pass --model PATH.", file=sys.stderr)
            return 2
    lcm = args.lcm_folder or (default_lcm() if args.lcm else None)
    defaults = sampling_defaults(args.model)
    if lcm is not None:
        try:
            defaults = lcm_defaults(lcm)
        except FileNotFoundError as error:
            print(f"error: {error} (train one with objective.distill=lcm).", file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    pipe = TextToImagePipeline.from_pretrained(args.model, torch_dtype=dtype)
    if lcm is not None:
        load_lcm(pipe, lcm)
    pipe = pipe.to(device)
    if args.compile:
        pipe.compile_transformer()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps or defaults["num_inference_steps"],
        guidance_scale=defaults["guidance_scale"] if args.guidance is None else args.guidance,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images[0]
    image.save(args.output)
    print(f"saved {args.output} ({image.width}x{image.height})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from dit.microshapes.suite import evaluate, pipeline_generator
    from dit.pipelines import TextToImagePipeline
    from dit.pipelines.defaults import sampling_defaults

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size must look like 64x64, got {args.size!r}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = sampling_defaults(args.model)
    args.steps = args.steps or defaults["num_inference_steps"]
    args.guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
    pipe = TextToImagePipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    generate = pipeline_generator(pipe, args.steps, args.guidance, height, width)
    report = evaluate(generate, n=args.n, batch_size=args.batch_size)
    report["settings"] = {"model": str(args.model), "steps": args.steps, "guidance_scale": args.guidance,
                          "size": f"{width}x{height}", "n": args.n, "device": device}  # fmt: skip
    print_report(report, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit", description="Diffusion-transformer toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt")
    gen.add_argument(
        "--model", type=Path, help="diffusers-format pipeline folder (default: the shipped MicroShapes model)"
    )
    gen.add_argument("-o", "--output", default="out.png", help="output PNG path (default: out.png)")
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
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks first "
                     "(regional: seconds to compile, then faster steps on a GPU)")  # fmt: skip
    gen.set_defaults(func=_generate)
    ev = commands.add_parser("eval", help="prompt-adherence evaluation: dit eval microshapes --model PATH")
    ev.add_argument("world", choices=["microshapes"])
    ev.add_argument("--model", required=True, help="diffusers-format pipeline folder")
    ev.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 20)")
    ev.add_argument("--guidance", type=float, help="guidance scale (default: the model's, else 4.5)")
    ev.add_argument("--n", type=int, default=60, help="one-object prompts (half as many two-object and held-out)")
    ev.add_argument("--size", default="64x64", help="WxH in pixels")
    ev.add_argument("--batch-size", type=int, default=10)
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--json", help="write the report here too")
    ev.set_defaults(func=_evaluate)
    add_relevance_parser(commands)
    commands.add_parser("train", help="train with accelerate: dit train --config configs/NAME.yaml [key=value ...]")
    commands.add_parser(
        "extract", help="pre-extract T5 features and VAE latents: dit extract DATA --pipeline P --out D"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer parses its own arguments (config path plus key=value overrides)
        from dit.train.__main__ import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["extract"]:
        from dit.train.extract import main as extract_main

        return extract_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
