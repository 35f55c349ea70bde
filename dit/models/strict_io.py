"""Strict, safetensors-first I/O for every model class of the toolkit: unknown config fields and missing or
unexpected weights are errors that name them; variants, shards and pickle (``.bin``, read weights-only) as diffusers
has them."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable

from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, _add_variant
from safetensors import safe_open

from ..checkpoint import CheckpointKeyError, check_keys, restore_default_permissions
from ..quantization import check_dtype, check_quantized


class StrictIOMixin:
    """diffusers' config and weight I/O, strict: unknown config fields and missing or unexpected weight keys are
    errors naming them. Safetensors is read and written by default; pickle (``.bin``) is written on request
    (``safe_serialization=False``) and read as diffusers reads it, with ``torch.load(weights_only=True)``, which
    cannot run code. Variants and shards work as in diffusers, also through ``DiffusionPipeline.save_pretrained`` /
    ``from_pretrained``."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' ``ConfigMixin.extract_init_dict``, strict: a config field this class does not take is an error
        naming it (diffusers would log it and build the model without it).

        Tolerated as diffusers does: private keys (``_class_name``, ``_diffusers_version``, ``_name_or_path``, ...)
        and, for a folder saved by another diffusers class (``_class_name: Transformer2DModel``), that class's own
        fields, which diffusers drops before this check.
        """
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        unknown = sorted(key for key in unused if key in config_dict and not key.startswith("_"))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown config field(s) {unknown}. Remove them from config.json, or load the folder "
                f"with the class that wrote it (its _class_name: {config_dict.get('_class_name', '?')!r})."
            )
        return init_dict, unused, hidden

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, strict: bool = True, allow_pickle: bool = False, **kwargs
    ):
        """diffusers' ``from_pretrained``, strict by default: a missing or unexpected key is an error that lists them.

        Reads a ``variant`` (``diffusion_pytorch_model.<variant>.safetensors``) and sharded folders (an index and
        its shards) as diffusers does; a shard that lacks a key its index lists is an error too (diffusers checks
        the index only, and would leave that weight uninitialised).

        Safetensors weights are preferred; pickle weights (``.bin``, e.g. ``save_pretrained(...,
        safe_serialization=False)``) are read as diffusers reads them, with ``torch.load(weights_only=True)``: tensors
        only, no code runs. ``allow_pickle`` is not needed for them (it is accepted, with a warning, for callers of
        the former opt-in).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if allow_pickle:
            warnings.warn(
                "from_pretrained(allow_pickle=True) is no longer needed: pickle weights are read weights-only "
                "(torch.load(weights_only=True), as diffusers reads them), which runs no code.",
                FutureWarning,
                stacklevel=2,
            )
        folder = os.path.join(path, kwargs["subfolder"]) if kwargs.get("subfolder") else path
        if kwargs.get("variant") is None:
            refuse_variant_only_folder(folder)
        if strict:
            check_shards(path, kwargs.get("subfolder"), kwargs.get("variant"))
        check_dtype(kwargs.get("quantization_config"), kwargs.get("dtype", kwargs.get("torch_dtype")), cls.__name__)
        if saved_quant_method(folder) == "quanto":  # quanto's CPU int8 kernel segfaults on memory-mapped weights
            kwargs["disable_mmap"] = True  # also when diffusers' pipeline loader passes disable_mmap=False
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        if strict and (info["missing_keys"] or info["unexpected_keys"]):
            raise CheckpointKeyError(info["missing_keys"], info["unexpected_keys"], where=f"checkpoint at {path!r}")
        check_quantized(model)  # a layer quanto would crash the process on is an error now
        return (model, info) if want_info else model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ) -> None:
        """diffusers' ``ModelMixin.save_pretrained``, each option named so that ``DiffusionPipeline.save_pretrained``
        forwards it: ``variant="fp16"`` writes ``diffusion_pytorch_model.fp16.safetensors`` beside the main weights,
        ``max_shard_size`` splits the weights into shards with an index.

        Safetensors by default; ``safe_serialization=False`` writes pickle (``.bin``), with a warning: from_pretrained
        reads it back weights-only (as diffusers does), but other readers may unpickle it in full, which can execute
        code.
        """
        if not safe_serialization:
            warnings.warn(
                f"{type(self).__name__}.save_pretrained(safe_serialization=False) writes pickle weights (.bin) to "
                f"{os.fspath(save_directory)!r}: from_pretrained reads them weights-only, but a reader that unpickles "
                "them in full can be made to execute code. Leave safe_serialization=True for safetensors.",
                UserWarning,
                stacklevel=2,
            )
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            use_flashpack=use_flashpack,
            **kwargs,
        )
        if is_main_process:
            restore_default_permissions(save_directory)  # safetensors writes 0o600


