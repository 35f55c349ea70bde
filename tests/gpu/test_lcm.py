"""LCM distillation on CUDA: exact resume (target network included) for each guidance mode, the LoRA student."""

from tests.train.objectives.test_consistency import (  # noqa: F401  (collected here again, marked gpu)
    features,
    teacher,
    test_exact_resume,
    test_lora_student_loads_onto_the_base,
)
