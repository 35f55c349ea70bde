"""save_pretrained's options on every model class (variant, max_shard_size, safe_serialization) and from_pretrained
reading them back: variants beside the main weights, sharded folders, pickle read weights-only as diffusers
reads it."""

import inspect
import json

import pytest
import torch

from dit import (
    ControlNetAdapter,
    FiTTransformer,
    LiTTransformer,
    MultiControlNetAdapter,
    PixArtTransformer,
)
from dit.checkpoint import CheckpointKeyError
from tests.tiny import BACKBONES, randomize_

WEIGHTS = "diffusion_pytorch_model.safetensors"
#: what DiffusionPipeline.save_pretrained forwards to a component only when its save_pretrained names it
PIPELINE_OPTIONS = ("safe_serialization", "variant", "max_shard_size", "use_flashpack")


def _backbone(name: str, seed: int = 0) -> torch.nn.Module:
    cls, config = BACKBONES[name]
    torch.manual_seed(seed)
    return randomize_(cls(**config), std=0.05).eval()


def _adapter(base: torch.nn.Module, seed: int) -> ControlNetAdapter:
    torch.manual_seed(seed)
    return randomize_(ControlNetAdapter.from_transformer(base, num_blocks=1), std=0.05).eval()


def _assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("cls", [PixArtTransformer, FiTTransformer, ControlNetAdapter, MultiControlNetAdapter])
def test_save_pretrained_names_the_options_a_pipeline_forwards(cls):
    """DiffusionPipeline.save_pretrained forwards an option only when the component's method names it."""
    parameters = inspect.signature(cls.save_pretrained).parameters
    assert all(option in parameters for option in PIPELINE_OPTIONS)


@pytest.mark.parametrize("name", BACKBONES)
def test_variant_shards_and_pickle_round_trip(tmp_path, name):
    """Main weights, a bf16 variant in 20 KB shards and a pickle variant in one folder: each loads back exactly,
    the main file is never touched by the variants, and pickle needs the opt-in both ways."""
    cls = BACKBONES[name][0]
    main, other = _backbone(name, seed=0), _backbone(name, seed=1)
    main.save_pretrained(tmp_path)
    main_bytes = (tmp_path / WEIGHTS).read_bytes()

    other.to(torch.bfloat16).save_pretrained(tmp_path, variant="bf16", max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.bf16.json").read_text())
    shards = sorted(tmp_path.glob("diffusion_pytorch_model.bf16-*-of-*.safetensors"))
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    with pytest.warns(UserWarning, match="pickle"):
        other.save_pretrained(tmp_path, variant="pkl", safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.pkl.bin").is_file()
    assert (tmp_path / WEIGHTS).read_bytes() == main_bytes

    _assert_same_weights(cls.from_pretrained(tmp_path), main.float())
    _assert_same_weights(cls.from_pretrained(tmp_path, variant="bf16", torch_dtype=torch.bfloat16), other)
    # pickle weights read back weights-only, as diffusers reads them: no opt-in
    _assert_same_weights(cls.from_pretrained(tmp_path, variant="pkl", torch_dtype=torch.bfloat16), other)


def test_use_safetensors_false_reads_the_pickle_weights_weights_only(tmp_path):
    model, other = _backbone("pixart", seed=0), _backbone("pixart", seed=1)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="pickle"):
        other.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for file in (tmp_path / "bin").iterdir():  # a folder holding both formats, with different weights
        if file.suffix == ".bin":
            file.rename(tmp_path / file.name)
    _assert_same_weights(PixArtTransformer.from_pretrained(tmp_path), model)  # safetensors first
    _assert_same_weights(PixArtTransformer.from_pretrained(tmp_path, use_safetensors=False), other)


def test_sharded_folder_stays_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    _backbone("lit").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    state = load_file(tmp_path / shard)
    del state[key]
    save_file(state, tmp_path / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointKeyError, match=key.replace(".", r"\.")):
        LiTTransformer.from_pretrained(tmp_path)


def test_multi_adapter_saves_beside_itself_and_forwards_the_options(tmp_path):
    """diffusers' MultiControlNetModel layout (folder, folder_1, ...), every option forwarded to every adapter,
    variant read back; a later save with fewer adapters leaves no stale adapter behind."""
    base = _backbone("pixart")
    main = MultiControlNetAdapter([_adapter(base, 1), _adapter(base, 2)])
    other = MultiControlNetAdapter([_adapter(base, 3), _adapter(base, 4)])
    folder = tmp_path / "controlnet"
    main.save_pretrained(folder)
    other.save_pretrained(folder, variant="fp16", max_shard_size="20KB")
    for adapter_folder in (folder, tmp_path / "controlnet_1"):
        assert (adapter_folder / WEIGHTS).is_file()
        assert (adapter_folder / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    _assert_same_weights(MultiControlNetAdapter.from_pretrained(folder), main)
    _assert_same_weights(MultiControlNetAdapter.from_pretrained(folder, variant="fp16"), other)

    MultiControlNetAdapter([_adapter(base, 5)]).save_pretrained(folder)
    assert not (tmp_path / "controlnet_1").exists()
    assert len(MultiControlNetAdapter.from_pretrained(folder).nets) == 1


def test_multi_adapter_reads_the_earlier_layout(tmp_path):
    base = _backbone("pixart")
    adapters = [_adapter(base, 1), _adapter(base, 2)]
    for i, adapter in enumerate(adapters):
        adapter.save_pretrained(tmp_path / f"adapter_{i}")
    _assert_same_weights(MultiControlNetAdapter.from_pretrained(tmp_path), MultiControlNetAdapter(adapters))


@pytest.mark.parametrize("max_shard_size", ["10GB", "20KB"])
def test_a_variant_only_folder_loads_with_its_variant_and_names_it_otherwise(tmp_path, max_shard_size):
    """save_pretrained(variant=...) alone writes no main weights: as in diffusers, loading needs variant=, and
    leaving it out is an error naming the variant (for our models and for a pipeline's other components)."""
    from dit.pipelines import TextToImagePipeline
    from tests.tiny import save_tiny_pipeline

    pipe = TextToImagePipeline.from_pretrained(save_tiny_pipeline(tmp_path / "main"))
    pipe.save_pretrained(tmp_path / "out", variant="fp16", max_shard_size=max_shard_size)
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "out", variant="fp16")
    _assert_same_weights(loaded.transformer, pipe.transformer)
    with pytest.raises(FileNotFoundError, match=r"only weights of variant 'fp16'.*variant='fp16'"):
        TextToImagePipeline.from_pretrained(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"transformer' holds only weights of variant 'fp16'"):
        PixArtTransformer.from_pretrained(tmp_path / "out", subfolder="transformer")
    pipe.save_pretrained(tmp_path / "out")  # the main weights beside the variant: both load
    assert isinstance(TextToImagePipeline.from_pretrained(tmp_path / "out"), TextToImagePipeline)
