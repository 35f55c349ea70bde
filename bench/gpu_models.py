"""The GPU suite's model parts: the PixArt-XL forward and the training step, ours against diffusers in one run.

Used by ``bench/gpu_suite.py``; each part returns a JSON-ready dict. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one real call of each side (the work each side executes: diffusers
attends to the full text padding, ours to the padding our pipeline and trainer leave, trimmed to 64-multiples), and
MFU is those FLOPs per second over the bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_forward import VARIANTS, base_config, inputs  # noqa: E402
from common import alternate  # noqa: E402

#: PixArt-XL-2 at 1024 px, all 28 layers (α: micro-conditions, 120-token text; Σ: none, 300-token text).
XL = base_config("PixArt-XL-2-1024")
#: The same shapes at toy width and depth, for ``--tiny`` (CPU, seconds).
TINY = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, cross_attention_dim=48,
            sample_size=16, patch_size=2, caption_channels=32, interpolation_scale=1, num_layers=2)  # fmt: skip


def counted_flops(fn) -> int:
    """FLOPs one call of ``fn`` executes (matmuls, convolutions, attention), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _pair(config: dict, device: str, dtype: torch.dtype):
    """diffusers' PixArtTransformer2DModel with random weights and ours with the same weights, built on ``device``."""
    from diffusers import PixArtTransformer2DModel

    from dit import PixArtTransformer

    torch.manual_seed(0)
    with torch.device(device):
        reference = PixArtTransformer2DModel(**config).eval()
        ours = PixArtTransformer(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.to(dtype), ours.to(dtype)


def _inputs(variant: str, size: int, batch: int, dtype: torch.dtype, device: str, channels: int) -> tuple[dict, dict]:
    """diffusers' inputs (the text padded as its pipeline passes it) and ours (trimmed as our pipeline trims it)."""
    theirs = inputs(variant, size, batch, dtype, device, width=channels)
    ours = inputs(variant, size, batch, dtype, device, trimmed=True, width=channels)
    return {**theirs, "return_dict": False}, {**ours, "return_dict": False}


def _calls(model, kwargs: dict, n: int):
    def run():
        with torch.no_grad():
            for _ in range(n):
                model(**kwargs)

    return run


def compile_diffusers_blocks(model, **kwargs) -> None:
    """Regional compilation of diffusers' PixArt (its ``_repeated_blocks`` is empty): every block, as ours."""
    for block in model.transformer_blocks:
        block.compile(**kwargs)


def forward_part(args, peak_tflops: float) -> dict:
    """Forward of the XL model (or ``--tiny``), α and Σ, 512/1024 px, batch 1/4, eager then regionally compiled."""
    from dit.models.base import compile_repeated_blocks

    device, dtype = args.device, args.dtype
    config_base = TINY if args.tiny else XL
    sizes, batches = ((64,), (1, 2)) if args.tiny else ((512, 1024), (1, 4))
    modes = ("eager", "compiled") if not args.no_compile else ("eager",)
    cases, flop_counts = [], {}  # FLOPs are counted in eager mode (a dispatch mode cannot run compiled code)
    for variant in VARIANTS:
        config = {**config_base, **VARIANTS[variant]["config"]}
        reference, ours = _pair(config, device, dtype)
        for mode in modes:
            if mode == "compiled":
                options = {"backend": args.compile_backend, "dynamic": False}  # one static graph per shape
                compile_repeated_blocks(ours, fullgraph=True, **options)
                compile_diffusers_blocks(reference, **options)
            for size in sizes:
                for batch in batches:
                    theirs, mine = _inputs(variant, size, batch, dtype, device, config["caption_channels"])
                    with torch.no_grad():
                        expected, actual = reference(**theirs)[0].float(), ours(**mine)[0].float()
                    if mode == "eager":
                        flop_counts[variant, size, batch] = {"diffusers": counted_flops(_calls(reference, theirs, 1)),
                                                             "ours": counted_flops(_calls(ours, mine, 1))}  # fmt: skip
                    flops = flop_counts[variant, size, batch]
                    fns = {"diffusers": _calls(reference, theirs, args.calls), "ours": _calls(ours, mine, args.calls)}
                    timing = alternate(fns, device, args.runs, warmup=2 if mode == "compiled" else 1)
                    case = {"variant": variant, "mode": mode, "size_px": size, "batch": batch,
                            "text_tokens": {"diffusers": VARIANTS[variant]["text_tokens"],
                                            "ours": mine["encoder_hidden_states"].shape[1]},
                            "real_text_tokens": VARIANTS[variant]["real_tokens"],
                            "max_abs_diff": (actual - expected).abs().max().item(),
                            "output_absmax": expected.abs().max().item()}  # fmt: skip
                    for name in ("diffusers", "ours"):
                        per_call = timing[name]["median_s"] / args.calls
                        case[name] = {"ms": round(per_call * 1e3, 3), "gflop": round(flops[name] / 1e9, 2),
                                      "mfu": float(f"{flops[name] / per_call / 1e12 / peak_tflops:.3g}"),  # 3 significant digits: tiny runs stay > 0
                                      "rounds_ms": [round(t / args.calls * 1e3, 3) for t in timing[name]["runs_s"]]}  # fmt: skip
                    case["speedup"] = round(case["diffusers"]["ms"] / case["ours"]["ms"], 3)
                    case["target"] = 1.3 if mode == "eager" else 1.15
                    case["met"] = case["speedup"] >= case["target"]
                    print(f"forward {variant} {mode} {size}px b{batch}: diffusers {case['diffusers']['ms']} ms, ours "
                          f"{case['ours']['ms']} ms (x{case['speedup']}), MFU {case['ours']['mfu']}", flush=True)  # fmt: skip
                    cases.append(case)
        del reference, ours
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"config": {**config_base, "dtype": str(dtype), "calls_per_round": args.calls, "rounds": args.runs},
            "targets": "eager: ours >= 1.3x diffusers' eager forward in every case; compiled (regional, both): ours "
                       ">= 1.15x compiled diffusers",
            "cases": cases, "all_met": all(c["met"] for c in cases)}  # fmt: skip


