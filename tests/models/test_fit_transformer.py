"""FiTTransformer: variable-size batches (padding, masks, invariance), extrapolation, bad input, I/O, gradients."""

import pytest
import torch
import torch.nn.functional as F

from dit import FiTTransformer
from dit.models.fit_transformer import TIMESTEP_CONVENTIONS
from dit.nn.attention.rope import EXTRAPOLATIONS
from dit.nn.embeddings import sincos_2d, timestep_sinusoid
from tests.tiny import FIT, randomize_


def _model(**overrides):
    torch.manual_seed(0)
    return randomize_(FiTTransformer(**{**FIT, **overrides}), std=0.2).eval()


def _text(batch, length=6, seed=1):
    return torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))


def _canvas(sizes, seed=0, fill=0.0):
    """Latents of the given (h, w) sizes on one canvas, padded with ``fill`` at the bottom/right."""
    gen = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = torch.full((len(sizes), 4, height, width), fill)
    for i, (h, w) in enumerate(sizes):
        canvas[i, :, :h, :w] = torch.randn(4, h, w, generator=gen)
    return canvas, torch.tensor(sizes)


def _run(model, latents, sizes=None, text=None, t=None, mask=None, **kwargs):
    batch = latents.shape[0]
    text = _text(batch) if text is None else text
    t = torch.linspace(100, 900, batch) if t is None else t
    return model(latents, text, t, encoder_attention_mask=mask, image_sizes=sizes, **kwargs).sample


# ----- shapes, padding, masks --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(8, 8), (4, 12), (12, 4)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_any_size_runs(size, masked):
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]) if masked else None
    with torch.no_grad():
        out = _run(_model(), torch.randn(2, 4, *size), mask=mask)
    assert out.shape == (2, 4, *size) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_fresh_model_starts_at_zero_with_identity_blocks():
    model = FiTTransformer(**FIT).eval()
    assert all((block.adaln_lora.linear_2.weight == 0).all() for block in model.transformer_blocks)
    assert (model.adaln_shared.weight == 0).all()
    with torch.no_grad():
        assert torch.count_nonzero(_run(model, torch.randn(2, 4, 8, 8))) == 0


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_full_and_tiny_sample_in_one_batch(masked):
    latents, sizes = _canvas([(12, 16), (2, 2)])  # 48 tokens (= max_tokens) and 1 token
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]) if masked else None
    with torch.no_grad():
        out = _run(_model(), latents, sizes, mask=mask)
    assert torch.isfinite(out).all()
    assert out[0].abs().sum() > 0 and out[1, :, :2, :2].abs().sum() > 0
    assert torch.count_nonzero(out[1, :, 2:]) == 0 and torch.count_nonzero(out[1, :, :, 2:]) == 0


@pytest.mark.parametrize(
    "method, logit_scale, absolute",
    [("none", False, "none"), ("vision_yarn", True, "none"), ("none", False, "fractional")],
    ids=["plain", "vision-yarn+scale", "fractional-position"],
)
@pytest.mark.parametrize("own", [(6, 10), (10, 4)], ids=["wide", "tall"])
def test_a_sample_ignores_the_rest_of_its_batch(method, logit_scale, absolute, own):
    """A sample's output does not change when the other samples change size or content (fp32, 1e-5)."""
    model = _model(rope_extrapolation=method, attention_logit_scale=logit_scale, absolute_position=absolute)
    alone, _ = _canvas([own], seed=3)
    t, text = torch.tensor([321.0]), _text(1, seed=5)
    with torch.no_grad():
        reference = _run(model, alone, text=text, t=t)[0]  # (C, h, w), no padding at all
        for others, seed in ([(12, 16)], 7), ([(2, 4), (4, 2)], 8), ([(12, 16), (2, 2)], 9):
            latents, sizes = _canvas([own, *others], seed=seed)
            latents[0] = 0
            latents[0, :, : own[0], : own[1]] = alone[0]
            batch_text = torch.cat([text, _text(len(others), seed=seed)])
            batch_t = torch.cat([t, torch.rand(len(others)) * 1000])
            out = _run(model, latents, sizes, text=batch_text, t=batch_t)
            torch.testing.assert_close(out[0, :, : own[0], : own[1]], reference, atol=1e-5, rtol=1e-5)
            assert torch.count_nonzero(out[0, :, own[0] :]) == 0 and torch.count_nonzero(out[0, :, :, own[1] :]) == 0


