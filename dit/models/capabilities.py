"""What pipelines and the trainer read of a backbone. The toolkit's backbones declare their capabilities as
attributes (:class:`dit.models.mixins.BackboneMixin`); a module from elsewhere (diffusers'
``PixArtTransformer2DModel``, a test double) gets the defaults here, those of a plain PixArt model that can do
nothing beyond it."""

from __future__ import annotations

from torch import nn

#: Capability -> its value for a transformer that does not declare it.
FOREIGN_DEFAULTS = {
    "native_resolution": False,  # PixArt's aspect-ratio bins
    "prediction_type": None,  # whatever the scheduler records
    "use_additional_conditions": False,  # diffusers' PixArt sets it per instance, as ours
    "has_null_caption": False,
    "uses_text_mask": True,  # False: the model attends to every caption token, without a mask (MicroDiT)
    "embeds_guidance": False,  # classifier-free guidance with a CFG batch
    "supports_block_controls": False,
    "supports_token_masking": False,
    "supports_image_sizes": False,
    "needs_full_grid": False,
}


def capability(transformer: nn.Module, name: str):
    """The value of capability ``name`` (a key of :data:`FOREIGN_DEFAULTS`) that ``transformer`` declares, or that
    of a plain PixArt model."""
    return getattr(transformer, name, FOREIGN_DEFAULTS[name])
