"""Masked (MicroDiT) training on CUDA: kept tokens only, then the unmasked fine-tune; exact resume."""

from tests.train.features.test_masking import (  # noqa: F401  (collected here again, marked gpu)
    features,
    test_masked_resume_is_exact,
    test_masked_run_feeds_kept_tokens_then_fine_tunes_unmasked,
)
