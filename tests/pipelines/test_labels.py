"""Class labels: diffusers' DiTPipeline names and get_label_ids, ids and names mixed, and errors that name the label
(close matches, a name two classes share, an id outside the classes, a model without id2label)."""

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline

from dit.pipelines.checks import SamplingValueError
from dit.pipelines.labels import ClassLabels, label_table
from tests.tiny import CLASS_NAMES

LABELS = ClassLabels(CLASS_NAMES, 10)


def test_names_are_diffusers_dit_pipeline_labels_without_the_shared_one():
    """DiTPipeline keeps the last class of a shared name ("crane" -> 4); we leave it out of the names."""
    theirs = DiTPipeline(transformer=torch.nn.Linear(1, 1), vae=torch.nn.Linear(1, 1), scheduler=DDIMScheduler(),
                         id2label=CLASS_NAMES).labels  # fmt: skip
    assert {name: i for name, i in theirs.items() if name != "crane"} == LABELS.names
    assert list(LABELS.names) == sorted(LABELS.names) and LABELS.ambiguous == {"crane": [3, 4]}


def test_ids_names_and_tensors_give_class_ids():
    assert LABELS.ids("goldfish") == [1] and LABELS.ids(7) == [7]
    assert LABELS.ids(["Carassius auratus", 2, "bird", "sports car"]) == [1, 2, 4, 7]
    assert LABELS.ids(torch.tensor([3, 0])) == [3, 0] and LABELS.ids((9,)) == [9]
    assert LABELS.ids(["german shepherd", " Tench "]) == [6, 0]  # a unique case-insensitive match; stripped
    assert LABELS.get_label_ids(["tench", "oak tree"]) == [0, 9] and LABELS.get_label_ids("tench") == [0]


BAD = {
    "typo": ("goldfsh", r"'goldfsh' is not a label of this model \(close matches: 'goldfish'\)"),
    "unrelated": ("zebra", r"'zebra' is not a label .*no close match.* class id 0\.\.9"),
    "shared": ("crane", r"'crane' names several classes: 3 \(crane\), 4 \(crane, bird\); pass the class id"),
    "id-high": (10, r"class id 10 is outside 0\.\.9 .*10 is the null class"),
    "id-negative": ([1, -1], r"class id -1 is outside 0\.\.9"),
    "empty": ([], r"class_labels must be a class id, a label name or a non-empty list"),
    "bool": ([True], r"a class label is an int id or a label name, got True"),
    "float": (1.5, r"class_labels must be .* got 1.5"),
}


@pytest.mark.parametrize("labels, message", BAD.values(), ids=BAD.keys())
def test_bad_labels_are_named(labels, message):
    with pytest.raises(SamplingValueError, match=message):
        LABELS.ids(labels)


def test_a_model_without_id2label_takes_ids_only():
    plain = ClassLabels(None, 4)
    assert plain.ids([3, 0]) == [3, 0] and plain.names == {} and plain.describe(3) == "class 3"
    with pytest.raises(SamplingValueError, match=r"no label names \(no id2label\); pass class ids 0\.\.3"):
        plain.ids("goldfish")


def test_id2label_is_checked_and_kept_with_string_keys():
    assert label_table({"1": "b", 0: "a"}, 2) == {"0": "a", "1": "b"}
    with pytest.raises(ValueError, match=r"id2label key 10 is not a class id of this model \(0\.\.9\)"):
        label_table({10: "x"}, 10)
    with pytest.raises(ValueError, match=r"id2label\['3'\] must be a non-empty string"):
        label_table({"3": ""}, 10)


def test_command_line_values_are_names_first_then_ids():
    digits = ClassLabels({0: "zero", 1: "7"}, 10)  # a label that is digits is a name
    assert digits.parse("7") == "7" and digits.ids([digits.parse("7")]) == [1]
    assert digits.parse("3") == 3 and digits.parse(" zero ") == "zero"
    assert LABELS.describe(1) == "class 1 (goldfish, Carassius auratus)"
