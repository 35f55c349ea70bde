"""A run's folder and what it leaves there: the lock, checkpoints and resume (:mod:`.folder`, :mod:`.checkpointing`),
interrupts that keep the work (:mod:`.interrupts`), the loss plot (:mod:`.loss_plot`), validation grids and the
run's pipeline folder (:mod:`.validation`, :mod:`.validation_prompts`, :mod:`.outputs`)."""
