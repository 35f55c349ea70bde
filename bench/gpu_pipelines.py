"""The GPU suite's end-to-end parts: the CUDA test package, the shipped MicroShapes model (generation and the
evaluator), PixArt-δ's few-step headline case, and the MicroShapes recipe. Used by ``bench/gpu_suite.py``."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synchronize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The shipped model's scores on the CPU (README; bench/results/microshapes_cpu.json at 20 steps).
CPU_SCORES = {"one_object": 0.95, "two_object": 0.67, "held_out": 0.60}


def pytest_part(args) -> dict:
    """``pytest -m gpu`` (tests/gpu: the trainer's exactness tests and the sync-free forward, on CUDA)."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "tests/gpu"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout)
    (args.out_dir / "gpu_pytest.log").write_text(result.stdout + result.stderr)  # the tracebacks, beside the JSON
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(cmd[1:]), "returncode": result.returncode, "summary": tail, "counts": counts,
            "failures": failures[:40], "wall_s": round(time.perf_counter() - started, 1),
            "met": result.returncode == 0 and (args.tiny or counts.get("passed", 0) > 0)}  # fmt: skip


def microshapes_part(args) -> dict:
    """The shipped model on ``args.device``: one image's time, then the evaluator (as ``dit eval microshapes``)."""
    from dit.cli import default_model
    from dit.microshapes.suite import evaluate, pipeline_generator
    from dit.pipelines import TextToImagePipeline
    from dit.pipelines.defaults import sampling_defaults

    folder = default_model()
    defaults = sampling_defaults(folder)
    pipe = TextToImagePipeline.from_pretrained(folder).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    steps = 2 if args.tiny else defaults["num_inference_steps"]
    prompt = "a large red circle on the left, on a white background"
    generator = torch.Generator().manual_seed(0)
    pipe(prompt, num_inference_steps=steps, guidance_scale=defaults["guidance_scale"], generator=generator)
    synchronize(args.device)
    started = time.perf_counter()
    pipe(prompt, num_inference_steps=steps, guidance_scale=defaults["guidance_scale"], generator=generator)
    synchronize(args.device)
    image_s = time.perf_counter() - started
    n = 2 if args.tiny else 60
    started = time.perf_counter()
    torch.manual_seed(0)
    report = evaluate(pipeline_generator(pipe, steps, defaults["guidance_scale"]), n=n)
    scores = {group: report[group]["prompt_accuracy"] for group in CPU_SCORES}
    # the same quality: within two standard errors of the CPU score (n = 60 one-object, 30 per other group)
    tolerance = {g: 2 * (CPU_SCORES[g] * (1 - CPU_SCORES[g]) / report[g]["n"]) ** 0.5 for g in CPU_SCORES}
    same = {g: scores[g] >= CPU_SCORES[g] - tolerance[g] for g in CPU_SCORES}
    return {"steps": steps, "guidance_scale": defaults["guidance_scale"], "one_image_s": round(image_s, 4),
            "evaluation_s": round(time.perf_counter() - started, 1), "scores": scores, "cpu_scores": CPU_SCORES,
            "two_standard_errors": {g: round(t, 3) for g, t in tolerance.items()}, "same_quality": same,
            "met": args.tiny or all(same.values())}  # fmt: skip


def _t5_xxl(device: str, dtype: torch.dtype, tiny: bool):
    """A T5-XXL-shaped encoder (PixArt's text encoder, 4.7B parameters) with random weights, built on ``device``."""
    from transformers import T5Config, T5EncoderModel

    if tiny:
        from dit.tiny import tiny_t5

        return tiny_t5().to(device, dtype)
    config = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
                      vocab_size=32128, is_encoder_decoder=False)  # fmt: skip
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def _sd_vae(device: str, dtype: torch.dtype, tiny: bool):
    """An SD-shaped AutoencoderKL (PixArt's VAE: 4 latent channels, 8x) with random weights."""
    from diffusers import AutoencoderKL

    if tiny:
        from dit.tiny import tiny_vae

        return tiny_vae().to(device, dtype)
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=1024, scaling_factor=0.13025)  # fmt: skip
    return vae.to(dtype).eval()


