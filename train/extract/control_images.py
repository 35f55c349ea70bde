"""Control images for ControlNet training: computed from each image (``silhouette``, ``edges``) or read from a
folder of one control image per image (``dit extract --control``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .sources import IMAGE_SUFFIXES, BrokenSample

CONTROL_KINDS = ("silhouette", "edges")  # controls computed from each image (control_from_image)
FOREGROUND_DISTANCE = 48.0  # RGB distance (0-255 scale) from the background colour at which a pixel is an object


def foreground_mask(image: np.ndarray, threshold: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool: pixels farther than ``threshold`` from the background colour, taken as the
    median colour of the border pixels. Meant for objects on a plain background (MicroShapes, product shots); for
    other images make the control images elsewhere and pass their folder (``dit extract --control FOLDER``)."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2H + 2W, 3)
    return np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > threshold


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: mask pixels that touch a pixel outside it (4-neighbourhood; the image border is
    outside), the rule of :func:`dit.microshapes.world.edges`."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def control_from_image(image: np.ndarray, kind: str) -> np.ndarray:
    """The ``kind`` control of an (H, W, 3) uint8 image as an (H, W, 3) uint8 image, white on black: its objects
    (``silhouette``) or their outlines (``edges``), as the MicroShapes controls of the scene it shows."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"Unknown control kind {kind!r}; choose one of {', '.join(CONTROL_KINDS)} (or a folder).")
    mask = foreground_mask(image)
    if kind == "edges":
        mask = mask_edges(mask)
    return np.repeat(mask.astype(np.uint8)[:, :, None] * 255, 3, axis=2)


def find_control_file(folder: Path, name: str) -> Path:
    """The control image of the sample named ``name`` in ``folder``: the same file name, or the same name with
    another image suffix (``a.jpg`` -> ``a.png``); :class:`BrokenSample` when there is none."""
    exact = Path(folder) / name
    if exact.is_file():
        return exact
    stem = exact.with_suffix("") if exact.suffix.lower() in IMAGE_SUFFIXES else exact
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        if stem.with_name(stem.name + suffix).is_file():
            return stem.with_name(stem.name + suffix)
    raise BrokenSample(f"no control image {exact} (nor {stem.name} with another image suffix) in {folder}")


def load_control_image(folder: Path, name: str, size: tuple[int, int]) -> Image.Image:
    """The RGB control image of sample ``name`` from ``folder``, resized to the sample image's ``size`` (W, H) when
    it differs, so that the same crop cuts both alike; :class:`BrokenSample` when it is missing or unreadable."""
    file = find_control_file(folder, name)
    try:
        with Image.open(file) as opened:
            control = opened.convert("RGB")
    except Exception as err:  # PIL raises many kinds for a corrupt file
        raise BrokenSample(f"unreadable control image {file} ({type(err).__name__}: {err})") from err
    return control if control.size == size else control.resize(size, Image.BICUBIC)
