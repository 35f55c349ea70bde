"""Checks of config values shared by the backbones: JSON and YAML configs fail here, naming the field, instead of
deep inside a layer constructor."""

from __future__ import annotations

import numbers


def check_positive_ints(optional: bool = False, **fields) -> None:
    """Raise a ValueError naming the first field that is not a positive int (None allowed when ``optional``).

    Config values come from JSON and YAML, where ``"four"``, ``2.0`` or ``true`` would otherwise fail deep inside a
    layer constructor (or silently mean something else)."""
    for name, value in fields.items():
        if value is None and optional:
            continue
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}.")


def check_kv_compression(ratio, layers, num_layers: int) -> None:
    """``kv_compress_ratio``: None (no compression) or an int >= 2; ``kv_compress_layers``: None (the deep half) or
    block indices in ``range(num_layers)``."""
    if ratio is not None and not (is_positive_int(ratio) and ratio >= 2):
        raise ValueError(
            f"kv_compress_ratio must be None (no compression) or an int >= 2, got {ratio!r} (the key/value stride)."
        )
    if layers is None:
        return
    if not isinstance(layers, (list, tuple)) or not all(_is_index(i, num_layers) for i in layers):
        raise ValueError(
            f"kv_compress_layers must be None (the deep half) or a list of block indices from 0 to {num_layers - 1}, "
            f"got {layers!r}."
        )


def is_positive_int(value) -> bool:
    """An int >= 1 that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_index(value, size: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < size


#: What a backbone's ``prediction_type`` config field may record (None: unknown, PixArt's ε default).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm")


def check_prediction_record(prediction_type, noise_shift) -> None:
    """``prediction_type``: None or one of :data:`PREDICTION_TYPES`; ``noise_shift``: None or a number > 0."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be None (unknown: epsilon) or one of {', '.join(PREDICTION_TYPES)}, got "
            f"{prediction_type!r}."
        )
    real = isinstance(noise_shift, numbers.Real) and not isinstance(noise_shift, bool)
    if noise_shift is not None and not (real and noise_shift > 0):
        raise ValueError(f"noise_shift must be None (PixArt's schedule) or a number > 0, got {noise_shift!r}.")
