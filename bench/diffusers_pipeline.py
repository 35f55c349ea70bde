"""diffusers' own ``PixArtSigmaPipeline`` with our transformer against diffusers' ``PixArtTransformer2DModel``
(the same weights), as a diffusers user would drop ours in: the pipeline passes the 300-token T5 mask to the
transformer as it is (our pipelines trim it on the host first).

On the CPU the mask is host data, so our backbone trims it in its forward (``dit.models.inputs.text_tokens``): the
cross-attention reads 64 keys instead of 300. ``sdpa_flex`` (FlexAttention over a block mask built on the device)
is timed too; it is what skips padded keys where the mask lives on a GPU (``bench/gpu_targets.py``'s
``diffusers_pipeline_speedup`` measures that case on an H100/H200). Latents out (``output_type="latent"``), so the
figure is the denoising loop's: DPM-Solver, classifier-free guidance (batch 2), 20 of 300 tokens kept.

Runs alternate and flip order; medians. Writes ``diffusers_pipeline_<device>.json``:

    python bench/diffusers_pipeline.py --out bench/results/diffusers_pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_models  # noqa: E402
from backbone_forward import VARIANTS  # noqa: E402
from common import add_out_argument, alternate, machine, write_json  # noqa: E402

#: A PixArt-Σ-shaped model small enough for a CPU (T5-XXL-wide captions, 300 tokens).
CPU_SHAPE = dict(num_attention_heads=6, attention_head_dim=64, cross_attention_dim=384, caption_channels=4096)
TEXT_TOKENS, KEPT_TOKENS = 300, 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default: 256)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default: 8)")
    parser.add_argument("--no-flex", action="store_true", help="leave out the sdpa_flex arm")
    add_out_argument(parser, "diffusers_pipeline_<device>.json")
    return parser.parse_args(argv)


def pipelines(args: argparse.Namespace) -> dict:
    """The pipeline call of each arm: diffusers' transformer, ours (sdpa, trimming the host mask), ours with
    ``sdpa_flex``, and ours with the trimming off (what the trim is worth)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    config = {**gpu_models.XL, **CPU_SHAPE, **VARIANTS["sigma"]["config"], "sample_size": args.size // 8,
              "num_layers": args.layers}  # fmt: skip
    reference, ours = gpu_models._pair(config, args.device, dtype)
    transformers = {"diffusers": reference, "ours": ours}
    if not args.no_flex:
        flex = gpu_models._pair(config, args.device, dtype)[1]
        flex.set_attention_backend("sdpa_flex")
        transformers["ours_sdpa_flex"] = flex
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, TEXT_TOKENS, config["caption_channels"], generator=gen).to(args.device, dtype)  # (1, L, C)
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device=args.device)
    mask[:, :KEPT_TOKENS] = 1
    kwargs = dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                  negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask,
                  num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent",
                  use_resolution_binning=False)  # fmt: skip
    calls = {}
    for name, transformer in transformers.items():
        pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        calls[name] = lambda pipe=pipe: pipe(**kwargs, generator=torch.Generator(args.device).manual_seed(0))[0]
    calls["ours_untrimmed"] = _untrimmed(calls["ours"])
    return calls, config


def _untrimmed(call):
    """``call`` with the backbone's host trimming off: ours over all 300 keys, as with a mask on a GPU and SDPA."""
    from dit.models import inputs

    def run():
        host_mask = inputs._host_mask
        inputs._host_mask = lambda *args: False
        try:
            return call()
        finally:
            inputs._host_mask = host_mask

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    calls, config = pipelines(args)
    with torch.no_grad():
        outputs = {name: call() for name, call in calls.items()}  # also the warm-up (and flex's compilation)
    expected = outputs["diffusers"].float()
    scale = max(1.0, expected.abs().max().item())  # random weights: latents of a few hundred
    diffs = {name: (out.float() - expected).abs().max().item() / scale for name, out in outputs.items()}
    timing = alternate(calls, args.device, args.runs, warmup=1)
    seconds = {name: round(t["median_s"], 4) for name, t in timing.items()}
    payload = {
        "benchmark": "diffusers_pipeline", "machine": machine(args.device),
        "config": {"transformer": {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers",
                                                           "caption_channels", "sample_size")},
                   "size_px": args.size, "steps": args.steps, "guidance": "4.5 (CFG batch 2)",
                   "text_tokens": TEXT_TOKENS, "kept_tokens": KEPT_TOKENS, "runs": args.runs, "output": "latents"},
        "median_s": seconds, "runs_s": {name: t["runs_s"] for name, t in timing.items()},
        "speedup_vs_diffusers": {name: round(seconds["diffusers"] / s, 3) for name, s in seconds.items()},
        "max_relative_diff_vs_diffusers": diffs,
    }  # fmt: skip
    print({name: (seconds[name], payload["speedup_vs_diffusers"][name]) for name in seconds}, flush=True)
    write_json(args.out, payload, f"diffusers_pipeline_{args.device}.json")
    return payload


if __name__ == "__main__":
    main()