def test_math_backend_matches_sdpa_with_padding():
    model = _model()
    latents, sizes = _canvas([(8, 12), (4, 6), (2, 10)])
    with torch.no_grad():
        sdpa = _run(model, latents, sizes)
        model.set_attention_backend("math")
        torch.testing.assert_close(_run(model, latents, sizes), sdpa, atol=1e-5, rtol=1e-5)


# ----- extrapolation -----------------------------------------------------------------------------------------
#: FiT's ntk-aware-pro methods scale the logits inside the training grid too, as FiT's code does.
PRO = [name for name in sorted(EXTRAPOLATIONS) if "_pro" in name]


def test_every_extrapolation_is_plain_rope_inside_the_training_grid():
    model = _model()
    latents, sizes = _canvas([(8, 8), (4, 8)])  # 4x4 and 2x4 patches: inside the 4x4 training grid
    with torch.no_grad():
        plain = _run(model, latents, sizes)
        for method in sorted(set(EXTRAPOLATIONS) - set(PRO)):
            model.set_extrapolation(method, logit_scale=True)
            torch.testing.assert_close(_run(model, latents, sizes), plain, atol=1e-6, rtol=1e-6, msg=method)
        for method in PRO:  # the same frequencies, but FiT's proportion on the logits: sqrt(log 32 / log 16) here
            model.set_extrapolation(method, logit_scale=False)
            assert not torch.allclose(_run(model, latents, sizes), plain, atol=1e-4), method


def test_beyond_the_training_grid_the_methods_differ():
    model = _model(max_tokens=16)
    latents = torch.randn(1, 4, 4, 16)  # 2x8 patches: 16 tokens but twice the training width
    with torch.no_grad():
        outputs = {}
        for method in ("none", "pi", "vision_pi", "ntk", "vision_ntk", "ntk_by_parts", "yarn", "ntk_pro1", "ntk_pro2"):
            model.set_extrapolation(method, logit_scale=False)
            outputs[method] = _run(model, latents)
    # plain NTK also rescales the height (by the width's factor 2); VisionNTK leaves the fitting height alone. With
    # 2 frequencies per axis NTK-by-parts keeps the first and interpolates the second, as NTK does here (not PI).
    pairs = [("none", "pi"), ("pi", "vision_pi"), ("pi", "ntk"), ("none", "vision_ntk"), ("ntk", "vision_ntk"),
             ("ntk", "yarn"), ("pi", "ntk_by_parts"), ("ntk", "ntk_pro1"), ("ntk_pro1", "ntk_pro2")]  # fmt: skip
    for a, b in pairs:
        assert not torch.allclose(outputs[a], outputs[b]), (a, b)


def test_too_many_tokens_needs_extrapolation():
    model = _model()
    latents = torch.randn(1, 4, 14, 16)  # 7x8 = 56 tokens > 48
    with pytest.raises(ValueError, match=r"Image size 14x16 .* 56 tokens, more than max_tokens=48"):
        _run(model, latents)
    model.set_extrapolation("vision_ntk", logit_scale=True)
    assert model.config.rope_extrapolation == "vision_ntk" and model.config.attention_logit_scale
    with torch.no_grad():
        assert torch.isfinite(_run(model, latents)).all()


def test_unknown_extrapolation_is_named():
    with pytest.raises(ValueError, match="vision_yarn"):
        _model().set_extrapolation("dynamic")
    with pytest.raises(ValueError, match="vision_yarn"):
        FiTTransformer(**FIT, rope_extrapolation="dynamic")


