"""LiT and KV compression at micro scale, measured by the MicroShapes evaluator against the shipped model.

    python bench/lit_kv_quality.py --features runs/microshapes/features [--teacher-steps 6000]

Three runs on the MicroShapes features, each with the trainer and `configs/microshapes.yaml`:
1. LiT inherited from the shipped PixArt model (``model.inherit_from``) with hybrid distillation from it
   (``objective.teacher``), for 25% of the teacher's training steps;
2. the same LiT from scratch for the same steps (reported beside it);
3. the shipped model with KV compression (ratio 2, deep half, conv from the averaging init), briefly fine-tuned.
Each is evaluated like the teacher (20 steps, guidance 4.5, the same suite and seeds). Targets: LiT distilled >= 90%
of the teacher's one-object accuracy; KV-compressed >= 95% of it. Writes the JSON to ``--out``
(``bench/results/lit_kv_quality_cpu.json`` records it; default ``runs/bench/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, machine, write_json  # noqa: E402

CONFIG = "configs/microshapes.yaml"


def train(name: str, out: Path, features: str, overrides: list[str]):
    """Train one variant and return its final model (EMA weights when kept) and the wall time."""
    from dit.train import Trainer, load_config

    paths = [f"data.path={features}", f"output_dir={out / name}", "overwrite=true", "validation.every=0"]
    started = time.perf_counter()
    trainer = Trainer(load_config(CONFIG, [*paths, *overrides]))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ema is not None:
        with trainer.ema.swapped_in(model):
            model = copy.deepcopy(model)
    return model.eval(), time.perf_counter() - started


def evaluate(transformer, teacher_pipe, steps: int, guidance: float, n: int) -> dict:
    from dit.microshapes.suite import evaluate as run_suite
    from dit.microshapes.suite import pipeline_generator
    from dit.pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(**{**teacher_pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return run_suite(pipeline_generator(pipe, steps, guidance), n=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, help="MicroShapes feature shards (the recipe's features/)")
    parser.add_argument("--teacher", default=None, help="pipeline folder (default: the shipped model)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: read from the teacher's recipe")
    parser.add_argument("--work", default="runs/lit_kv", help="working folder (the runs)")
    add_out_argument(parser, "lit_kv_quality_cpu.json")
    parser.add_argument("--kv-steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    args = parser.parse_args()

    from dit.cli import default_model
    from dit.pipelines import TextToImagePipeline
    from dit.train import load_config

    teacher = Path(args.teacher or default_model())
    teacher_steps = args.teacher_steps or load_config(CONFIG).max_steps
    student_steps = teacher_steps // 4
    out = Path(args.work)
    teacher_pipe = TextToImagePipeline.from_pretrained(teacher)
    report = {"teacher": evaluate(teacher_pipe.transformer, teacher_pipe, args.steps, args.guidance, args.n)}
    short = [f"max_steps={student_steps}", "ema_decay=0.995", "optim.warmup_steps=100", f"checkpoint_every={10**9}"]
    runs = {
        "lit_distilled": ["model.cls=LiTTransformer", f"model.inherit_from={teacher}",
                          f"objective.teacher={teacher}", *short],
        "lit_scratch": ["model.cls=LiTTransformer", *short],
        "kv_compress_2": [f"model.inherit_from={teacher}", "model.kwargs.kv_compress_ratio=2",
                          f"max_steps={args.kv_steps}", "optim.lr=2e-4", "optim.warmup_steps=20",
                          "ema_decay=null", f"checkpoint_every={10**9}"],
    }  # fmt: skip
    times = {}
    for name, overrides in runs.items():
        model, times[name] = train(name, out, args.features, overrides)
        report[name] = evaluate(model, teacher_pipe, args.steps, args.guidance, args.n)
        print(name, json.dumps({k: report[name][k]["prompt_accuracy"] for k in ("one_object", "two_object")}))
    base = report["teacher"]["one_object"]["prompt_accuracy"]
    figures = {name: report[name]["one_object"]["prompt_accuracy"] / base if base else 0.0 for name in runs}
    met = {
        "lit_distilled_vs_teacher": figures["lit_distilled"] >= 0.9,
        "kv_vs_teacher": figures["kv_compress_2"] >= 0.95,
    }
    payload = {
        "benchmark": "lit_kv_quality",
        "device": "cpu",
        "machine": machine("cpu"),
        "config": {
            "base_config": CONFIG,
            "teacher": str(teacher),
            "teacher_steps": teacher_steps,
            "student_steps": student_steps,
            "kv_steps": args.kv_steps,
            "runs": runs,
            "evaluation": {"n": args.n, "steps": args.steps, "guidance_scale": args.guidance},
        },  # fmt: skip
        "train_seconds": times,
        "evaluations": report,
        "one_object_relative_to_teacher": figures,
        "targets": {"lit_distilled_vs_teacher": ">= 0.9", "kv_vs_teacher": ">= 0.95"},
        "met": met,
        "all_met": all(met.values()),
    }
    print(json.dumps(figures), met)
    write_json(args.out, payload, "lit_kv_quality_cpu.json")


if __name__ == "__main__":
    main()
