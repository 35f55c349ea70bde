"""What every backbone of the toolkit shares: attention backend choice and strict, safetensors-only I/O."""

from __future__ import annotations

import numbers
import os

import torch
from diffusers.utils import logging

from ..nn.attention import DiTAttention, resolve_backend
from ..nn.attention.backends import AttentionBackend, get_backend
from ..checkpoint import PICKLE_SUFFIXES, CheckpointKeyError
from ..nn.linear import Linear
from ..nn.normalization import modulate

logger = logging.get_logger(__name__)

# diffusers' backend names, accepted as aliases so `set_attention_backend("native")` works as there.
BACKEND_ALIASES = {"native": "sdpa", "_native_math": "math", "torch": "sdpa"}


class BackboneMixin:
    """Mixed into every ``ModelMixin`` backbone of the toolkit (before ``ModelMixin`` in the bases)."""

    _attention_backend_name: str = "sdpa"
    _resolved_backend: tuple[tuple[str, torch.device], AttentionBackend] | None = None

    # ----- attention backend -------------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        """Choose the softmax kernel: ``sdpa`` (default), ``math`` (plain reference) or ``xformers`` (CUDA).

        Every attention module gets the kernel now, so the forward reads a fixed attribute (nothing a compiled graph
        would see change); only ``xformers`` is resolved per device at the first forward (SDPA where it cannot run).
        """
        name = BACKEND_ALIASES.get(backend, backend)
        get_backend(name)  # unknown names fail here, with the list of known ones
        self._attention_backend_name = name
        self._resolved_backend = None
        if name != "xformers":
            self._push_backend(get_backend(name))

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """Called by diffusers' ``enable_xformers_memory_efficient_attention()``."""
        self.set_attention_backend("xformers" if valid else "sdpa")

    def _push_backend(self, backend: AttentionBackend) -> None:
        for module in self.modules():
            if isinstance(module, DiTAttention):
                module.backend = backend

    def _attention_backend(self, device: torch.device) -> AttentionBackend:
        """The backend for this forward. ``sdpa`` and ``math`` run anywhere and were pushed to the modules when set;
        ``xformers`` is resolved for ``device`` (and pushed) when the device changes."""
        if self._attention_backend_name != "xformers":
            return get_backend(self._attention_backend_name)
        key = (self._attention_backend_name, device)
        if self._resolved_backend is not None and self._resolved_backend[0] == key:
            return self._resolved_backend[1]
        backend = resolve_backend(self._attention_backend_name, device)
        self._push_backend(backend)
        self._resolved_backend = (key, backend)
        return backend

    # ----- shared forward pieces ---------------------------------------------------------------------------
    def _run_block(self, block: torch.nn.Module, *inputs) -> torch.Tensor:
        """``block(*inputs)``, through gradient checkpointing when it is enabled and gradients are needed."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *inputs)
        return block(*inputs)

    def _build_output_head(self, dim: int, out_features: int) -> None:
        """The adaLN output head's modules (``norm_out``, ``scale_shift_table``, ``proj_out``: diffusers' keys)."""
        self.norm_out = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = torch.nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = Linear(dim, out_features)

    def _output_head(self, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The adaLN output head: ``proj_out`` of ``norm_out`` modulated by ``scale_shift_table`` + the condition
        embedding ``emb`` (B, D): (B, N, D) -> (B, N, p*p*C)."""
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.proj_out(modulate(self.norm_out(hidden_states), shift, scale))

    # ----- weight inheritance ----------------------------------------------------------------------------
    #: Config values a model converted by :meth:`from_pixart` gets unless the caller overrides them.
    _inherit_config: dict = {}
    #: Parameter-name fragments that are re-initialised rather than inherited (the layers a variant replaces).
    _inherit_skip: tuple[str, ...] = ()

    @classmethod
    def from_pixart(cls, source, **overrides):
        """Build this backbone from a PixArt model (a module, a transformer folder, or a pipeline folder), inheriting
        every weight with the same name and shape except those this class replaces.

        ``overrides`` change the config (e.g. ``kv_compress_ratio=2``). The returned model carries
        ``inheritance_report``: ``inherited`` (count), ``new`` (parameters it starts fresh, e.g. a KV-compression
        conv) and ``dropped`` (source parameters it has no use for); it is also logged.
        """
        source = as_pixart_model(source)
        config = {k: v for k, v in source.config.items() if not k.startswith("_")}
        model = cls(**{**config, **cls._inherit_config, **overrides})
        theirs, mine = source.state_dict(), model.state_dict()
        take = {
            key: value
            for key, value in theirs.items()
            if key in mine and mine[key].shape == value.shape and not any(part in key for part in cls._inherit_skip)
        }
        model.load_state_dict(take, strict=False)
        model.inheritance_report = {
            "inherited": len(take),
            "new": sorted(set(mine) - set(take)),
            "dropped": sorted(set(theirs) - set(take)),
        }
        logger.info("%s.from_pixart: %s", cls.__name__, model.inheritance_report)
        like = next(source.parameters())
        if like.dtype == torch.float32 and like.device.type == "cpu":
            return model
        return model.to(like.device, like.dtype)

    # ----- strict, safe I/O --------------------------------------------------------------------------
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


def as_pixart_model(source):
    """A PixArt-family module, or one loaded (strictly) from a transformer or pipeline folder."""
    if isinstance(source, torch.nn.Module):
        return source
    from .pixart_transformer import PixArtTransformer

    path = os.fspath(source)
    subfolder = "transformer" if os.path.isfile(os.path.join(path, "model_index.json")) else None
    return PixArtTransformer.from_pretrained(path, subfolder=subfolder)


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


def compile_repeated_blocks(module: torch.nn.Module, **compile_kwargs) -> int:
    """Compile, in place, every repeated block inside ``module`` (regional compilation, as diffusers'
    ``ModelMixin.compile_repeated_blocks``): the block classes are those any submodule names in
    ``_repeated_blocks``, so a ControlNet run (base and adapter) or a trainer's wrapper is covered too.

    All blocks of one class share one compiled graph; parameter names and state dicts are unchanged. Keyword
    arguments go to ``torch.compile`` (``fullgraph=True`` turns any graph break into an error). Returns the number of
    blocks compiled; a module with none is an error.
    """
    names = {name for sub in module.modules() for name in getattr(sub, "_repeated_blocks", ())}
    blocks = [sub for sub in module.modules() if type(sub).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(module).__name__} holds no repeated block to compile (no _repeated_blocks found).")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
