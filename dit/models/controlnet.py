"""ControlNet-Transformer adapters (PixArt-δ) for every backbone built on the PixArt block loop.

An adapter holds trainable copies of base blocks at chosen positions. The control latent goes through the frozen
base model's own patch embedding and a zero-initialised ``before_proj``, is added to the base hidden states after
base block 0, and runs through the copies as a chain; the copy of block ``p`` hands its state, through a
zero-initialised ``after_proj`` and times ``conditioning_scale``, to the input of base block ``p + 1``. PixArt-δ
copies the first 13 blocks (positions 0..12); slimmer adapters keep fewer positions (RelaCtrl).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

# diffusers' pipeline loader looks the name `ModelMixin` up in the module that model_index.json records.
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..checkpoint import check_keys
from ..nn.blocks import residual
from ..nn.context import BlockContext
from ..nn.linear import Linear
from .mixins import AttentionBackendMixin, AttentionProcessorMixin, BlockRunnerMixin
from .registry import backbone_class
from .strict_io import StrictIOMixin

__all__ = ["BlockControls", "ControlNetAdapter", "ModelMixin", "MultiControlNetAdapter", "block_controls"]


def _backbone_class(name: str) -> type:
    """A backbone class of the toolkit by name (never an arbitrary import path from a config file) whose forward
    takes ``block_controls``, the hook adapters inject their residuals through."""
    try:
        cls = backbone_class(name)
    except ValueError:
        cls = None
    if cls is None or not cls.supports_block_controls:
        raise ValueError(f"transformer_class={name!r} is not a backbone class of dit.models with a block loop.")
    return cls


def _width(config) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


class ControlNetBlock(nn.Module):
    """A trainable copy of one base block and its zero-initialised output projection (``after_proj``).

    Args:
        transformer_block: the block (a copy of the base block at this position).
        dim: token width.
    """

    def __init__(self, transformer_block: nn.Module, dim: int):
        super().__init__()
        self.transformer_block = transformer_block
        self.after_proj = Linear(dim, dim)

    def forward(self, control: torch.Tensor, context: BlockContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``control`` (B, N, D) and the base forward's context -> (next control state, residual), (B, N, D)."""
        control = self.transformer_block(control, context)  # (B, N, D)
        return control, self.after_proj(control)


