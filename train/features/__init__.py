"""Training features, the plug-ins a run adds to plain training: the :class:`~.base.Feature` hooks and the one check
of a feature set (:mod:`.base`), token masking (:mod:`.masking`), mixed-size batches (:mod:`.mixed_sizes`) and
ControlNet adapters (:mod:`.controlnet`). Distillation objectives are features too
(:mod:`dit.train.objectives.distillation`)."""
