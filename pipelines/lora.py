"""LoRA on a pipeline's transformer: diffusers' pipeline LoRA methods, and loading the files the trainer writes.

The methods are diffusers' own: the pipelines inherit ``SanaLoraLoaderMixin`` (diffusers' LoRA loader for a pipeline
whose only LoRA-loadable component is ``transformer``), whose ``set_adapters``, ``fuse_lora`` / ``unfuse_lora``,
``unload_lora_weights``, ``get_active_adapters``, ``get_list_adapters``, ``delete_adapters``, ``disable_lora`` /
``enable_lora``, ``set_lora_device`` and ``save_lora_weights`` act on the transformer through diffusers'
``PeftAdapterMixin`` (which every backbone of the toolkit has). Only ``load_lora_weights`` is the toolkit's: it
also takes a ``.safetensors`` file path and keys without diffusers' ``transformer.`` prefix (what
``save_lora_adapter`` writes, as LCM-LoRA folders hold).
"""

from __future__ import annotations

import os

import torch
from diffusers.loaders import SanaLoraLoaderMixin

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class DiTLoraLoaderMixin(SanaLoraLoaderMixin):
    """diffusers' pipeline LoRA methods for the pipeline's ``transformer`` (see the module docstring)."""

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load a LoRA onto the transformer (for example an LCM-LoRA written by the trainer) as adapter
        ``adapter_name`` (diffusers names it ``default_0``, ``default_1``, ... when None).

        ``pretrained_model_name_or_path_or_dict`` is a folder holding ``pytorch_lora_weights.safetensors`` (or the
        file named by ``weight_name=``), a ``.safetensors`` file, or a state dict. A file's peft metadata
        (``lora_alpha`` included) is read as diffusers reads it; a state dict without it gets ``lora_alpha`` = rank.
        Keys may carry diffusers' ``transformer.`` prefix or none. ``hotswap`` and the other keyword arguments
        (``low_cpu_mem_usage``, ...) are those of diffusers' ``load_lora_adapter``.
        """
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            keys, where = list(source), {}
        else:
            file = lora_file(source, kwargs.pop("weight_name", None))
            keys, source = safetensors_keys(file), os.path.dirname(file)
            where = {"weight_name": os.path.basename(file), "use_safetensors": True}
        prefixed = all(key.startswith("transformer.") for key in keys)
        self.transformer.load_lora_adapter(
            source, prefix="transformer" if prefixed else None, adapter_name=adapter_name, hotswap=hotswap,
            _pipeline=self, **where, **kwargs,
        )  # fmt: skip


def lora_file(path: str | os.PathLike, weight_name: str | None = None) -> str:
    """A LoRA safetensors file: ``path`` itself, or ``weight_name`` (default ``pytorch_lora_weights.safetensors``)
    in the folder ``path``."""
    path = os.fspath(path)
    file = os.path.join(path, weight_name or LORA_WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file) or not file.endswith(".safetensors"):
        raise FileNotFoundError(f"No LoRA weights at {file!r} (expected a {LORA_WEIGHT_NAME} file or folder).")
    return file


def safetensors_keys(file: str) -> list[str]:
    """The tensor names stored in a safetensors ``file`` (read from its header only)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())
