"""ControlNet training on CUDA: only the adapter trains, gradient checkpointing, slim positions, a FiT base."""

from tests.train.features.test_controlnet_training import (  # noqa: F401  (collected here again, marked gpu)
    base,
    features,
    test_a_fit_base_trains_a_control_adapter,
    test_gradient_checkpointing_gives_the_same_run,
    test_only_the_adapter_trains_and_the_base_stays_bit_identical,
    test_slim_positions_and_continuing_from_an_adapter,
)
