"""diffusers' step caching (First-Block-Cache, Pyramid Attention Broadcast, FasterCache, TaylorSeer, MagCache) on the
toolkit's backbones.

Every backbone's block class (``block_class`` of :class:`~dit.models.backbone.DiTBackbone`, registered when the
backbone class is defined) is registered with diffusers' ``TransformerBlockRegistry`` by :func:`register_cache_block`,
as diffusers registers its own ``BasicTransformerBlock``: blocks take ``(hidden_states, context)`` and return the
hidden states, so ``apply_first_block_cache`` and ``apply_mag_cache`` find what they need. The attention hooks (PAB, FasterCache) find ``DiTAttention`` through diffusers'
``AttentionModuleMixin``.

:class:`StepCacheMixin` gives a backbone diffusers' ``enable_cache`` / ``disable_cache`` / ``cache_context`` and
makes them work in any pipeline, ours or diffusers' ``PixArtSigmaPipeline`` (which sets no cache context)::

    from diffusers.hooks import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    image = pipe(prompt).images[0]
    pipe.transformer.disable_cache()
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.hooks import FasterCacheConfig, HookRegistry, ModelHook, PyramidAttentionBroadcastConfig
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.models.cache_utils import CacheMixin

__all__ = ["SamplingRunHook", "StepCacheMixin", "register_cache_block"]

#: Name of the toolkit's top-level hook in a model's ``HookRegistry``.
SAMPLING_RUN_HOOK = "dit_sampling_run"


def register_cache_block(block_class: type[torch.nn.Module]) -> None:
    """Register ``block_class`` with diffusers' ``TransformerBlockRegistry`` (idempotent).

    The block is called as ``block(hidden_states, context)`` and returns the hidden states alone (no text stream),
    the metadata diffusers gives its ``BasicTransformerBlock``.
    """
    metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    TransformerBlockRegistry.register(model_class=block_class, metadata=metadata)


class SamplingRunHook(ModelHook):
    """The toolkit's hook on the denoiser, outside diffusers' cache hooks: what a pipeline would otherwise have to
    provide for them.

    - the current timestep, for the ``current_timestep_callback`` of PAB and FasterCache (:meth:`current_timestep`);
    - a cache context (``"cond"``, one CFG batch per call) around each call when the caller set none (diffusers'
      PixArt pipelines set none); a caller's own ``cache_context`` is kept;
    - a reset of the cache state when a new sampling run starts, seen as a timestep above the previous one
      (pipelines also reset it at the end of each call, in ``maybe_free_model_hooks``).

    Args:
        state_managers: the state managers of the cache hooks inside the model, whose context this hook sets.
    """

    _is_stateful = True

    def __init__(self, state_managers: list[StateManager]):
        super().__init__()
        self.state_managers = state_managers
        self.timestep: float | None = None

    def current_timestep(self) -> float:
        """The timestep of the denoiser call in progress (of the last one between calls)."""
        if self.timestep is None:
            raise ValueError("No denoiser call has given a timestep yet.")
        return self.timestep

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        timestep = _timestep_value(args, kwargs)
        caller = next((m._context for m in self.state_managers if m._context is not None), None)
        if timestep is not None and self.timestep is not None and timestep > self.timestep:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()  # a new run; clears contexts
        self.timestep = timestep
        self._set_context(caller or CacheContext("cond", timestep=timestep))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._set_context(caller)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.timestep = None
        return module

    def _set_context(self, context: CacheContext | None) -> None:
        for manager in self.state_managers:
            manager.set_context(context)


class StepCacheMixin(CacheMixin):
    """diffusers' ``CacheMixin`` (``enable_cache``, ``disable_cache``, ``cache_context``, and the state reset that
    ``DiffusionPipeline.maybe_free_model_hooks`` calls), completed so the caches run in any pipeline.

    ``enable_cache(config)`` applies diffusers' hooks for ``config`` (``FirstBlockCacheConfig``,
    ``PyramidAttentionBroadcastConfig``, ``FasterCacheConfig``, ``TaylorSeerCacheConfig``, ``MagCacheConfig``, ...)
    and adds a :class:`SamplingRunHook` on the model, so that:

    - PAB and FasterCache read the timestep the model is called with when ``current_timestep_callback`` is None;
    - FasterCache's ``tensor_format`` left at its video default (``BCFHW``) becomes ``BCHW`` (image latents);
    - a pipeline that sets no ``cache_context`` (ours, diffusers' ``PixArtSigmaPipeline``) still samples, with one
      context ``"cond"`` per call (the CFG batch is one call);
    - a new sampling run starts from a clean cache, even outside a pipeline.

    The config given is not modified (a copy is applied).
    """

    def enable_cache(self, config) -> None:
        """Enable a diffusers cache method on this model (see the class docstring)."""
        if self.is_cache_enabled:
            raise ValueError(
                f"Caching is already enabled with {type(self._cache_config).__name__}; call disable_cache() first."
            )
        hook = SamplingRunHook([])
        super().enable_cache(_completed_config(config, hook))
        hook.state_managers = _state_managers(self)
        HookRegistry.check_if_exists_or_initialize(self).register_hook(hook, SAMPLING_RUN_HOOK)

    def disable_cache(self) -> None:
        """Remove the cache hooks (and the toolkit's run hook) from this model."""
        if self.is_cache_enabled:  # the outermost hook goes first, so the chain below it is rewired correctly
            HookRegistry.check_if_exists_or_initialize(self).remove_hook(SAMPLING_RUN_HOOK, recurse=False)
        super().disable_cache()


def _completed_config(config, hook: SamplingRunHook):
    """A copy of ``config`` with a timestep callback (PAB, FasterCache) and FasterCache's image tensor format."""
    changes = {}
    if isinstance(config, (PyramidAttentionBroadcastConfig, FasterCacheConfig)):
        if config.current_timestep_callback is None:
            changes["current_timestep_callback"] = hook.current_timestep
    if isinstance(config, FasterCacheConfig) and config.tensor_format == "BCFHW":
        changes["tensor_format"] = "BCHW"
    return dataclasses.replace(config, **changes) if changes else config


def _state_managers(model: torch.nn.Module) -> list[StateManager]:
    """The state managers of the stateful hooks inside ``model`` (those that read a cache context)."""
    managers = {}  # by id: First-Block-Cache and MagCache share one manager across their block hooks
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            managers.update({id(v): v for v in vars(hook).values() if isinstance(v, StateManager)})
    return list(managers.values())


def _timestep_value(args: tuple, kwargs: dict) -> float | None:
    """The timestep of a backbone call (``timestep=`` or the third positional argument) as a number."""
    timestep = kwargs.get("timestep", args[2] if len(args) > 2 else None)
    if timestep is None:
        return None
    return float(torch.as_tensor(timestep).reshape(-1)[0])
