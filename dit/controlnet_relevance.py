"""Relevance of ControlNet blocks (RelaCtrl): the quality drop when each block of a trained adapter is skipped.

Skipping block ``p`` passes the control chain through it unchanged and adds no residual before base block ``p + 1``;
that is exactly what the slimmer adapter ``adapter.select(positions without p)`` computes, so every measurement is
a real adapter. The most relevant positions then make a slim adapter: the trained blocks kept
(:meth:`~dit.models.controlnet.ControlNetAdapter.select`), or fresh copies at those positions trained anew
(``ControlNetAdapter.from_transformer(base, positions=...)``, ``controlnet.positions`` in the trainer).

    dit controlnet-relevance --model BASE_PIPELINE --controlnet ADAPTER [--keep 3 --slim-out SLIM] [--json R.json]

(a ``dit`` command: :func:`add_parser` and :func:`run`, :mod:`dit.cli`'s convention).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from .cli_checks import SETUP_ERRORS, check_report_path, resolve_device, usage_errors
from .report import print_report

if TYPE_CHECKING:  # imported where used: `dit --help` builds this parser without torch
    from .models.controlnet import ControlNetAdapter

Metric = Callable[["ControlNetAdapter"], "dict[str, float] | float"]


def _as_scores(value: dict[str, float] | float) -> dict[str, float]:
    return dict(value) if isinstance(value, dict) else {"quality": float(value)}


def relevance(adapter: ControlNetAdapter, evaluate: Metric, key: str = "iou") -> dict:
    """Score ``adapter`` and, for each of its positions, the adapter with that block skipped.

    Args:
        adapter: a trained adapter with at least two blocks.
        evaluate: ``evaluate(adapter) -> scores`` (a dict, or one number reported as ``quality``); higher is better.
        key: the score that ranks positions (``quality`` for a metric returning one number).

    Returns:
        ``full`` (scores of the whole adapter), ``skipped`` and ``drop`` (``full[key]`` minus the score without
        that block) per position, and ``ranking``: positions from the largest drop to the smallest.
    """
    if len(adapter.positions) < 2:
        raise ValueError("Relevance compares blocks; this adapter has only one (its skip is the base model).")
    full = _as_scores(evaluate(adapter))
    if key not in full:
        raise KeyError(f"The metric returned {sorted(full)}; rank by one of them (key={key!r} is not there).")
    skipped, drop = {}, {}
    for p in adapter.positions:
        skipped[str(p)] = _as_scores(evaluate(adapter.select([q for q in adapter.positions if q != p])))
        drop[str(p)] = full[key] - skipped[str(p)][key]
    ranking = sorted(adapter.positions, key=lambda p: (-drop[str(p)], p))
    return {"positions": list(adapter.positions), "key": key, "full": full, "skipped": skipped, "drop": drop,
            "ranking": ranking}  # fmt: skip


def most_relevant(report: dict, keep: int) -> list[int]:
    """The ``keep`` positions whose skipping cost the most, ascending (the positions of a slim adapter)."""
    if not 1 <= keep <= len(report["ranking"]):
        raise ValueError(f"keep must be between 1 and {len(report['ranking'])}, got {keep}.")
    return sorted(report["ranking"][:keep])


def microshapes_metric(base_pipe, n: int = 40, steps: int = 20, guidance_scale: float = 4.5, kind: str = "silhouette"):
    """A metric for :func:`relevance`: the MicroShapes control scores (IoU with the silhouette, colour accuracy, ...)
    of ``base_pipe``'s components with the adapter under test, on ``n`` fixed scenes at the model's resolution."""
    from .microshapes.control import control_generator, control_scenes, evaluate_control, image_size
    from .pipelines import ControlNetPipeline

    scenes, (width, height) = control_scenes(n), image_size(base_pipe)
    parts = {k: v for k, v in base_pipe.components.items() if k != "controlnet"}

    def evaluate(adapter: ControlNetAdapter) -> dict[str, float]:
        pipe = ControlNetPipeline(**parts, controlnet=adapter)
        pipe.set_progress_bar_config(disable=True)
        return evaluate_control(control_generator(pipe, steps, guidance_scale), scenes, width, height, kind)

    return evaluate


def _user_metric(spec: str, base_pipe) -> Metric:
    """``module:function``; the function takes a ControlNetPipeline (base components plus the adapter under test)."""
    from .pipelines import ControlNetPipeline

    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--metric must be 'microshapes' or 'module:function', got {spec!r}.")
    function = getattr(importlib.import_module(module), name)
    parts = {k: v for k, v in base_pipe.components.items() if k != "controlnet"}
    return lambda adapter: function(ControlNetPipeline(**parts, controlnet=adapter))


def add_parser(commands) -> None:
    """The ``dit controlnet-relevance`` subcommand of ``commands`` (argparse sub-parsers)."""
    rel = commands.add_parser(
        "controlnet-relevance", help="quality drop of skipping each block of a trained ControlNet adapter (RelaCtrl)"
    )
    rel.add_argument("--model", required=True, help="the base pipeline folder the adapter was trained on")
    rel.add_argument("--controlnet", required=True, help="the trained adapter folder")
    rel.add_argument("--metric", default="microshapes",
                     help="'microshapes' (IoU with the silhouette, colour accuracy) or module:function, called "
                          "with a ControlNetPipeline and returning a number or a dict of numbers")  # fmt: skip
    rel.add_argument("--key", default=None, help="score that ranks positions (default: iou, or quality)")
    rel.add_argument("--control", choices=["silhouette", "edges"], default="silhouette")
    rel.add_argument("--n", type=int, default=40, help="MicroShapes scenes per measurement")
    rel.add_argument("--steps", type=int, default=20)
    rel.add_argument("--guidance", type=float, help="default: the base's sampling_defaults.json, else 4.5")
    rel.add_argument("--keep", type=int, help="name the KEEP most relevant positions")
    rel.add_argument("--slim-out", help="with --keep: save the adapter of the kept trained blocks here")
    rel.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rel.add_argument("--json", help="write the report here too")
    rel.set_defaults(func=run, user_errors=usage_errors)


def run(args: argparse.Namespace) -> int:
    """``dit controlnet-relevance``: the inputs are checked and loaded first (a bad one raises
    :class:`~dit.errors.UsageError`, one line), then each block's relevance is measured."""
    from .errors import as_usage_error
    from .models.controlnet import ControlNetAdapter
    from .pipelines import TextToImagePipeline
    from .pipelines.defaults import sampling_defaults

    with as_usage_error(*SETUP_ERRORS, ImportError):
        check_report_path(args.json)
        device = resolve_device(args.device)
        if args.guidance is None:
            args.guidance = sampling_defaults(args.model)["guidance_scale"]
        base = TextToImagePipeline.from_pretrained(args.model).to(device)
        adapter = ControlNetAdapter.from_pretrained(args.controlnet).to(device).eval()
        if args.metric == "microshapes":
            metric, key = microshapes_metric(base, args.n, args.steps, args.guidance, args.control), args.key or "iou"
        else:
            metric, key = _user_metric(args.metric, base), args.key or "quality"
    report = relevance(adapter, metric, key)
    report["parameters"] = {"adapter": adapter.num_parameters()}
    if args.keep:
        report["keep"] = most_relevant(report, args.keep)
        slim = adapter.select(report["keep"])
        report["parameters"]["slim"] = slim.num_parameters()
        if args.slim_out:
            slim.save_pretrained(args.slim_out)
    report["settings"] = {"model": str(args.model), "controlnet": str(args.controlnet), "metric": args.metric,
                          "n": args.n, "steps": args.steps, "guidance_scale": args.guidance, "device": device}  # fmt: skip
    print_report(report, args.json)
    return 0
