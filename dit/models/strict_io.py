"""Strict, safetensors-first I/O for every model class of the toolkit: unknown config fields and missing or
unexpected weights are errors that name them."""

from __future__ import annotations

import os

from ..checkpoint import PICKLE_SUFFIXES, CheckpointKeyError


class StrictIOMixin:
    """diffusers' config and weight I/O, strict: unknown config fields and missing or unexpected weight keys are
    errors naming them, and safetensors is the only format read (unless opted out) and written."""

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

        Only safetensors weights are read unless ``allow_pickle=True``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not allow_pickle:
            _refuse_pickle_only_folder(path, kwargs.get("subfolder"))
            kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        if strict and (info["missing_keys"] or info["unexpected_keys"]):
            raise CheckpointKeyError(info["missing_keys"], info["unexpected_keys"], where=f"checkpoint at {path!r}")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, safe_serialization: bool = True, **kwargs) -> None:
        """diffusers' ``save_pretrained``; safetensors is the only format written."""
        if not safe_serialization:
            raise ValueError("This toolkit writes safetensors only; safe_serialization=False is not supported.")
        super().save_pretrained(save_directory, *args, safe_serialization=True, **kwargs)


def _refuse_pickle_only_folder(path: str, subfolder: str | None) -> None:
    folder = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(folder):
        return  # a hub id: diffusers resolves it, and use_safetensors=True refuses pickle there
    files = os.listdir(folder)
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{folder!r} holds only pickle weights ({', '.join(sorted(pickles))}), which can execute code when "
            "loaded. Convert them to safetensors, or pass allow_pickle=True if you trust their source."
        )
