"""The loss-curve PNG (train/run/loss_plot.py): drawn with PIL from synthetic metrics, never blank, never fatal."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from dit.train.run.loss_plot import (
    BACKGROUND,
    MARGINS,
    RAW,
    SIZE,
    SMOOTHED,
    _y_scale,
    draw_loss_curve,
    read_losses,
    save_loss_plot,
    smooth,
    smoothing_weight,
)


def _plot_area(image: Image.Image) -> np.ndarray:
    """The pixels inside the axes, (H, W, 3)."""
    left, top, right, bottom = MARGINS
    return np.asarray(image)[top : image.height - bottom, left + 1 : image.width - right]


def _pixels_of(area: np.ndarray, color: tuple) -> np.ndarray:
    """(rows, columns) of the pixels of exactly ``color``."""
    return np.argwhere((area == np.array(color, dtype=np.uint8)).all(axis=-1))


STEPS = list(range(10, 1010, 10))
CURVES = {
    "constant": (STEPS, [0.25] * len(STEPS)),
    "one point": ([7], [0.4]),
    "decades": (STEPS, [3.0 * math.exp(-s / 150) + 1e-3 for s in STEPS]),  # 3 .. 0.004: log scale
    "with nan": (STEPS, [float("nan") if s % 70 == 0 else 1.0 / s for s in STEPS]),
    "negative": (STEPS, [-1.0 + 0.001 * s for s in STEPS]),  # e.g. a VLB term: linear scale, not log
}


@pytest.mark.parametrize("name", list(CURVES))
def test_the_curve_is_drawn(name):
    steps, losses = CURVES[name]
    image = draw_loss_curve(steps, losses)
    assert image.size == SIZE and image.mode == "RGB"
    area = _plot_area(image)
    curve = np.concatenate([_pixels_of(area, RAW), _pixels_of(area, SMOOTHED)])  # the smoothed line may cover it
    assert len(curve) >= (5 if len(steps) == 1 else 200), f"{name}: {len(curve)} curve pixels"
    assert (area != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1).mean() > 0.001
    if len(steps) > 20:
        assert len(_pixels_of(area, SMOOTHED)) >= 200  # the smoothed line over the raw one
    columns = curve[:, 1]
    if len(steps) > 1:  # the curve spans the plot's width, first step to last
        assert columns.min() <= 5 and columns.max() >= area.shape[1] - 6


def test_a_falling_loss_is_drawn_falling():
    image = draw_loss_curve(*CURVES["decades"])
    raw = _pixels_of(_plot_area(image), RAW)
    first = raw[raw[:, 1] == raw[:, 1].min(), 0].mean()  # rows grow downwards
    last = raw[raw[:, 1] == raw[:, 1].max(), 0].mean()
    assert first < last - 100


@pytest.mark.parametrize(("name", "log"), [("decades", True), ("constant", False), ("negative", False)])
def test_log_scale_when_the_loss_spans_decades(name, log):
    losses = [v for v in CURVES[name][1] if math.isfinite(v)]
    low, high, is_log = _y_scale(losses)
    assert is_log == log and low < high
    if log:
        assert low <= math.log10(min(losses)) and high >= math.log10(max(losses))


def test_the_smoothed_line_keeps_up_with_a_short_curve():
    """Ten logged steps of a falling loss: no smoothing (the raw line is the curve); 400 steps: the smoothed line at
    the end is within a few percent of the loss there, not still near the start."""
    assert smoothing_weight(10) == 0.0 and 0.85 < smoothing_weight(200) < 0.95 and smoothing_weight(10**6) == 0.99
    losses = [1.0 - 0.002 * s for s in range(400)]  # 1.0 -> 0.2
    assert abs(smooth(losses, smoothing_weight(400))[-1] - losses[-1]) < 0.05


def test_smoothing_starts_at_the_first_value_and_follows_a_constant():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 0.0])[0] == 1.0


def test_metrics_are_read_skipping_bad_lines(tmp_path):
    lines = [json.dumps({"step": 1, "loss": 0.5}), "{half a line", json.dumps({"step": 2, "lr": 0.1}),
             json.dumps({"step": 3, "loss": float("nan")}), json.dumps({"step": 4, "loss": 0.25})]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_losses(tmp_path / "metrics.jsonl") == ([1, 4], [0.5, 0.25])


def test_the_plot_is_written_and_copied(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in STEPS))
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    assert save_loss_plot(tmp_path, checkpoint) == tmp_path / "loss.png"
    assert Image.open(tmp_path / "loss.png").size == SIZE
    assert (checkpoint / "loss.png").read_bytes() == (tmp_path / "loss.png").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_plot_that_fails_is_a_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.warns(UserWarning, match="loss.png not written"):
        assert save_loss_plot(tmp_path, tmp_path / "no such checkpoint") is None
    assert save_loss_plot(tmp_path / "empty") is None  # no metrics yet: nothing to draw, nothing said