class ControlNetAdapter(
    AttentionBackendMixin, AttentionProcessorMixin, BlockRunnerMixin, StrictIOMixin, ModelMixin, ConfigMixin
):
    """PixArt-δ ControlNet-Transformer adapter: trainable copies of base blocks at ``positions``.

    Build it from a (frozen) base with :meth:`from_transformer`; save and load it as its own diffusers-format
    folder (safetensors only, strict keys). At zero initialisation the base model's output is unchanged exactly.

    Args:
        transformer_class: name of the base backbone class in :mod:`dit.models` (``PixArtTransformer``,
            ``LiTTransformer``, ``MicroDiTTransformer``, ``FiTTransformer``), used with ``transformer_config`` to
            build blocks of the right structure. The base embeds the control latent (its ``control_tokens``).
        transformer_config: the base model's config (attention variants per block included).
        positions: base block indices whose copies the adapter holds, ascending; the copy of block ``p`` feeds
            base block ``p + 1``. PixArt-δ: ``0..12``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ControlNetBlock"]

    @register_to_config
    def __init__(
        self,
        transformer_class: str = "PixArtTransformer",
        transformer_config: dict | None = None,
        positions: list[int] | None = None,
    ):
        super().__init__()
        if transformer_config is None or positions is None:
            raise ValueError(
                "ControlNetAdapter needs transformer_config and positions; build one with from_transformer."
            )
        base_config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
        self.positions = _check_positions(positions, base_config["num_layers"])
        dim = _width(base_config)
        # The base's own blocks (per-block attention options included), built as the base builds them: on the meta
        # device under from_transformer / select / diffusers' empty-weights loading, so no weights are allocated.
        skeleton = _backbone_class(transformer_class)(**base_config)
        self.before_proj = Linear(dim, dim)
        self.controlnet_blocks = nn.ModuleList(
            [ControlNetBlock(skeleton.transformer_blocks[p], dim) for p in self.positions]
        )
        self.gradient_checkpointing = False
        self.initialize_weights()

    @property
    def _repeated_blocks(self) -> list[str]:
        """The base backbone's block, which each ControlNet block wraps: compiled by ``compile_repeated_blocks``."""
        return [_backbone_class(self.config.transformer_class).block_class.__name__]

    def initialize_weights(self) -> None:
        """Zero ``before_proj`` and every ``after_proj``: the adapter then leaves the base output unchanged."""
        with torch.no_grad():
            for proj in [self.before_proj, *(block.after_proj for block in self.controlnet_blocks)]:
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    # ----- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_transformer(
        cls, transformer: nn.Module, num_blocks: int = 13, positions: Sequence[int] | None = None
    ) -> ControlNetAdapter:
        """An adapter whose blocks copy ``transformer``'s blocks 0..num_blocks-1 (or ``positions``), with zero
        ``before_proj`` / ``after_proj``; on the base's device and dtype."""
        _check_backbone(transformer)
        num_layers = transformer.config.num_layers
        if positions is None and not 1 <= num_blocks < num_layers:
            raise ValueError(
                f"num_blocks={num_blocks} does not fit a base with {num_layers} blocks: control block j feeds base "
                f"block j + 1, so num_blocks must be between 1 and {num_layers - 1}."
            )
        positions = list(range(num_blocks)) if positions is None else list(positions)
        _check_positions(positions, num_layers)
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            adapter = cls(transformer_class=type(transformer).__name__, transformer_config=config, positions=positions)
        state = {name: torch.zeros_like(value, device="cpu") for name, value in adapter.state_dict().items()
                 if "_proj." in name and "transformer_block" not in name}  # fmt: skip
        for j, p in enumerate(adapter.positions):
            for name, value in transformer.transformer_blocks[p].state_dict().items():
                state[f"controlnet_blocks.{j}.transformer_block.{name}"] = value
        return _materialise(adapter, state, next(transformer.parameters())).train(transformer.training)

    @classmethod
    def from_state_dict(
        cls,
        transformer: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        positions: Sequence[int] | None = None,
        where: str = "ControlNet state dict",
    ) -> ControlNetAdapter:
        """An adapter for ``transformer`` holding ``state_dict`` (this class's keys, strict: missing and unexpected
        keys are named), on the base's device and dtype. ``positions`` default to ``0..n-1`` for the ``n``
        ``controlnet_blocks`` in ``state_dict``: PixArt-δ's layout, where the copy of block ``j`` feeds block ``j + 1``.
        ``where`` names the source in errors."""
        _check_backbone(transformer)
        if positions is None:
            blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("controlnet_blocks.")}
            positions = range(max(blocks) + 1 if blocks else 0)
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            adapter = cls(
                transformer_class=type(transformer).__name__, transformer_config=config, positions=list(positions)
            )
        check_keys(adapter.state_dict().keys(), state_dict.keys(), where=where)
        return _materialise(adapter, dict(state_dict), next(transformer.parameters())).train(transformer.training)

    def select(self, positions: Sequence[int]) -> ControlNetAdapter:
        """A slimmer adapter keeping the trained blocks at ``positions`` (a subset of this adapter's).

        It computes exactly what this adapter computes with the other blocks skipped (passed through without
        a residual): the chain still starts from base block 0's output and ``before_proj``.
        """
        positions = sorted(set(positions))
        unknown = sorted(set(positions) - set(self.positions))
        if unknown:
            raise ValueError(f"Positions {unknown} are not in this adapter (it holds {self.positions}).")
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            slim = type(self)(**{**config, "positions": positions})
        theirs = self.state_dict()  # copied, not shared, by _materialise
        state = {k: v for k, v in theirs.items() if k.startswith("before_proj.")}
        for j, p in enumerate(positions):
            prefix = f"controlnet_blocks.{self.positions.index(p)}."
            state.update({f"controlnet_blocks.{j}.{k[len(prefix):]}": v for k, v in theirs.items()
                          if k.startswith(prefix)})  # fmt: skip
        return _materialise(slim, state, next(self.parameters())).train(self.training)

    # ----- use ------------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return _width(self.config.transformer_config)

    def check_compatible(self, transformer: nn.Module) -> None:
        """Raise a ValueError naming the mismatch if this adapter cannot run on ``transformer``."""
        _check_backbone(transformer)
        mine, theirs = self.config.transformer_config, transformer.config
        if _width(theirs) != self.width:
            raise ValueError(
                f"This ControlNet adapter was built for a base of width {self.width}; the transformer has width "
                f"{_width(theirs)} (num_attention_heads * attention_head_dim)."
            )
        text_widths = (theirs.get("cross_attention_dim"), mine.get("cross_attention_dim"))
        if text_widths[0] != text_widths[1]:
            raise ValueError(
                f"This ControlNet adapter's blocks take text tokens of width {text_widths[1]}; the "
                f"transformer's cross_attention_dim is {text_widths[0]}."
            )
        if self.positions[-1] + 1 >= theirs["num_layers"]:
            raise ValueError(
                f"This ControlNet adapter feeds base block {self.positions[-1] + 1}; the transformer has only "
                f"{theirs['num_layers']} blocks."
            )

    def run_block(self, j: int, control: torch.Tensor, context: BlockContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Control block ``j`` (gradient-checkpointed when enabled): (next control state, unscaled residual)."""
        return self._run_block(self.controlnet_blocks[j], control, context)


def _check_backbone(transformer: nn.Module) -> None:
    if not getattr(transformer, "supports_block_controls", False):
        raise TypeError(
            f"{type(transformer).__name__} is not a toolkit backbone with a block loop (block_controls); ControlNet "
            "adapters run on dit backbones (PixArtTransformer, LiTTransformer, MicroDiTTransformer, FiTTransformer)."
        )


def _check_positions(positions: Sequence[int], num_layers: int) -> list[int]:
    if isinstance(positions, (str, bytes)) or not all(_is_int(p) for p in positions):
        raise ValueError(f"ControlNet positions must be ints, got {list(positions)!r}.")
    positions = [int(p) for p in positions]
    if not positions:
        raise ValueError("A ControlNet adapter needs at least one block (num_blocks >= 1 or a non-empty positions).")
    if positions != sorted(set(positions)) or positions[0] < 0:
        raise ValueError(f"ControlNet positions must be distinct, ascending and >= 0; got {positions}.")
    if positions[-1] + 1 >= num_layers:
        raise ValueError(
            f"ControlNet position {positions[-1]} needs a base with at least {positions[-1] + 2} blocks (the copy of "
            f"block p feeds base block p + 1); this base has {num_layers}."
        )
    return positions


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _materialise(adapter: ControlNetAdapter, state: dict, like: torch.Tensor) -> ControlNetAdapter:
    """Allocate a meta-built adapter on ``like``'s device and dtype and copy ``state`` into it (strictly)."""
    adapter.to_empty(device=like.device)
    if like.dtype != torch.float32:
        nn.Module.to(adapter, like.dtype)  # (diffusers' `to` warns about fp32-kept modules; this adapter has none)
    adapter.load_state_dict(state, strict=True)
    return adapter


class MultiControlNetAdapter(ModelMixin):
    """Several adapters used together (multi-control): each takes its own control latent and scale, and their
    residuals are summed.

    Saved as diffusers saves its ``MultiControlNetModel``: adapter 0 in the folder given, adapter ``i`` in the
    folder beside it with ``_i`` appended (``controlnet``, ``controlnet_1``, ... in a pipeline folder), so that each
    folder holds only weight files and diffusers' pipeline loader finds their ``variant``. Folders of the earlier
    layout (``adapter_0``, ``adapter_1``, ... inside the folder) still load.

    Args:
        adapters: the :class:`ControlNetAdapter` s, in the order their control images and scales are given.
    """

    def __init__(self, adapters: Sequence[ControlNetAdapter]):
        super().__init__()
        if not adapters:
            raise ValueError("MultiControlNetAdapter needs at least one adapter.")
        self.nets = nn.ModuleList(adapters)

    @staticmethod
    def adapter_folder(save_directory: str | os.PathLike, index: int) -> Path:
        """Where adapter ``index`` of a multi-adapter saved to ``save_directory`` lives."""
        root = Path(save_directory)
        return root if index == 0 else root.with_name(f"{root.name}_{index}")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ) -> None:
        """Save every adapter with :meth:`ControlNetAdapter.save_pretrained` and the same options (``variant``,
        ``max_shard_size``, ``safe_serialization`` and the others of diffusers' ``ModelMixin.save_pretrained``, such
        as ``save_function``, in ``kwargs``), adapter ``i`` to :meth:`adapter_folder`. Adapter folders left from an
        earlier save with more adapters (or of the earlier layout) are removed, so that loading finds these only."""
        options = dict(is_main_process=is_main_process, safe_serialization=safe_serialization, variant=variant,
                       max_shard_size=max_shard_size, push_to_hub=push_to_hub, use_flashpack=use_flashpack,
                       **kwargs)  # fmt: skip
        for i, net in enumerate(self.nets):
            net.save_pretrained(self.adapter_folder(save_directory, i), **options)
        if is_main_process:
            self._remove_stale_adapters(save_directory, len(self.nets))

    @classmethod
    def _remove_stale_adapters(cls, save_directory: str | os.PathLike, count: int) -> None:
        """Remove the adapter folders a save of ``count`` adapters to ``save_directory`` did not write."""
        import shutil

        stale = list(Path(save_directory).glob("adapter_*"))  # the earlier layout, inside the folder
        index = count
        while (folder := cls.adapter_folder(save_directory, index)).is_dir():
            stale.append(folder)
            index += 1
        for folder in stale:
            config = folder / "config.json"
            if config.is_file() and ControlNetAdapter.load_config(folder).get("_class_name") == "ControlNetAdapter":
                shutil.rmtree(folder)

    @classmethod
    def adapter_folders(cls, pretrained_model_name_or_path: str | os.PathLike) -> list[Path]:
        """The adapter folders of a saved multi-adapter, in order (either layout)."""
        root = Path(pretrained_model_name_or_path)
        legacy = sorted(root.glob("adapter_*"), key=lambda p: int(p.name.split("_")[-1]))
        if legacy and not (root / "config.json").is_file():
            return legacy
        folders = []
        while (folder := cls.adapter_folder(root, len(folders))).is_dir():
            folders.append(folder)
        if not folders:
            raise FileNotFoundError(f"No ControlNet adapter folder at {root} (nor adapter_<i> folders inside it).")
        return folders

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> MultiControlNetAdapter:
        """Load every adapter of :meth:`adapter_folders` with :meth:`ControlNetAdapter.from_pretrained` and the same
        keyword arguments (``variant``, ``torch_dtype``, ``strict``, ``allow_pickle``, ...)."""
        want_info = kwargs.pop("output_loading_info", False)
        nets, info = [], {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        for i, folder in enumerate(cls.adapter_folders(pretrained_model_name_or_path)):
            net, net_info = ControlNetAdapter.from_pretrained(folder, output_loading_info=True, **kwargs)
            nets.append(net)
            for key, values in info.items():
                values.extend(f"nets.{i}.{v}" if isinstance(v, str) else v for v in net_info.get(key, ()))
        model = cls(nets)
        return (model, info) if want_info else model


class _ControlRun:
    """One adapter during one base forward: the control chain's state and its residuals."""

    def __init__(
        self, adapter: ControlNetAdapter, transformer: nn.Module, controlnet_cond: torch.Tensor, scale: float
    ):
        adapter.check_compatible(transformer)
        in_channels = transformer.config.in_channels
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[1] != in_channels:
            raise ValueError(
                f"controlnet_cond must be a control latent (batch, {in_channels}, height, width) like the model's "
                f"latents, got shape {tuple(controlnet_cond.shape)}."
            )
        if adapter._attention_backend_name != transformer._attention_backend_name:
            adapter.set_attention_backend(transformer._attention_backend_name)  # masks come in the base's format
        adapter._attention_backend(controlnet_cond.device)
        self.adapter, self.transformer, self.cond, self.scale = adapter, transformer, controlnet_cond, scale
        self.index = {p: j for j, p in enumerate(adapter.positions)}
        self.control: torch.Tensor | None = None

    def _start(self, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """Base block 0's output plus the control latent embedded by the base (B, N, D)."""
        cond, batch = self.cond, hidden_states.shape[0]
        if cond.shape[0] not in (1, batch):
            raise ValueError(f"{cond.shape[0]} control latents were given for a batch of {batch}.")
        embedded = self.transformer.control_tokens(cond.to(hidden_states.dtype), context)  # (B or 1, N, D)
        return hidden_states + self.adapter.before_proj(embedded)  # (B, N, D)

    def __call__(self, index: int, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor | None:
        """The scaled residual for the input of base block ``index + 1`` (None where this adapter has no block)."""
        if index == 0:
            self.control = self._start(hidden_states, context)
        j = self.index.get(index)
        if j is None:
            return None
        self.control, out = self.adapter.run_block(j, self.control, context)  # (B, N, D) each
        return out if self.scale == 1.0 else out * self.scale


class BlockControls:
    """The base forward's ``block_controls`` hook for one or several adapters.

    After base block ``index`` every adapter reads the same hidden states; then their residuals (each times its
    own scale) are added, so several adapters sum as in diffusers' multi-ControlNet.
    """

    def __init__(self, runs: list[_ControlRun]):
        self.runs = runs

    def __call__(self, index: int, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
        residuals = [r for run in self.runs if (r := run(index, hidden_states, context)) is not None]
        for update in residuals:
            hidden_states = residual(hidden_states, update)  # (B, N, D)
        return hidden_states


def adapter_list(controlnet: ControlNetAdapter | MultiControlNetAdapter | Sequence[ControlNetAdapter]) -> list:
    """The adapters of one adapter, a :class:`MultiControlNetAdapter` or a list of adapters."""
    if isinstance(controlnet, MultiControlNetAdapter):
        return list(controlnet.nets)
    if isinstance(controlnet, ControlNetAdapter):
        return [controlnet]
    return list(controlnet)


def block_controls(
    transformer: nn.Module,
    controlnet: ControlNetAdapter | MultiControlNetAdapter | Sequence[ControlNetAdapter],
    controlnet_cond: torch.Tensor | Sequence[torch.Tensor],
    conditioning_scale: float | Sequence[float] = 1.0,
) -> BlockControls | None:
    """The ``block_controls`` argument of ``transformer``'s forward for one or several adapters.

    Args:
        transformer: the base backbone the adapters run on.
        controlnet: an adapter, a :class:`MultiControlNetAdapter`, or a list of adapters.
        controlnet_cond: control latents (B or 1, C, H, W) like the model's latents; one per adapter.
        conditioning_scale: residual scale, one per adapter (or one for all).

    Adapters with scale 0 are left out; with none left the result is None, so the base runs exactly as without.
    """
    adapters = adapter_list(controlnet)
    conds = [controlnet_cond] if isinstance(controlnet_cond, torch.Tensor) else list(controlnet_cond)
    scales = (
        [conditioning_scale] * len(adapters) if isinstance(conditioning_scale, (int, float)) else conditioning_scale
    )
    if not len(adapters) == len(conds) == len(scales):
        raise ValueError(
            f"{len(adapters)} ControlNet adapters need as many control latents and scales; got {len(conds)} and "
            f"{len(scales)}."
        )
    runs = [_ControlRun(a, transformer, c, float(s)) for a, c, s in zip(adapters, conds, scales) if s != 0]
    return BlockControls(runs) if runs else None
