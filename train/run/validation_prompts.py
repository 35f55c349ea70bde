"""The run's own captions as validation prompts: ``dit extract`` keeps a fixed sample of the captions it encodes in
``validation_prompts.json`` beside the shards (features hold text embeddings, not text), and validation samples them
when ``validation.prompts`` is not set."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..extract.progress import write_text_atomically

PROMPTS_FILE = "validation_prompts.json"  # {"prompts": [...], "seen": N}
NUM_PROMPTS = 4


class CaptionSample:
    """A uniform sample of ``size`` of the non-empty captions it is given (reservoir sampling with a fixed seed: the
    same data in the same order gives the same prompts), first ones kept from an earlier ``prompts``."""

    def __init__(self, size: int = NUM_PROMPTS, prompts: list[str] | None = None, seed: int = 0):
        self.size, self.prompts, self.seen = size, list(prompts or [])[:size], len(prompts or [])
        self.random = random.Random(seed)

    def add(self, caption: str) -> None:
        """Offer one caption (empty ones are skipped: an unconditional sample shows nothing to compare with)."""
        if not caption or not caption.strip() or caption in self.prompts:
            return
        self.seen += 1
        if len(self.prompts) < self.size:
            self.prompts.append(caption)
        elif (slot := self.random.randrange(self.seen)) < self.size:
            self.prompts[slot] = caption


def read_validation_prompts(data_path: str | Path) -> list[str]:
    """The captions ``dit extract`` sampled into ``data_path/validation_prompts.json``; [] when there is none."""
    path = Path(data_path) / PROMPTS_FILE
    if not path.is_file():
        return []
    try:
        prompts = json.loads(path.read_text())["prompts"]
    except (ValueError, KeyError, TypeError):
        return []
    return [p for p in prompts if isinstance(p, str) and p.strip()]


def write_validation_prompts(data_path: str | Path, sample: CaptionSample) -> Path | None:
    """Write the sample's prompts to ``data_path/validation_prompts.json`` (atomically); None when it holds none."""
    if not sample.prompts:
        return None
    path = Path(data_path) / PROMPTS_FILE
    write_text_atomically(path, json.dumps({"prompts": sample.prompts, "seen": sample.seen}, indent=2) + "\n")
    return path