def saved_quant_method(folder: str | os.PathLike) -> str | None:
    """The quantization method (``"torchao"``, ``"quanto"``, ...) that the model folder's ``config.json`` records
    its weights were saved with; None for plain weights or a folder without a readable config."""
    try:
        with open(os.path.join(folder, "config.json")) as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def variant_files(files: list[str], variant: str | None) -> list[str]:
    """The weight files of ``variant`` (``name.<variant>.ext``, ``name.<variant>-00001-of-00002.ext``, and the
    shard index ``name.ext.index.<variant>.json``); every file when no variant is asked for."""
    if variant is None:
        return files
    return [f for f in files if f".{variant}." in f or f".{variant}-" in f]


_WEIGHTS = re.compile(r"^(?P<stem>[^.]+?)(?:\.(?P<variant>[\w-]+?))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
_INDEX = re.compile(r"^(?P<stem>[^.]+)\.(?:safetensors|bin)\.index(?:\.(?P<variant>[\w-]+))?\.json$")


def refuse_variant_only_folder(folder: str | os.PathLike) -> None:
    """Raise when a local ``folder`` holds weights of variants only (``save_pretrained(..., variant="fp16")``
    writes no main weights): as in diffusers, such a folder loads with ``variant=`` only. The error starts with
    diffusers' own ("Error no file named diffusion_pytorch_model.bin found in directory ...") and names the
    variants."""
    if not os.path.isdir(folder):
        return
    matches = [m for f in os.listdir(folder) if (m := _WEIGHTS.match(f) or _INDEX.match(f))]
    variants = sorted({m["variant"] for m in matches if m["variant"]})
    if variants and all(m["variant"] for m in matches):
        stem = matches[0]["stem"]  # diffusion_pytorch_model (diffusers), model (transformers)
        raise FileNotFoundError(
            f"Error no file named {stem}.bin found in directory {os.fspath(folder)}. {os.fspath(folder)!r} holds "
            f"only weights of variant {' / '.join(map(repr, variants))} and no main weights: load it with "
            f"from_pretrained(..., variant={variants[0]!r}), as diffusers does for a folder saved with "
            "save_pretrained(..., variant=...) alone."
        )


def check_shards(path: str, subfolder: str | None, variant: str | None) -> None:
    """For a local sharded safetensors checkpoint (of ``variant``): raise :class:`CheckpointKeyError` unless its
    shards hold exactly the keys its index lists, and ``FileNotFoundError`` for a shard that is not there."""
    folder = os.path.join(path, subfolder) if subfolder else path
    index = os.path.join(folder, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant))
    if not os.path.isfile(index):
        return
    with open(index) as file:
        weight_map = json.load(file)["weight_map"]
    found = []
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{index!r} lists the shard {shard!r}, which is not in {folder!r}.")
        with safe_open(shard_path, framework="pt") as weights:
            found.extend(weights.keys())
    name = os.path.basename(index)
    check_keys(weight_map, found, where=f"sharded checkpoint at {folder!r} (the keys {name} lists, in its shards)")
