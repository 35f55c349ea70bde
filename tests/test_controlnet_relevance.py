"""Relevance of ControlNet blocks (RelaCtrl): skip-one scores, ranking, slim adapters, ``dit controlnet-relevance``."""

import json

import pytest
import torch

from dit import ControlNetAdapter, PixArtTransformer
from dit.cli import main as cli_main
from dit.controlnet_relevance import most_relevant, relevance
from dit.tiny import tiny_pipeline

WEIGHTS = {0: 0.5, 1: 0.05, 2: 0.3}  # a known relevance per position


def _adapter(num_layers: int = 4, num_blocks: int = 3):
    from dit.tiny import TINY_PIXART

    torch.manual_seed(0)
    return ControlNetAdapter.from_transformer(
        PixArtTransformer(**{**TINY_PIXART, "num_layers": num_layers}), num_blocks
    )


def _known_metric(adapter):
    """A metric that sees which blocks an adapter holds (by their trained weights) and sums their relevance."""
    return {"quality": sum(WEIGHTS[int(b.after_proj.bias[0])] for b in adapter.controlnet_blocks), "other": 1.0}


def test_each_block_skipped_ranks_positions_by_quality_drop():
    adapter = _adapter()
    with torch.no_grad():
        for p, block in zip(adapter.positions, adapter.controlnet_blocks):
            block.after_proj.bias.fill_(p)  # tag each block with its position
    report = relevance(adapter, _known_metric, key="quality")
    assert report["full"]["quality"] == pytest.approx(0.85)
    assert report["drop"] == pytest.approx({"0": 0.5, "1": 0.05, "2": 0.3})
    assert report["ranking"] == [0, 2, 1] and most_relevant(report, 2) == [0, 2]
    assert relevance(adapter, lambda a: float(len(a.positions)), key="quality")["drop"] == {"0": 1, "1": 1, "2": 1}
    with pytest.raises(KeyError, match="key='iou' is not there"):
        relevance(adapter, _known_metric)
    with pytest.raises(ValueError, match="keep must be between 1 and 3"):
        most_relevant(report, 4)
    with pytest.raises(ValueError, match="only one"):
        relevance(adapter.select([1]), _known_metric, key="quality")


def _scale_metric(pipe):
    """A user metric (``module:function``, called with a ControlNetPipeline): the adapter's block count."""
    return float(len(pipe.adapters[0].positions))


def test_cli_measures_a_trained_adapter_and_writes_a_slim_one(tmp_path, capsys):
    pipe = tiny_pipeline(num_layers=4)
    pipe.save_pretrained(tmp_path / "base")
    adapter = ControlNetAdapter.from_transformer(pipe.transformer, num_blocks=3)
    with torch.no_grad():
        for block in adapter.controlnet_blocks:
            block.after_proj.weight.normal_(0.0, 0.5)
    adapter.save_pretrained(tmp_path / "adapter")
    args = ["controlnet-relevance", "--model", str(tmp_path / "base"), "--controlnet", str(tmp_path / "adapter"),
            "--n", "2", "--steps", "1", "--keep", "2", "--slim-out", str(tmp_path / "slim"), "--json",
            str(tmp_path / "report.json")]  # fmt: skip
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["positions"] == [0, 1, 2] and set(report["drop"]) == {"0", "1", "2"}
    assert {"iou", "color_accuracy", "background_accuracy"} <= set(report["full"])
    slim = ControlNetAdapter.from_pretrained(tmp_path / "slim")
    assert slim.positions == report["keep"] and len(report["keep"]) == 2
    assert report["parameters"]["slim"] == slim.num_parameters() < report["parameters"]["adapter"]
    user = args[:5] + ["--metric", "tests.test_controlnet_relevance:_scale_metric"]
    assert cli_main(user) == 0
    assert json.loads(capsys.readouterr().out)["drop"] == {"0": 1.0, "1": 1.0, "2": 1.0}
