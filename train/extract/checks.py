"""Can the extraction pipeline represent this data? Two numbers in ``dit extract``'s report, and a warning.

* ``unk_share``: the share of caption words the tokenizer maps to its unknown token (``<unk>``), with the most
  frequent such words in ``unknown_words``. A caption's unknown words all reach the text encoder as the same token,
  so a model cannot learn what they say. T5's SentencePiece tokenizer (PixArt) almost never emits it; the shipped
  MicroShapes model's word-level tokenizer does for every word outside its shape-and-colour vocabulary.
  Punctuation is left out: that tokenizer maps commas to ``<unk>`` in its own training captions too.
* ``reconstruction_psnr``: the autoencoder's encode -> decode PSNR (dB, pixels in [0, 1]) over the first few
  images, and ``reconstruction_mae`` their mean absolute error. A diffusion model trained on its latents can at
  best generate what the VAE decodes; the shipped MicroShapes VAE only learnt flat-coloured shapes.

When the share exceeds :data:`UNK_SHARE_LIMIT` or the PSNR is below :data:`PSNR_LIMIT`, :func:`data_warning`
gives the one line ``dit extract`` prints: the base cannot represent this data, use a matching pipeline.
"""

from __future__ import annotations

import collections
import math

import torch

CHECKED_IMAGES = 4  # images encoded and decoded per process
# Thresholds, measured with the shipped MicroShapes model at 64 px: its own captions have 0% unknown words (commas
# aside) and its VAE reconstructs MicroShapes scenes at 29-32 dB; the photo-like images and captions of tests/tiny.py
# (photo_folder) give 57% unknown words and 14 dB. SD/PixArt's VAE reconstructs photos at ~25 dB or more, and T5's
# tokenizer has no unknown words in English captions.
UNK_SHARE_LIMIT = 0.05
PSNR_LIMIT = 20.0
UNKNOWN_WORDS = 8  # the most frequent unknown words listed in the report


class DataCheck:
    """Collects what the checks need while extraction runs: every caption, and the first few images."""

    def __init__(self, images: int = CHECKED_IMAGES):
        self.limit, self.captions, self.images = images, [], []

    def observe(self, caption: str, image: torch.Tensor) -> None:
        """Note a sample's caption and, among the first ``images``, its pixels (3, H, W) in [-1, 1]."""
        self.captions.append(caption)
        if len(self.images) < self.limit:
            self.images.append(image)

    def results(self, tokenizer, vae, max_length: int) -> dict:
        """``unk_share``, ``unknown_words``, ``reconstruction_psnr``, ``reconstruction_mae`` and ``checked_images``
        (None: nothing to check, e.g. when every record was already extracted)."""
        psnr, mae = reconstruction_error(vae, self.images)
        share, words = unk_share(tokenizer, self.captions, max_length)
        return {"unk_share": share, "unknown_words": words, "reconstruction_psnr": psnr, "reconstruction_mae": mae,
                "checked_images": len(self.images)}  # fmt: skip


def _encode(tokenizer, captions: list[str], max_length: int) -> dict:
    """Token ids and character offsets (a slow tokenizer has none: each token then spans its whole caption)."""
    kwargs = dict(add_special_tokens=False, truncation=True, max_length=max_length)
    try:
        return tokenizer(captions, return_offsets_mapping=True, **kwargs)
    except NotImplementedError:
        encoded = tokenizer(captions, **kwargs)
        return {**encoded, "offset_mapping": [[(0, len(c))] * len(i) for c, i in zip(captions, encoded["input_ids"])]}


def unk_share(tokenizer, captions: list[str], max_length: int) -> tuple[float | None, list[str]]:
    """The share of the captions' word tokens (as extraction encodes them: lower case, cut to ``max_length``;
    punctuation aside) that are the tokenizer's unknown token, and the most frequent unknown words; (None, [])
    without captions or an unknown token."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    captions = [c.lower().strip() for c in captions if c.strip()]
    if unknown is None or not captions:
        return None, []
    encoded = _encode(tokenizer, captions, max_length)
    words, total = collections.Counter(), 0
    for caption, ids, offsets in zip(captions, encoded["input_ids"], encoded["offset_mapping"]):
        for token, (start, end) in zip(ids, offsets):
            text = caption[start:end]
            if not any(character.isalnum() for character in text):
                continue  # punctuation, and bare word-boundary pieces
            total += 1
            words[text] += token == unknown
    share = sum(words.values()) / total if total else None
    return share, [word for word, count in words.most_common(UNKNOWN_WORDS) if count]


@torch.no_grad()
def reconstruction_error(vae, images: list[torch.Tensor]) -> tuple[float | None, float | None]:
    """(PSNR in dB, mean absolute error) of ``vae``'s encode -> decode over ``images`` (3, H, W) in [-1, 1], in
    [0, 1] pixel units; (None, None) without images."""
    if not images:
        return None, None
    squared, absolute, count = 0.0, 0.0, 0
    for image in images:  # one at a time: the images may differ in size
        pixels = image[None].to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        difference = (decoded.float() - pixels.float()) / 2  # [0, 1] units
        squared += difference.square().sum().item()
        absolute += difference.abs().sum().item()
        count += difference.numel()
    mse = squared / count
    return (10 * math.log10(1 / mse) if mse > 0 else math.inf), absolute / count


def data_warning(results: dict, pipeline: str) -> str | None:
    """One line when the pipeline cannot represent the data (too many unknown words, or a poor reconstruction);
    None when it can."""
    problems = []
    share, psnr = results.get("unk_share"), results.get("reconstruction_psnr")
    if share is not None and share > UNK_SHARE_LIMIT:
        examples = ", ".join(results.get("unknown_words", [])[:3])
        problems.append(f"its tokenizer maps {share:.0%} of the caption words to <unk> (e.g. {examples}; limit "
                        f"{UNK_SHARE_LIMIT:.0%})")  # fmt: skip
    if psnr is not None and psnr < PSNR_LIMIT:
        problems.append(f"its autoencoder reconstructs these images at {psnr:.1f} dB PSNR (limit {PSNR_LIMIT:.0f} dB)")
    if not problems:
        return None
    return (
        f"warning: the pipeline {pipeline} cannot represent this data: {'; '.join(problems)}. A model trained on "
        "these features cannot learn what the captions say or draw such images; extract with a pipeline whose VAE "
        "and text encoder match the data, e.g. a PixArt-Sigma pipeline folder via --pipeline."
    )
