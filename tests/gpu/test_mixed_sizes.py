"""Mixed-size (FiT) training on CUDA: the padding-free loss and exact resume."""

from tests.train.features.test_mixed_sizes import (  # noqa: F401  (collected here again, marked gpu)
    features,
    test_exact_resume,
    test_loss_ignores_padding_and_equals_the_unpadded_loss,
)
