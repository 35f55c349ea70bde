"""The class labels of a class-conditional pipeline: its ``id2label`` and the lookup of label names to class ids.

``id2label`` is kept as diffusers' ``DiTPipeline`` keeps it: an argument of the pipeline's ``__init__``, recorded in
the folder's ``model_index.json`` as ``{"0": "tench, Tinca tinca", ...}`` (JSON keys are strings), each value a
comma-separated list of synonyms, every one of which names the class (``pipe.labels``: name -> id, sorted). Unlike
diffusers, a name shared by several classes (ImageNet's "crane" is 134 and 517) is not resolved to the last one: it
is an error naming the ids. Like the CLI checks, this module imports neither diffusers nor transformers.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .checks import SamplingValueError, is_int


def label_table(id2label: Mapping | None, num_classes: int) -> dict[str, str] | None:
    """``id2label`` checked and normalised for ``model_index.json``: keys the class ids as strings (ints or digit
    strings in ``[0, num_classes)``), values non-empty strings, sorted by id; None stays None."""
    if id2label is None:
        return None
    if not isinstance(id2label, Mapping):
        raise ValueError(f"id2label must be a dict of class id -> label, got {type(id2label).__name__}.")
    table = {}
    for key, label in id2label.items():
        ident = int(key) if is_int(key) or (isinstance(key, str) and key.strip().isdigit()) else None
        if ident is None or not 0 <= ident < num_classes:
            raise ValueError(f"id2label key {key!r} is not a class id of this model (0..{num_classes - 1}).")
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"id2label[{key!r}] must be a non-empty string (comma-separated names), got {label!r}.")
        table[ident] = label
    return {str(ident): table[ident] for ident in sorted(table)}


class ClassLabels:
    """The class ids of a model with ``num_classes`` classes (the null class, id ``num_classes``, is the pipeline's
    unconditional branch, never a label) and the names of ``id2label`` (see :func:`label_table`)."""

    def __init__(self, id2label: Mapping | None, num_classes: int):
        self.num_classes = num_classes
        self.id2label = label_table(id2label, num_classes)
        owners: dict[str, list[int]] = {}
        for key, label in (self.id2label or {}).items():
            for name in label.split(","):
                if name.strip():
                    owners.setdefault(name.strip(), []).append(int(key))
        #: name -> class id, sorted by name, as diffusers' ``DiTPipeline.labels`` (names of one class only).
        self.names = {name: ids[0] for name, ids in sorted(owners.items()) if len(ids) == 1}
        #: names shared by several classes -> their ids (refused by name: pass an id).
        self.ambiguous = {name: ids for name, ids in owners.items() if len(ids) > 1}

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClassLabels:
        """The labels of a pipeline folder, read without loading it: ``model_index.json``'s ``id2label`` and the
        transformer's ``num_classes`` (``transformer/config.json``)."""
        folder = Path(folder)
        id2label = json.loads((folder / "model_index.json").read_text()).get("id2label")
        num_classes = json.loads((folder / "transformer" / "config.json").read_text()).get("num_classes")
        if not num_classes:
            raise ValueError(f"{folder / 'transformer'} is not class-conditional (its config has no num_classes).")
        return cls(id2label, num_classes)

    def ids(self, labels) -> list[int]:
        """Class ids of ``labels``: an id, a label name, or a non-empty list / tuple / 1-D tensor of them (mixed)."""
        if hasattr(labels, "tolist") and not isinstance(labels, (str, list, tuple)):  # a tensor or an array
            labels = labels.tolist()
        items = [labels] if isinstance(labels, str) or is_int(labels) else labels
        if not isinstance(items, (list, tuple)) or not items:
            raise SamplingValueError(
                f"class_labels must be a class id, a label name or a non-empty list of them, got {labels!r}."
            )
        return [self.id_of(item) for item in items]

    def id_of(self, label: int | str) -> int:
        """The class id of one label: an id in ``[0, num_classes)`` or a name of ``id2label``."""
        if is_int(label):
            if not 0 <= label < self.num_classes:
                raise SamplingValueError(
                    f"class id {label} is outside 0..{self.num_classes - 1} (this model's {self.num_classes} "
                    f"classes; {self.num_classes} is the null class the pipeline uses for guidance)."
                )
            return int(label)
        if not isinstance(label, str):
            raise SamplingValueError(f"a class label is an int id or a label name, got {label!r}.")
        return self._named(label.strip())

    def parse(self, value: str) -> int | str:
        """A command-line class: a label name, else digits as a class id (``"207"``)."""
        value = value.strip()
        known = value in self.names or value in self.ambiguous
        return int(value) if value.isdigit() and not known else value

    def describe(self, ident: int) -> str:
        """A class for people: ``class 1 (goldfish, Carassius auratus)``, or ``class 1`` without a label."""
        label = (self.id2label or {}).get(str(ident))
        return f"class {ident} ({label})" if label else f"class {ident}"

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """diffusers' ``DiTPipeline.get_label_ids``: the class ids of a label name or a list of names."""
        names = [label] if isinstance(label, str) else list(label)
        return [self._named(name) for name in names]

    def _named(self, name: str) -> int:
        if name in self.names:
            return self.names[name]
        if name in self.ambiguous:
            owners = ", ".join(f"{i} ({self.id2label[str(i)]})" for i in self.ambiguous[name])
            raise SamplingValueError(f"class label {name!r} names several classes: {owners}; pass the class id.")
        folded = [known for known in self.names if known.casefold() == name.casefold()]
        if len(folded) == 1:
            return self.names[folded[0]]
        raise SamplingValueError(self._unknown(name))

    def _unknown(self, name: str) -> str:
        """The error for a name that is no label: close matches, or what labels there are."""
        if not self.names and not self.ambiguous:
            return (
                f"class label {name!r}: this model has no label names (no id2label); pass class ids "
                f"0..{self.num_classes - 1}."
            )
        known = [*self.names, *self.ambiguous]
        folded = {k.casefold(): k for k in known}
        close = difflib.get_close_matches(name.casefold(), list(folded), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(repr(folded[c]) for c in close)}" if close else "no close match"
        return (
            f"class label {name!r} is not a label of this model ({hint}); its {len(known)} names are those of "
            f"id2label (model_index.json; pipe.labels), or pass a class id 0..{self.num_classes - 1}."
        )
