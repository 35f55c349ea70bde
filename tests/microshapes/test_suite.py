"""The evaluation suite: an oracle scores ~100%, a wrong generator 0, and `dit eval microshapes` writes its JSON."""

import json

import numpy as np

from dit.cli import main as cli_main
from dit.microshapes import caption, render
from dit.microshapes.suite import evaluate, prompt_suite
from dit.microshapes.world import HELD_OUT
from dit.tiny import tiny_pipeline


def test_suite_groups():
    suite = prompt_suite(20)
    assert len(suite["one_object"]) == 20 and len(suite["two_object"]) == 10 and len(suite["held_out"]) == 10
    assert all(s.held_out for s in suite["held_out"])
    assert not any(s.held_out for g in ("one_object", "two_object") for s in suite[g])
    assert all((o.color, o.shape) != HELD_OUT or s.held_out for g in suite.values() for s in g for o in s.objects)


def test_oracle_and_wrong_generators():
    scenes = {caption(s): s for group in prompt_suite(20).values() for s in group}
    oracle = evaluate(lambda prompts, seed: [render(scenes[p]) for p in prompts], n=20)
    for group in ("one_object", "two_object", "held_out"):
        assert oracle[group]["prompt_accuracy"] >= 0.95, (group, oracle[group])
    blank = evaluate(lambda prompts, seed: [np.zeros((64, 64, 3), np.uint8) for _ in prompts], n=20)
    assert all(blank[g]["prompt_accuracy"] == 0 for g in ("one_object", "two_object", "held_out"))
    assert blank["one_object"]["attribute_accuracy"]["color"] == 0


def test_cli_eval_writes_report(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    args = ["eval", "microshapes", "--model", str(tmp_path / "model"), "--n", "4", "--steps", "2", "--size", "32x32",
            "--json", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"one_object", "two_object", "held_out", "seconds_per_image", "settings"}
    assert 0 <= report["one_object"]["prompt_accuracy"] <= 1 and report["settings"]["size"] == "32x32"
