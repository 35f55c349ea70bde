"""ControlNet training (PixArt-δ): a frozen base with a trainable adapter, control latents in the feature shards.

The trainer's model becomes a :class:`ControlledTransformer` when ``controlnet`` is configured: only the adapter's
parameters require gradients (so the optimizer, EMA, gradient clipping and DDP see the adapter alone), its forward
is the base's with the batch's ``control_latent`` injected, and ``save_pretrained`` writes the adapter folder. The
control images go through the VAE once, at feature extraction (:class:`ControlFeatureWriter`), like the images:
``dit extract --control silhouette|edges`` computes them from each image (:func:`control_from_image`), and
``--control FOLDER`` reads one control image per image (:func:`load_control_image`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dit.models.controlnet import ControlNetAdapter, block_controls
from dit.pipelines.controlnet import encode_control

from .config import ConfigError, TrainConfig
from .extract import CONTROL_KINDS, FeatureWriter
from .sources import IMAGE_SUFFIXES, BrokenSample

CONTROL_KEY = "control_latent"  # the feature-shard key of the control latents (N, C, h, w)
FOREGROUND_DISTANCE = 48.0  # RGB distance (0-255 scale) from the background colour at which a pixel is an object


class ControlledTransformer(nn.Module):
    """A frozen backbone and a trainable ControlNet adapter, called like the backbone plus ``controlnet_cond``.

    Args:
        transformer: the base backbone (frozen here, kept in eval mode).
        controlnet: the adapter to train.
        conditioning_scale: residual scale during training.
    """

    def __init__(self, transformer: nn.Module, controlnet: ControlNetAdapter, conditioning_scale: float = 1.0):
        super().__init__()
        controlnet.check_compatible(transformer)
        self.transformer = transformer.requires_grad_(False).eval()
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale

    # The trainer reads these from its model; they are the base's.
    @property
    def config(self):
        return self.transformer.config

    @property
    def use_additional_conditions(self) -> bool:
        return getattr(self.transformer, "use_additional_conditions", False)

    @property
    def y_embedding(self) -> nn.Parameter:
        return self.transformer.y_embedding  # AttributeError when the base has no learned null caption

    def null_caption(self, batch_size: int, length: int) -> torch.Tensor:
        return self.transformer.null_caption(batch_size, length)

    def train(self, mode: bool = True) -> ControlledTransformer:
        super().train(mode)
        self.transformer.eval()  # frozen: no dropout in the base, as PixArt-δ
        return self

    def forward(self, hidden_states: torch.Tensor, *args, controlnet_cond: torch.Tensor | None = None, **kwargs):
        """The base forward (same arguments) with ``controlnet_cond`` (B, C, H, W), the control latents."""
        if controlnet_cond is None:
            raise ValueError(
                f"ControlNet training needs control latents: the feature shards must carry {CONTROL_KEY!r} (write "
                "them with train.controlnet.ControlFeatureWriter)."
            )
        controls = block_controls(self.transformer, self.controlnet, controlnet_cond, self.conditioning_scale)
        return self.transformer(hidden_states, *args, block_controls=controls, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The adapter's folder (the base is not written: it is the run's ``model.pretrained``)."""
        self.controlnet.save_pretrained(save_directory, **kwargs)


def controlnet_model(transformer: nn.Module, config: TrainConfig) -> ControlledTransformer:
    """The trainer's model for a ControlNet run on ``transformer`` (the base built from ``model.*``)."""
    cfg = config.controlnet
    _check_config(config)
    if cfg.pretrained:
        adapter = ControlNetAdapter.from_pretrained(cfg.pretrained)
        adapter.to(next(transformer.parameters()).device)
    elif cfg.positions is not None:
        adapter = ControlNetAdapter.from_transformer(transformer, positions=cfg.positions)
    else:
        adapter = ControlNetAdapter.from_transformer(transformer, num_blocks=cfg.num_blocks)
    if config.model.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    return ControlledTransformer(transformer, adapter, cfg.conditioning_scale)


def _check_config(config: TrainConfig) -> None:
    cfg = config.controlnet
    if not (config.model.pretrained or config.model.inherit_from):
        raise ConfigError(
            "controlnet: a ControlNet trains on a trained base; set model.pretrained (a transformer folder)."
        )
    if cfg.num_blocks is not None and cfg.positions is not None:
        raise ConfigError("controlnet.num_blocks and controlnet.positions exclude each other; set one.")
    if cfg.pretrained and (cfg.num_blocks is not None or cfg.positions is not None):
        raise ConfigError("controlnet.pretrained fixes the adapter's blocks; leave num_blocks and positions unset.")
    if config.model.lora_rank:
        raise ConfigError("controlnet: the base is frozen and the adapter trains; unset model.lora_rank.")
    if config.objective.distill or config.objective.distill_teacher:
        raise ConfigError("controlnet: distillation (objective.distill / distill_teacher) is not for adapters.")
    if config.validation.every:
        raise ConfigError(
            "controlnet: validation sampling needs control images; set validation.every=0 and sample the "
            "checkpoint's adapter with dit.pipelines.ControlNetPipeline."
        )


class ControlFeatureWriter(FeatureWriter):
    """:class:`~dit.train.extract.FeatureWriter` that also writes each sample's control latent (``control_latent``).

    ``add(bucket, images, captions, controls, indices=None)`` takes the control images (B, 3, H, W) in [-1, 1]
    beside the images (and the samples' record indices, as :meth:`FeatureWriter.add`).
    """

    def add(
        self,
        bucket: tuple[int, int],
        images: torch.Tensor,
        captions: list[str],
        controls: torch.Tensor,
        indices: list[int] | None = None,
    ) -> None:
        if controls.shape[0] != images.shape[0] or controls.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"controls {tuple(controls.shape)} must match images {tuple(images.shape)} in batch and size."
            )
        keys = ("latent_mean", "latent_std", "text_embeds", "text_mask", CONTROL_KEY)
        parts = self.pending.setdefault(bucket, {k: [] for k in keys})
        with torch.no_grad():
            parts[CONTROL_KEY].append(encode_control(self.vae, controls).float().cpu())
        super().add(bucket, images, captions, indices)  # appends the rest and writes the shard when it is full


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