def _train_setup(args, size: int, batch: int, folder: Path, overrides: tuple = ()):
    """Our trainer (EMA on; ``overrides``: more of its config) and diffusers' model + AdamW with the same initial
    weights (bench/train_step.py)."""
    import argparse

    import train_step

    config = {k: v for k, v in (TINY if args.tiny else XL).items() if k != "num_layers"}
    layers = (TINY if args.tiny else XL)["num_layers"]
    setup = argparse.Namespace(
        batch=batch, size=size, layers=layers, dtype="bf16" if args.dtype == torch.bfloat16 else "fp32"
    )
    text_tokens = 32 if args.tiny else train_step.TEXT_TOKENS
    train_step.write_features(folder, batch, size // 8, text_tokens, width=config["caption_channels"])
    trainer, reference, optimizer = train_step.build(setup, folder, config, ema_decay=0.9999, overrides=overrides)
    return train_step, setup, trainer, reference, optimizer


def _train_case(args, peak_tflops: float, size: int, batch: int, folder: Path, overrides: tuple = ()) -> dict:
    from dit.models.base import compile_repeated_blocks

    train_step, setup, trainer, reference, optimizer = _train_setup(args, size, batch, folder, overrides)
    device = str(trainer.accelerator.device.type)
    batches, fixed = trainer._batches(0, 100_000), train_step.reference_batch(trainer, batch)
    model = trainer.accelerator.unwrap_model(trainer.model)

    def ours_step():
        trainer._optimizer_step(batches, 1)
        trainer.ema.update(model)

    def theirs_step():
        train_step.reference_step(reference, optimizer, fixed, device, setup.dtype)

    flops = {"diffusers": counted_flops(theirs_step), "ours": counted_flops(ours_step)}  # eager: before compiling
    case = {"size_px": size, "batch": batch, "layers": setup.layers, "ema": True, "overrides": list(overrides)}
    for mode in ("eager",) if args.no_compile else ("eager", "compiled"):
        if mode == "compiled":
            compile_repeated_blocks(trainer.model, fullgraph=True, backend=args.compile_backend)
        timing = alternate({"diffusers": theirs_step, "ours": ours_step}, device, args.runs, warmup=2)
        for name in ("diffusers", "ours") if mode == "eager" else ("ours",):
            seconds = timing[name]["median_s"]
            case[name if mode == "eager" else "ours_compiled"] = {
                "ms": round(seconds * 1e3, 2), "gflop": round(flops[name] / 1e9, 1),
                "mfu": float(f"{flops[name] / seconds / 1e12 / peak_tflops:.3g}"),
                "runs_ms": [round(t * 1e3, 2) for t in timing[name]["runs_s"]],
            }  # fmt: skip
    ours = [case[k] for k in ("ours", "ours_compiled") if k in case]
    case["throughput_ratio"] = round(case["diffusers"]["ms"] / min(o["ms"] for o in ours), 3)
    case["best_mfu"] = max(o["mfu"] for o in ours)
    case["met"] = case["throughput_ratio"] >= 1.3 and case["best_mfu"] >= 0.4
    print(f"train {size}px b{batch}: diffusers {case['diffusers']['ms']} ms, ours {[o['ms'] for o in ours]} ms "
          f"(x{case['throughput_ratio']}), MFU {case['best_mfu']}", flush=True)  # fmt: skip
    return case


def train_part(args, peak_tflops: float) -> dict:
    """One optimizer step: ours (``Trainer._optimizer_step`` + the EMA update, eager and with compiled blocks)
    against diffusers' plain step (forward, loss, backward, clip, AdamW; no EMA)."""
    cases = []
    for size, batch in ((64, 2),) if args.tiny else ((512, 8), (1024, 2)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cases.append(_train_case(args, peak_tflops, size, batch, Path(tmp)))
            except Exception as error:  # one broken case is recorded; the others keep their figures
                traceback.print_exc()
                cases.append({"size_px": size, "batch": batch, "error": f"{type(error).__name__}: {error}",
                              "met": False})  # fmt: skip
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return {"targets": "512 px batch 8: >= 1.3x diffusers' plain step and MFU >= 0.40 (ours' best of eager/compiled)",
            "cases": cases, "all_met": cases[0]["met"]}  # fmt: skip