def lcm_part(args) -> dict:
    """PixArt-δ's headline: a 1024 px image from a PixArt-XL-shaped LCM student in 4 steps (transformer + VAE
    decode, the T5 encoding timed apart) against the teacher's 20 steps with classifier-free guidance."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler
    from gpu_models import TINY, XL

    from dit import PixArtTransformer
    from dit.models.base import compile_repeated_blocks
    from dit.pipelines import TextToImagePipeline

    device, dtype, size = args.device, args.dtype, 64 if args.tiny else 1024
    config = {**(TINY if args.tiny else XL), "use_additional_conditions": not args.tiny}
    with torch.device(device):
        torch.manual_seed(0)
        transformer = PixArtTransformer(**config).to(dtype).eval()
    text_encoder = _t5_xxl(device, dtype, args.tiny)
    tokens = torch.randint(0, text_encoder.config.vocab_size, (1, 16 if args.tiny else 300), device=device)
    with torch.no_grad():
        text_encoder(tokens)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        embeds = text_encoder(tokens)[0]  # (1, L, C)
        synchronize(device)
    t5_s = time.perf_counter() - started
    del text_encoder
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long, device=device)
    mask[:, :20] = 1
    vae = _sd_vae(device, dtype, args.tiny)
    pipe = TextToImagePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=LCMScheduler(num_train_timesteps=1000))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    runs = {}
    settings = {"student_4_steps": (LCMScheduler(num_train_timesteps=1000), 4, 1.0),
                "teacher_20_steps": (DPMSolverMultistepScheduler(), 20, 4.5)}  # fmt: skip
    for mode in ("eager",) if args.no_compile else ("eager", "compiled"):
        if mode == "compiled":
            compile_repeated_blocks(transformer, fullgraph=True, backend=args.compile_backend)
        for name, (scheduler, steps, guidance) in settings.items():
            pipe.scheduler = scheduler
            kwargs = dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=torch.zeros_like(embeds),
                          negative_prompt_attention_mask=mask, num_inference_steps=steps, guidance_scale=guidance,
                          height=size, width=size, output_type="pt", use_resolution_binning=False)  # fmt: skip
            pipe(**kwargs)  # warm-up (and compilation)
            times = []
            for _ in range(args.runs):
                synchronize(device)
                started = time.perf_counter()
                pipe(**kwargs)
                synchronize(device)
                times.append(time.perf_counter() - started)
            runs[f"{name}_{mode}"] = {
                "median_s": round(sorted(times)[len(times) // 2], 4),
                "runs_s": [round(t, 4) for t in times],
            }
    best = min(v["median_s"] for k, v in runs.items() if k.startswith("student"))
    return {"size_px": size, "transformer": "PixArt-XL-2 shape, random weights" if not args.tiny else "tiny",
            "vae": "SD-shaped AutoencoderKL, random weights", "t5_encode_s": round(t5_s, 4), "runs": runs,
            "student_best_s": best, "target_s": 0.25, "pixart_delta_a100_s": 0.5,
            "met": args.tiny or best <= 0.25}  # fmt: skip


def recipe_part(args) -> dict:
    """The whole MicroShapes recipe on ``args.device`` (its wall time, per stage), then the evaluator on its model."""
    from dit.microshapes import recipe
    from dit.microshapes.suite import evaluate, pipeline_generator
    from dit.pipelines import TextToImagePipeline

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "microshapes"
        if args.tiny:
            overrides = ["max_steps=2", "checkpoint_every=2", "validation.every=0", "data.batch_size=4"]
            report = recipe.run(
                str(out), recipe.DEFAULT_CONFIG, 16, 2, overrides, device=args.device, text_encoder_steps=2
            )
        else:
            report = recipe.run(str(out), recipe.DEFAULT_CONFIG, recipe.N_IMAGES, recipe.VAE_STEPS, [],
                                device=args.device)  # fmt: skip
        pipe = TextToImagePipeline.from_pretrained(out / "pipeline").to(args.device)
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)
        scores = evaluate(pipeline_generator(pipe, 2 if args.tiny else 20, 2.5), n=2 if args.tiny else 60)
    accuracy = {group: scores[group]["prompt_accuracy"] for group in CPU_SCORES}
    total = report["stages"]["total_s"]
    targets = {"one_object": 0.9, "two_object": 0.6, "held_out": 0.5}
    met = args.tiny or (total <= 300 and all(accuracy[g] >= t for g, t in targets.items()))
    return {"stages_s": report["stages"], "total_s": round(total, 1), "target_s": 300, "scores": accuracy,
            "score_targets": targets, "met": met}  # fmt: skip
