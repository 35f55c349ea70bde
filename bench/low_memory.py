"""Memory and quality of the shipped MicroShapes model in fp32, bf16, int8 weight-only and the low-memory preset.

    python bench/low_memory.py [--model PIPELINE] [--n 100] [--seeds 0 1000 2000] [--out bench/results/low_memory_cpu.json]

Each mode runs in a fresh process (peak memory is per process): it loads the pipeline, draws one batch of 10
prompts and records the peak (``VmHWM`` on the CPU, ``max_memory_allocated`` on CUDA) and the bytes of the loaded
weights, then scores the MicroShapes suite (``n`` one-object prompts, half as many two-object and held-out, the
model's own steps and guidance) once per seed. The modes:

- ``fp32``, ``bf16``: ``from_pretrained(folder, dtype=...)``;
- ``int8``: transformer and text encoder int8 weight-only (torchao), bf16 activations
  (``quantization_config("int8_weight_only")``);
- ``preset``: ``from_pretrained(folder, low_memory=True)`` (int8 text encoder, bf16 transformer and VAE; offload
  where an accelerator is).

``summary`` gives, per mode, the peak, the weight bytes and the change of each score against bf16 in points, and
the spread between bf16's own seeds (how much two independent draws of the suite differ). Target: int8 within 2
points of bf16 one-object accuracy, with every seed.

``--xl`` (CUDA) adds the PixArt-delta claim: PixArt-Sigma-XL at 1024 px with a T5-XXL-size encoder (random weights,
bf16), one image with the preset, peak allocated under 8 GB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, machine, reset_peak_rss, rss_bytes, write_json  # noqa: E402

MODES = ("fp32", "bf16", "int8", "preset")
GROUPS = ("one_object", "two_object", "held_out")
TARGET_POINTS = 2.0
XL_TARGET_GB = 8.0


# ----- one mode, in its own process ---------------------------------------------------------------------------
def load(mode: str, folder: Path, device: str):
    """The pipeline of ``folder`` as ``mode`` runs it."""
    from dit.pipelines import TextToImagePipeline
    from dit.quantization import quantization_config

    if mode == "fp32":
        return TextToImagePipeline.from_pretrained(folder).to(device)
    if mode == "bf16":
        return TextToImagePipeline.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    if mode == "int8":
        config = quantization_config("int8_weight_only")
        return TextToImagePipeline.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16).to(device)
    return TextToImagePipeline.from_pretrained(folder, low_memory={"device": device})


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (the inner tensors of a quantized weight)."""

    def stored(tensor: torch.Tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = tensor.__tensor_flatten__()
            return sum(stored(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()

    return sum(stored(t) for t in [*module.parameters(), *module.buffers()])


def peak_memory(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")


def run_mode(mode: str, folder: Path, device: str, n: int, seeds: list[int]) -> dict:
    """Load, draw one batch (the peak), then score the suite once per seed."""
    import torchao.quantization  # noqa: F401  (the libraries load before the baseline: only the model counts)
    from transformers import T5EncoderModel  # noqa: F401

    from dit.microshapes.suite import evaluate, pipeline_generator
    from dit.pipelines import TextToImagePipeline  # noqa: F401

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    before = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes("VmRSS")
    started = time.perf_counter()
    pipe = load(mode, folder, device)
    pipe.set_progress_bar_config(disable=True)
    defaults = pipe.sampling_defaults
    generate = pipeline_generator(pipe, defaults["num_inference_steps"], defaults["guidance_scale"])
    generate(["a red circle"] * 10, 0)
    peak = peak_memory(device)
    first_batch_s = time.perf_counter() - started
    weights = {name: weight_bytes(getattr(pipe, name)) for name in ("text_encoder", "transformer", "vae")}
    scores = {str(seed): evaluate(generate, n=n, seed=seed) for seed in seeds}
    return {
        "peak_bytes": peak,
        "before_load_bytes": before,
        "peak_above_start_bytes": peak - before,
        "weight_bytes": weights,
        "weight_bytes_total": sum(weights.values()),
        "load_and_first_batch_s": round(first_batch_s, 3),
        "steps": defaults["num_inference_steps"],
        "guidance_scale": defaults["guidance_scale"],
        "scores": scores,
    }


def child(args: argparse.Namespace) -> None:
    import warnings

    warnings.simplefilter("ignore")
    result = run_mode(args.child, args.model, args.device, args.n, args.seeds)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(mode: str, args: argparse.Namespace) -> dict:
    """Run ``mode`` in a fresh interpreter and return its result."""
    command = [sys.executable, __file__, "--child", mode, "--model", str(args.model), "--device", args.device,
               "--n", str(args.n), "--seeds", *map(str, args.seeds)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ----- the PixArt-delta claim (CUDA) -----------------------------------------------------------------------------
#: T5-XXL (PixArt's text encoder, 4.76B parameters) and SD's VAE (PixArt's), as configs; ``tiny`` variants for a
#: CPU smoke run of the same code.
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
T5_TINY = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
VAE_TINY = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8)


def xl_pipeline(device: str, tiny: bool = False):
    """A PixArt-Sigma-XL 1024 px pipeline with a T5-XXL-size encoder and SD's VAE, random weights, built on
    ``device`` in bf16 (fast initialisation) with the text encoder quantized int8 there (the preset's first step)."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from dit.models import PixArtTransformer
    from dit.models.presets import preset_config
    from dit.pipelines import TextToImagePipeline
    from dit.quantization import quantize_
    from dit.tiny import tiny_tokenizer

    blocks = 4
    with torch.device(device):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, **(T5_TINY if tiny else T5_XXL))).to(torch.bfloat16).eval()
        quantize_(t5)
        xl = preset_config("PixArt-Sigma-XL-2-1024")
        if tiny:
            xl.update(
                num_layers=2, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, caption_channels=64
            )
        transformer = PixArtTransformer(**xl).to(torch.bfloat16).eval()
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                            latent_channels=4, **(VAE_TINY if tiny else SD_VAE)).to(torch.bfloat16).eval()  # fmt: skip
    tokenizer = tiny_tokenizer(max_length=300)
    return TextToImagePipeline(tokenizer, t5, vae, transformer, scheduler=None)


def xl_preset_peak(height: int = 1024, tiny: bool = False) -> dict:
    """Peak allocated bytes of one 1024 px image from Sigma-XL with a T5-XXL-size encoder (random weights) under the
    preset (int8 T5, bf16 transformer and VAE, model offload). ``tiny`` shrinks every model (a CPU smoke test)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = xl_pipeline(device, tiny)
    pipe.enable_low_memory(device=device if device == "cuda" else None)
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipe("a photo of a cat", num_inference_steps=2, height=height, width=height, output_type="np",
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "device": device,
        "height": height,
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "peak_allocated_bytes": peak,
        "peak_allocated_gb": None if peak is None else round(peak / 2**30, 3),
        "seconds_2_steps": round(seconds, 2),
        "target_gb": XL_TARGET_GB,
        "met": None if peak is None else peak / 2**30 < XL_TARGET_GB,
    }


# ----- summary --------------------------------------------------------------------------------------------------
def _accuracy(scores: dict, group: str) -> float:
    return 100 * scores[group]["prompt_accuracy"]


def summarize(results: dict[str, dict], seeds: list[int]) -> dict:
    """Per mode: memory and each score's change against bf16 (points, per seed and mean); bf16's seed spread."""
    reference = results["bf16"]["scores"]
    summary = {"modes": {}, "target": f"int8 one-object accuracy within {TARGET_POINTS:g} points of bf16, every seed"}
    for mode, result in results.items():
        change = {
            group: {seed: round(_accuracy(result["scores"][seed], group) - _accuracy(reference[seed], group), 2)
                    for seed in result["scores"]}
            for group in GROUPS
        }  # fmt: skip
        summary["modes"][mode] = {
            "peak_mb": round(result["peak_bytes"] / 2**20, 1),
            "peak_above_start_mb": round(result["peak_above_start_bytes"] / 2**20, 1),
            "weight_mb": round(result["weight_bytes_total"] / 2**20, 3),
            "one_object_accuracy": {seed: _accuracy(s, "one_object") for seed, s in result["scores"].items()},
            "change_vs_bf16_points": change,
            "mean_change_vs_bf16_points": {g: round(statistics.mean(v.values()), 2) for g, v in change.items()},
        }
    if len(seeds) > 1:
        first, second = str(seeds[0]), str(seeds[1])
        summary["bf16_seed_spread_points"] = {
            group: round(_accuracy(reference[second], group) - _accuracy(reference[first], group), 2)
            for group in GROUPS
        }
    int8 = summary["modes"]["int8"]["change_vs_bf16_points"]["one_object"].values()
    summary["int8_within_target"] = all(abs(v) <= TARGET_POINTS for v in int8)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="pipeline folder (default: the shipped MicroShapes model)")
    parser.add_argument("--n", type=int, default=100, help="one-object prompts of the suite (default: 100)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1000, 2000], help="suite seeds (default: 0 1000 2000)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--xl", action="store_true", help="add Sigma-XL at 1024 px with the preset (CUDA)")
    parser.add_argument("--xl-tiny", action="store_true", help="--xl with tiny models (a CPU smoke run)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    add_out_argument(parser, "low_memory_cpu.json")
    args = parser.parse_args()
    if args.model is None:
        from dit.microshapes.shipped import default_model

        args.model = default_model()
    if args.child:
        return child(args)
    if "bf16" not in args.modes:
        parser.error("--modes needs bf16: every score is compared with it")
    results = {}
    for mode in args.modes:
        print(f"{mode} ...", flush=True)
        results[mode] = spawn(mode, args)
        print(f"  peak {results[mode]['peak_bytes'] / 2**20:.0f} MB, one-object "
              f"{[_accuracy(s, 'one_object') for s in results[mode]['scores'].values()]}", flush=True)  # fmt: skip
    payload = {
        "benchmark": "low_memory",
        "device": args.device,
        "machine": machine(args.device),
        "config": {"model": str(args.model), "n": args.n, "seeds": args.seeds, "modes": args.modes},
        "results": results,
        "summary": summarize(results, args.seeds),
    }
    if args.xl or args.xl_tiny:
        payload["xl"] = xl_preset_peak(tiny=args.xl_tiny)
    print(json.dumps(payload["summary"], indent=2))
    write_json(args.out, payload, f"low_memory_{args.device}.json")


if __name__ == "__main__":
    main()
