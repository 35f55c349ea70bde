"""A T5 text encoder trained to read MicroShapes captions (a transformers ``T5EncoderModel``, like PixArt's).

Without a hub there is no pretrained T5 to start from, and a randomly initialised one hides what a two-object caption
says: which colour goes with which shape, and which object comes first ("a blue square to the right of a red
circle" puts the circle on the left). This module trains a tiny T5 encoder for a minute on captions alone: two
learned slot queries attend over its token features (as the DiT's cross-attention will) and classify, per slot, the
colour, shape, size and position of the first and second object (left/top first; "none" for one-object captions),
plus the background from the mean token. The slot head is discarded; the encoder's token features are what the DiT
cross-attends to. The held-out pair (magenta, triangle) never appears in its captions either.
"""

from __future__ import annotations

import random

import torch
from torch import nn
from tqdm.auto import tqdm

from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, paraphrase, random_scene

ATTRIBUTES = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
SLOTS = 2


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
    tokenizer, text_encoder, steps: int = 400, batch_size: int = 256, lr: float = 3e-3, seed: int = 0
) -> dict[str, float]:
    """Train ``text_encoder`` (in place) to read MicroShapes captions; returns the last batch's accuracies."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = SlotHead(text_encoder.config.d_model)
    params = list(text_encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    text_encoder.train()
    for _ in tqdm(range(steps), desc="text encoder"):
        scenes = [random_scene(rng, two_objects=0.4, held_out=False) for _ in range(batch_size)]
        targets = torch.tensor([scene_targets(s) for s in scenes])  # (B, 1 + 4 * SLOTS)
        tokens = tokenizer([paraphrase(s, rng) for s in scenes], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
        features = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]  # (B, L, D)
        logits = head(features, tokens.attention_mask)
        loss = sum(nn.functional.cross_entropy(z, targets[:, i]) for i, z in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    text_encoder.eval()
    names = ["background"] + [f"{name}_{k}" for k in range(SLOTS) for name in ATTRIBUTES]
    return {n: float((z.argmax(-1) == targets[:, i]).float().mean()) for i, (n, z) in enumerate(zip(names, logits))}
