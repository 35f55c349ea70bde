"""A T5 text encoder trained to read MicroShapes captions (a transformers ``T5EncoderModel``, like PixArt's).

Without a hub there is no pretrained T5 to start from, and a randomly initialised one hides what a two-object caption
says: which colour goes with which shape, and which object comes first ("a blue square to the right of a red
circle" puts the circle on the left). This module trains a tiny T5 encoder for a minute on captions alone: two
learned slot queries attend over its token features (as the DiT's cross-attention will) and classify, per slot, the
colour, shape, size and position of the first and second object (left/top first; "none" for one-object captions),
plus the background from the mean token. The slot head is discarded; the encoder's token features are what the DiT
cross-attends to. The held-out pair (magenta, triangle) never appears in its captions either.
It trains on any device; the captions are drawn on the CPU either way, so a seed gives the same batches everywhere.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, paraphrase, random_scene

ATTRIBUTES = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
SLOTS = 2
LOG_EVERY = 50  # steps between progress-bar loss readings (each one waits for the device)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU (the MicroShapes stages' default; ``recipe.py`` shares it)."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``; to CUDA through pinned memory without blocking, so the host never waits for
    the queued steps (a pageable copy synchronises the stream)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def placed(device: torch.device, *modules: nn.Module) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the block, then back to the device each came on."""
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def scene_targets(scene: Scene) -> list[int]:
    """Class indices: background, then colour, shape, size, position of each slot (``len(classes)`` = none)."""
    targets = [list(BACKGROUNDS).index(scene.background)]
    for k in range(SLOTS):
        for name, classes in ATTRIBUTES.items():
            targets.append(classes.index(getattr(scene.objects[k], name)) if k < len(scene.objects) else len(classes))
    return targets


class SlotHead(nn.Module):
    """Two learned queries attend over the token features; linear classifiers read each slot and the mean token."""

    def __init__(self, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(SLOTS, dim) / dim**0.5)
        self.keys = nn.Linear(dim, dim)
        self.classifiers = nn.ModuleList([nn.Linear(dim, len(c) + 1) for c in ATTRIBUTES.values()])
        self.background = nn.Linear(dim, len(BACKGROUNDS))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Logits in :func:`scene_targets` order, from ``tokens`` (B, L, D) and their keep-``mask`` (B, L)."""
        scores = torch.einsum("qd,bld->bql", self.queries, self.keys(tokens)) / tokens.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask[:, None].bool(), float("-inf")).softmax(-1)  # (B, S, L)
        slots = torch.einsum("bql,bld->bqd", weights, tokens)  # (B, S, D)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        return [self.background(pooled)] + [head(slots[:, k]) for k in range(SLOTS) for head in self.classifiers]


def train_text_encoder(
    tokenizer,
    text_encoder,
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Train ``text_encoder`` (in place, on ``device``; it is left on the device it came on) to read MicroShapes
    captions; returns the last batch's accuracies."""
    device = resolve_device(device)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = SlotHead(text_encoder.config.d_model).to(device)
    with placed(device, text_encoder):
        params = list(text_encoder.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        text_encoder.train()
        bar = tqdm(range(steps), desc="text encoder")
        for step in bar:
            scenes = [random_scene(rng, two_objects=0.4, held_out=False) for _ in range(batch_size)]
            targets = to_device(torch.tensor([scene_targets(s) for s in scenes]), device)  # (B, 1 + 4 * SLOTS)
            tokens = tokenizer([paraphrase(s, rng) for s in scenes], padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
            ids, mask = to_device(tokens.input_ids, device), to_device(tokens.attention_mask, device)  # (B, L)
            features = text_encoder(ids, attention_mask=mask)[0]  # (B, L, D)
            logits = head(features, mask)
            loss = sum(nn.functional.cross_entropy(z, targets[:, i]) for i, z in enumerate(logits))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % LOG_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        text_encoder.eval()
        names = ["background"] + [f"{name}_{k}" for k in range(SLOTS) for name in ATTRIBUTES]
        accuracy = torch.stack([(z.argmax(-1) == targets[:, i]).float().mean() for i, z in enumerate(logits)])
        return dict(zip(names, accuracy.tolist()))
