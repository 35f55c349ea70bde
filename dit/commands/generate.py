"""``dit generate "PROMPT" [--model PATH] -o out.png``: images from prompts with a pipeline folder (the shipped
MicroShapes model by default, ``--lcm`` for its few-step student); ``dit generate --class NAME --model PATH``: images
of class labels with a class-conditional folder (a ``ClassToImagePipeline``: FiT on ImageNet). A ``dit`` command
(:mod:`dit.cli`'s convention)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dit.cli_checks import (
    DTYPES,
    SETUP_ERRORS,
    check_conditions,
    check_output,
    check_sampling_args,
    is_class_model,
    model_folder,
    read_class_labels,
    read_prompts,
    resolve_device,
    usage_errors,
)
from dit.errors import UsageError, as_usage_error
from dit.microshapes.shipped import default_lcm


def add_parser(commands) -> None:
    """The ``dit generate`` subcommand of ``commands`` (argparse sub-parsers)."""
    gen = commands.add_parser("generate", help="generate an image from a prompt (or a class label)")
    gen.add_argument("prompt", nargs="*", help="one or several prompts; @FILE reads the prompts of FILE (as "
                     "--prompt-file FILE)")  # fmt: skip
    gen.add_argument("--prompt-file", metavar="FILE", help="one prompt per non-empty line ('-': stdin), drawn after "
                     "the prompts given as arguments")  # fmt: skip
    gen.add_argument("--class", dest="class_labels", action="append", metavar="NAME", help="a class label name or "
                     "class id, for a class-conditional model (ClassToImagePipeline, e.g. FiT on ImageNet) instead of "
                     "a prompt; repeat it or separate several by commas ('goldfish,207')")  # fmt: skip
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
    gen.add_argument("--guidance-channels", type=int, metavar="K", help="guide the first K latent channels only "
                     "(FiT's published models: 3; default: the model's sampling_defaults.json, else all)")  # fmt: skip
    gen.add_argument("--lcm", action="store_true", help="few-step sampling with the LCM student shipped beside the "
                     "default model (or the one given by --lcm-folder)")  # fmt: skip
    gen.add_argument("--lcm-folder", type=Path, help="an LCM folder written by the trainer (implies --lcm)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--seed", type=int, default=0, help="image k is drawn with seed SEED + k (default: 0)")
    gen.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="fp32 (default), bf16 or fp16; with --low-memory "
                     "bf16 (default) or fp16")  # fmt: skip
    gen.add_argument("--low-memory", action="store_true", help="the low-memory preset (PixArt-delta's 8-bit "
                     "inference): int8 text encoder, half-precision transformer and VAE, model CPU offload on a GPU, "
                     "VAE tiling above 1024 px")  # fmt: skip
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks first "
                     "(regional: seconds to compile, then faster steps on a GPU)")  # fmt: skip
    gen.add_argument("--cuda-graphs", action="store_true", help="capture the denoiser call into a CUDA graph per "
                     "image size and replay it at every step (no host overhead per step); on a CPU, with "
                     "--low-memory's offload or a step cache it samples eagerly, with a warning")  # fmt: skip
    gen.add_argument("--attention-backend", metavar="NAME", help="the transformer's softmax attention kernel: sdpa "
                     "(default), math, xformers, sdpa_flex, or one of diffusers' backend names (flash, sage, ...); "
                     "one that cannot run here is an error before loading")  # fmt: skip
    gen.set_defaults(func=run, user_errors=usage_errors)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the pipeline, draw and save every image (one line per image on stdout)."""
    from dit.pipelines.checks import SamplingValueError

    with as_usage_error(*SETUP_ERRORS):
        classes = read_class_labels(args.class_labels)
        check_sampling_args(args)
        _check_attention_backend(args.attention_backend)
        args.dtype = _dtype(args.dtype, args.low_memory)
        check_output(args.output)
        device = resolve_device(args.device)
        folder = model_folder(args.model)
        class_model = is_class_model(folder)
        check_conditions(folder, class_model, classes, args.prompt, args.prompt_file)
        setup = _class_setup if class_model else _text_setup
        pipe, conditions, names = setup(folder, args, device, classes)
    if args.attention_backend:
        pipe.transformer.set_attention_backend(args.attention_backend)
    if args.compile:
        pipe.compile_transformer()
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    paths = output_paths(args.output, len(conditions) * args.num_images)
    images = _draw(pipe, conditions, args, paths, SamplingValueError, class_model)
    for path, image, name in zip(paths, images, [n for n in names for _ in range(args.num_images)]):
        image.save(path)
        print(f"saved {path} ({image.width}x{image.height}): {name}")
    return 0


