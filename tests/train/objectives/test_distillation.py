"""A distillation's teacher loads as the backbone class its folder names (before: always as PixArt, so a MicroDiT or
FiT teacher could not be used)."""

import math

import pytest

from dit import FiTTransformer, MicroDiTTransformer, PixArtTransformer
from dit.train import Trainer, load_config
from dit.train.model_setup import build_backbone
from dit.train.objectives.distillation import load_teacher
from tests.tiny import FIT_KWARGS, MICRODIT, TINY, make_features

#: Each backbone family's settings on top of the tiny config.
FAMILIES = {
    PixArtTransformer: [],
    MicroDiTTransformer: MICRODIT[:5],
    FiTTransformer: ["model.cls=FiTTransformer", f"model.kwargs={FIT_KWARGS}"],
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[type, object]:
    """A saved tiny teacher of every family, by class."""
    folders = {}
    for cls, overrides in FAMILIES.items():
        folder = tmp_path_factory.mktemp(cls.__name__)
        build_backbone(load_config(TINY, ["data.path=x", *overrides])).save_pretrained(folder)
        folders[cls] = folder
    return folders


@pytest.mark.parametrize("cls", list(FAMILIES), ids=lambda cls: cls.__name__)
def test_a_teacher_loads_as_its_own_class_frozen(teachers, cls):
    teacher = load_teacher(str(teachers[cls]), "cpu")
    assert type(teacher) is cls and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_microdit_student_distils_from_a_microdit_teacher(teachers, tmp_path):
    features = make_features(tmp_path / "features")
    config = load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path / 'run'}", *MICRODIT, "max_steps=2",
                                "masking.ratio=0", "masking.unmasked_steps=0", "pipeline=false",
                                f"objective.teacher={teachers[MicroDiTTransformer]}"])  # fmt: skip
    trainer = Trainer(config)
    assert type(trainer.teacher) is MicroDiTTransformer and trainer.teacher.device == trainer.accelerator.device
    assert all(math.isfinite(loss) for loss in trainer.train())
