"""The loss curve as a PNG (``output_dir/loss.png``, and one in each checkpoint), drawn with PIL alone from
``metrics.jsonl``: the logged loss per step, a smoothed line, a log-scale y axis when the loss spans a decade or more.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .checkpointing import METRICS

LOSS_PLOT = "loss.png"
SIZE = (640, 400)
MARGINS = (72, 36, 24, 48)  # left, top, right, bottom: the plot area is what is inside
BACKGROUND, AXES, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
RAW, SMOOTHED = (150, 185, 230), (20, 70, 170)


def read_losses(metrics: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the records of ``metrics.jsonl`` that hold a finite loss; unreadable lines are skipped."""
    steps, losses = [], []
    for line in Path(metrics).read_text().splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(loss):
            steps.append(step)
            losses.append(loss)
    return steps, losses


def smoothing_weight(count: int) -> float:
    """The moving average's weight for a curve of ``count`` points: an effective window of about a twentieth of the
    curve (0 up to 20 points, 0.9 at 200, at most 0.99), so that the smoothed line never lags far behind."""
    return min(0.99, max(0.0, 1.0 - 20.0 / max(count, 1)))


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the first value."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** (i + 1)))
    return smoothed


def _y_scale(losses: list[float]) -> tuple[float, float, bool]:
    """(low, high, log): the y range, in log10 units when every loss is positive and they span a decade or more."""
    low, high = min(losses), max(losses)
    log = low > 0 and high / low >= 10
    if log:
        return math.floor(math.log10(low)), math.ceil(math.log10(high)), True
    pad = (high - low) * 0.05 or max(abs(high) * 0.1, 1e-3)
    return low - pad, high + pad, False


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values inside [low, high]: 1, 2 or 5 times a power of ten apart (at least 1 when ``integer``)."""
    raw = max((high - low) / max(count - 1, 1), 1.0 if integer else 0.0)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    spacing = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / spacing) * spacing
    return [first + i * spacing for i in range(int((high - first) / spacing + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if value != int(value) or abs(value) >= 1e5 else str(int(value))


def draw_loss_curve(steps: list[int], losses: list[float], size: tuple[int, int] = SIZE) -> Image.Image:
    """The loss curve: raw loss per logged step, a smoothed line over it (beyond 20 points), axes with step
    numbers and loss values; log-scale y when the loss spans a decade or more."""
    image = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, top, right, bottom = MARGINS[0], MARGINS[1], size[0] - MARGINS[2], size[1] - MARGINS[3]
    points = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if not points:
        draw.text((left, top), "no finite loss logged yet", fill=AXES, font=font)
        return image
    steps, losses = [s for s, _ in points], [v for _, v in points]
    y_low, y_high, log = _y_scale(losses)
    x_low, x_high = (steps[0] - 1, steps[0] + 1) if steps[0] == steps[-1] else (steps[0], steps[-1])

    def at(step: float, value: float) -> tuple[float, float]:
        y = math.log10(value) if log else value
        return (left + (step - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))  # fmt: skip

    for tick in _ticks(y_low, y_high) if not log else range(int(y_low), int(y_high) + 1):
        y = at(x_low, 10**tick if log else tick)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        text = f"1e{tick}" if log else _label(tick)
        draw.text((left - 6 - draw.textlength(text, font=font), y - 5), text, fill=AXES, font=font)
    for tick in _ticks(x_low, x_high, integer=True):
        x = at(tick, 10**y_low if log else y_low)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=AXES)
        text = _label(tick)
        draw.text((x - draw.textlength(text, font=font) / 2, bottom + 6), text, fill=AXES, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES)
    draw.text(((left + right) / 2 - 12, size[1] - 16), "step", fill=AXES, font=font)
    scale = ", log scale" if log else ""
    title = f"loss{scale} ({len(losses)} logged steps; last {losses[-1]:.4g} at step {steps[-1]})"
    draw.text((left, 10), title, fill=AXES, font=font)
    _polyline(draw, [at(s, v) for s, v in zip(steps, losses)], RAW, 1)
    weight = smoothing_weight(len(losses))
    if weight > 0:
        _polyline(draw, [at(s, v) for s, v in zip(steps, smooth(losses, weight))], SMOOTHED, 2)
    return image


def _polyline(draw: ImageDraw.ImageDraw, xy: list[tuple[float, float]], color: tuple, width: int) -> None:
    if len(xy) == 1:
        (x, y), r = xy[0], width + 2
        draw.ellipse([(x - r, y - r), (x + r, y + r)], fill=color)
    else:
        draw.line(xy, fill=color, width=width)


def save_loss_plot(root: str | Path, *copies: str | Path) -> Path | None:
    """Draw ``root/metrics.jsonl`` into ``root/loss.png`` (written atomically) and copy it into each folder of
    ``copies`` (a checkpoint); returns the PNG's path. Never fails a run: a problem is a warning and returns None."""
    root = Path(root)
    try:
        if not (root / METRICS).is_file():
            return None
        image = draw_loss_curve(*read_losses(root / METRICS))
        path, tmp = root / LOSS_PLOT, root / (LOSS_PLOT + ".tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        for folder in copies:
            shutil.copyfile(path, Path(folder) / LOSS_PLOT)
        return path
    except Exception as error:  # noqa: BLE001 (a plot must never stop training)
        warnings.warn(f"{root / LOSS_PLOT} not written: {type(error).__name__}: {error}", stacklevel=2)
        return None