def _check_attention_backend(name: str | None) -> None:
    """A usage error before loading unless ``name`` (if given) is a backend that can run here."""
    from dit.nn.attention.backends import backend_problem

    problem = None if name is None else backend_problem(name)
    if problem is not None:
        raise UsageError(f"--attention-backend: {problem}")


def _text_setup(folder: Path, args: argparse.Namespace, device: str, classes: list[str]) -> tuple:
    """The text pipeline of ``folder`` (with ``--lcm``'s student), the prompts and their names (themselves)."""
    prompts = read_prompts(args.prompt, args.prompt_file)
    lcm = args.lcm_folder or (default_lcm() if args.lcm else None)
    if lcm is not None:
        _check_lcm_folder(lcm)
    pipe = _load_pipeline(folder, lcm, args.dtype, device, args.low_memory)
    if lcm is not None:
        _check_lcm_guidance(pipe, args.guidance)
    return pipe, prompts, prompts


def _class_setup(folder: Path, args: argparse.Namespace, device: str, classes: list[str]) -> tuple:
    """The class pipeline of ``folder``, the class ids of ``classes`` (names or ids, resolved from the folder's
    ``id2label`` before the model loads) and a name for each (``class 1 (goldfish)``)."""
    import torch

    from dit.pipelines import ClassToImagePipeline
    from dit.pipelines.labels import ClassLabels

    text_options = {"--lcm": args.lcm, "--lcm-folder": args.lcm_folder, "--negative-prompt": args.negative_prompt}
    given = [flag for flag, value in text_options.items() if value]
    if given:
        raise UsageError(f"{', '.join(given)}: {folder} is a class-conditional model; these apply to text models.")
    labels = ClassLabels.from_folder(folder)
    ids = labels.ids([labels.parse(value) for value in classes])
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.low_memory:
        pipe = ClassToImagePipeline.from_pretrained(folder, low_memory=_preset(dtype, device))
        return pipe, ids, [labels.describe(i) for i in ids]
    pipe = ClassToImagePipeline.from_pretrained(folder, dtype=dtype)
    return pipe.to(device), ids, [labels.describe(i) for i in ids]


def output_paths(output: str | Path, count: int) -> list[Path]:
    """Where ``dit generate`` writes ``count`` images: ``output`` for one, else ``STEM-0.png``, ``STEM-1.png``, ...
    beside it (prompt by prompt, ``--num-images`` each)."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix or '.png'}") for k in range(count)]


def _load_pipeline(folder: Path, lcm: Path | None, dtype: str, device: str, low_memory: bool = False):
    """The pipeline in ``folder`` (with the LCM student of ``lcm``), strict, in ``dtype`` on ``device``; with
    ``low_memory`` loaded and run with the low-memory preset (offload onto ``device`` once the student is in)."""
    import dataclasses

    import torch

    from dit.pipelines import TextToImagePipeline, load_lcm

    dtype = getattr(torch, DTYPES[dtype])
    preset = _preset(dtype, device) if low_memory else None
    options = {"low_memory": dataclasses.replace(preset, offload=False)} if low_memory else {"dtype": dtype}
    pipe = TextToImagePipeline.from_pretrained(folder, **options)
    if lcm is not None:
        load_lcm(pipe, lcm)
    return pipe.enable_low_memory(preset) if low_memory else pipe.to(device)


def _dtype(dtype: str | None, low_memory: bool) -> str:
    """``--dtype``, fp32 when left out (bf16 with ``--low-memory``, which runs in half precision only)."""
    if dtype is None:
        return "bf16" if low_memory else "fp32"
    if low_memory and dtype == "fp32":
        raise UsageError("--low-memory runs the transformer in half precision: use --dtype bf16 or fp16, or leave "
                         "--dtype out (bf16).")  # fmt: skip
    return dtype


def _preset(dtype, device: str):
    """The low-memory preset in ``dtype``, offloading onto ``device`` (nothing to offload on the CPU)."""
    from dit.pipelines.low_memory import LowMemoryConfig

    return LowMemoryConfig(dtype=dtype, device=device)


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


def _draw(pipe, conditions: list, args: argparse.Namespace, paths: list[Path], value_error: type, classes: bool):
    """Every image: ``args.num_images`` of each prompt (or class id), image k drawn with seed ``args.seed + k``."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(args.seed + k) for k in range(len(paths))]
    common = dict(
        num_inference_steps=args.steps,  # None: the pipeline's sampling defaults (its folder's, or the LCM's)
        guidance_scale=args.guidance,
        guidance_channels=args.guidance_channels,
        height=args.height,
        width=args.width,
        generator=generators,
    )
    with as_usage_error(value_error):
        if classes:
            return pipe(conditions, num_images_per_label=args.num_images, **common).images
        return pipe(
            conditions,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images,
            clean_caption=False,  # captions as the trainer encodes them: lower-cased and stripped
            **common,
        ).images