# ----- absolute position ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[(8, 8)], [(8, 12), (4, 6)], [(12, 4), (2, 16)]], ids=["square", "wide", "tall"])
def test_fractional_position_is_added_to_each_real_token(sizes):
    """With a zero patch embedding, block 0 sees exactly each sample's own fractional table at its real tokens."""
    model = _model(absolute_position="fractional", train_grid=[4, 4])
    torch.nn.init.zeros_(model.x_embedder.weight)
    torch.nn.init.zeros_(model.x_embedder.bias)
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    latents, image_sizes = _canvas(sizes)
    with torch.no_grad():
        _run(model, latents, image_sizes)
    for i, (h, w) in enumerate(sizes):
        table = sincos_2d(16, h // 2, w // 2, base_size=4, interpolation_scale=1)  # (h*w, D), row-major
        torch.testing.assert_close(seen[0][i, : len(table)], table)
        assert torch.count_nonzero(seen[0][i, len(table) :]) == 0  # padding stays zero


def test_fractional_position_changes_the_output_and_is_named():
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        plain = _run(_model(), latents)
        placed = _run(_model(absolute_position="fractional"), latents)
    assert not torch.allclose(plain, placed)
    with pytest.raises(ValueError, match=r"absolute_position must be 'none' or 'fractional', got 'learned'"):
        FiTTransformer(**FIT, absolute_position="learned")


# ----- bad input ---------------------------------------------------------------------------------------------
def test_canvas_not_divisible_by_patch_names_size():
    with pytest.raises(ValueError, match=r"7x8 is not divisible by the patch size 2"):
        _run(_model(), torch.randn(2, 4, 7, 8))


@pytest.mark.parametrize(
    "sizes, message",
    [([[5, 8], [8, 8]], r"5x8 must .* divide into 2x2 patches"), ([[8, 10], [8, 8]], r"8x10 must .* fit the 8x8")],
)
def test_bad_image_sizes_are_named(sizes, message):
    with pytest.raises(ValueError, match=message):
        _run(_model(), torch.randn(2, 4, 8, 8), torch.tensor(sizes))


def test_image_sizes_shape_and_channels_checked():
    with pytest.raises(ValueError, match=r"image_sizes must be \(batch=2, 2\)"):
        _run(_model(), torch.randn(2, 4, 8, 8), torch.tensor([[8, 8]]))
    with pytest.raises(ValueError, match="3 channels; this model takes 4"):
        _run(_model(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="width 16; .* is 32"):
        _run(_model(), torch.randn(2, 4, 8, 8), text=torch.randn(2, 6, 16))


# ----- conditioning and hooks --------------------------------------------------------------------------------
def test_class_conditioning_with_null_class():
    model = _model(caption_channels=None, num_classes=5)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        null = model(latents, timestep=torch.tensor([10.0, 20.0])).sample
        explicit_null = model(latents, timestep=torch.tensor([10.0, 20.0]), class_labels=torch.tensor([5, 5])).sample
        labelled = model(latents, timestep=torch.tensor([10.0, 20.0]), class_labels=torch.tensor([1, 3])).sample
    assert torch.equal(null, explicit_null)
    assert not torch.allclose(null, labelled)
    assert model.class_embedder.weight.shape == (6, 16)


def test_block_controls_see_every_block():
    model = _model()
    latents, sizes = _canvas([(8, 8), (4, 6)])
    seen = []

    def controls(index, hidden_states, context):
        seen.append(
            (index, tuple(hidden_states.shape), context.attention_mask is not None, tuple(context.rotary.cos.shape))
        )
        return hidden_states * 0 if index == 1 else hidden_states

    with torch.no_grad():
        out = _run(model, latents, sizes, block_controls=controls)
        plain = _run(model, latents, sizes)
    assert seen == [(0, (2, 16, 16), True, (2, 16, 1, 8)), (1, (2, 16, 16), True, (2, 16, 1, 8))]
    assert not torch.allclose(out, plain)


# ----- output head and timestep convention -------------------------------------------------------------------
@pytest.mark.parametrize("head", ["table", "silu"])
def test_output_head_keys_and_zero_start(head):
    model = FiTTransformer(**FIT, output_head=head).eval()
    keys = set(model.state_dict())
    assert ("scale_shift_table" in keys) == (head == "table")
    assert ({"norm_out.linear.weight", "norm_out.linear.bias"} <= keys) == (head == "silu")
    with torch.no_grad():
        assert torch.count_nonzero(_run(model, torch.randn(2, 4, 8, 8))) == 0


@pytest.mark.parametrize("sizes", [[(8, 8), (8, 8)], [(8, 12), (4, 6)]], ids=["full", "padded"])
def test_silu_head_is_dits_final_layer(sizes):
    """``proj_out(LayerNorm(x) * (1 + scale) + shift)`` with ``shift, scale = norm_out.linear(SiLU(emb))`` and
    ``emb`` the timestep plus class embedding (DiT's and FiT's FinalLayer)."""
    model = _model(output_head="silu", caption_channels=None, num_classes=5)
    seen = {}
    model.norm_out.register_forward_hook(lambda module, args, out: seen.update(x=args[0], emb=args[1]))
    model.proj_out.register_forward_hook(lambda module, args, out: seen.update(out=out))
    latents, image_sizes = _canvas(sizes)
    t, labels = torch.tensor([250.0, 600.0]), torch.tensor([1, 5])
    with torch.no_grad():
        model(latents, timestep=t, class_labels=labels, image_sizes=image_sizes)
        emb = model.timestep_embedder(timestep_sinusoid(t)) + model.class_embedder(labels)  # (B, D)
        shift, scale = model.norm_out.linear(F.silu(emb))[:, None].chunk(2, dim=-1)
        normed = F.layer_norm(seen["x"], (16,), eps=1e-6)
        torch.testing.assert_close(seen["emb"], emb)
        torch.testing.assert_close(seen["out"], model.proj_out(normed * (1 + scale) + shift), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("convention", "given", "embedded"),
    [("diffusers", [0.25, 700.0], [0.25, 700.0]), ("sit", [750.0, 100.0], [0.25, 0.9]),
     ("fit_v1", [999.0, 0.5], [1.0, 0.5]), ("fit_v1", [1.0, 321.0], [1.0, 1.0])],
)  # fmt: skip
def test_timestep_convention_is_what_the_embedding_sees(convention, given, embedded):
    """The same weights with another convention: ``model(t)`` equals the ``diffusers`` model at the time it embeds
    (``sit``: 1 - t / 1000; ``fit_v1``: min(t, 1), the released FiT v1 forward's clamp)."""
    latents, sizes = _canvas([(8, 8), (6, 4)])
    with torch.no_grad():
        out = _run(_model(timestep_convention=convention), latents, sizes, t=torch.tensor(given))
        reference = _run(_model(), latents, sizes, t=torch.tensor(embedded))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert TIMESTEP_CONVENTIONS[convention](torch.tensor(given)).tolist() == pytest.approx(embedded)


def test_unknown_head_and_convention_are_named():
    with pytest.raises(ValueError, match=r"output_head must be one of \['silu', 'table'\], got 'gelu'"):
        FiTTransformer(**FIT, output_head="gelu")
    with pytest.raises(ValueError, match=r"timestep_convention must be one of .*'sit'.*got 'edm'"):
        FiTTransformer(**FIT, timestep_convention="edm")


# ----- I/O and training --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [dict(rope_extrapolation="vision_yarn", train_grid=[4, 6]),
     dict(rope_extrapolation="vision_ntk_pro2", output_head="silu", timestep_convention="sit")],
    ids=["yarn", "fit-options"],
)  # fmt: skip
def test_save_load_round_trip(tmp_path, options):
    model = _model(**options)
    model.save_pretrained(tmp_path)
    loaded = FiTTransformer.from_pretrained(tmp_path).eval()
    assert all(loaded.config[key] == value for key, value in options.items())
    assert loaded.train_grid == model.train_grid
    latents, sizes = _canvas([(12, 16), (6, 4)])
    with torch.no_grad():
        assert torch.equal(_run(loaded, latents, sizes), _run(model, latents, sizes))


def test_gradients_come_from_valid_positions_only():
    model = _model().train()
    clean, sizes = _canvas([(8, 12), (4, 6)])
    garbage, _ = _canvas([(8, 12), (4, 6)], fill=7.0)

    def grads(latents):
        model.zero_grad()
        latents = latents.clone().requires_grad_(True)
        _run(model, latents, sizes).square().mean().backward()
        return latents.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    input_grad, params = grads(clean)
    assert torch.count_nonzero(input_grad[1, :, 4:]) == 0 and torch.count_nonzero(input_grad[1, :, :, 6:]) == 0
    assert input_grad[1, :, :4, :6].abs().sum() > 0 and input_grad[0].abs().sum() > 0
    garbage_grad, garbage_params = grads(garbage)  # padding full of 7s: nothing changes
    torch.testing.assert_close(garbage_grad, input_grad)
    for name, grad in params.items():
        torch.testing.assert_close(garbage_params[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_same_gradients():
    model = _model().train()
    latents, sizes = _canvas([(8, 12), (4, 6)])

    def grads():
        model.zero_grad()
        _run(model, latents, sizes).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    for name, grad in grads().items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)
