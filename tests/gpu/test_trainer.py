"""The trainer's exactness tests, on CUDA (the Trainer picks CUDA when it is there): exact resume per objective,
checkpoint layout and limit, interrupted (atomic) save, NaN stop, LiT distillation, ``sample_posterior: false``,
compiled blocks. Two-process tests stay in tests/train: they run on CPU processes over gloo."""

from tests.train.test_trainer import (  # noqa: F401  (collected here again, marked gpu)
    features,
    test_checkpoint_layout_and_limit,
    test_compiled_blocks_train_like_eager_and_save_plain_names,
    test_exact_resume,
    test_interrupted_save_leaves_previous_checkpoint,
    test_lit_inherits_from_pixart_and_distills_from_it,
    test_nan_loss_stops_with_checkpoint_intact,
    test_sample_posterior_false_trains_on_the_latent_mean,
)
