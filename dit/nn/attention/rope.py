"""2D rotary position embedding (FiT) with training-free resolution extrapolation, as small pure functions.

A head of width ``D`` is split in two halves: the first rotates with the token's row ``h``, the second with its
column ``w``. Each half holds ``D/4`` frequencies ``1 / theta^(2i / (D/2))``, each rotating one *interleaved* pair
of channels ``(x[2i], x[2i+1])`` (lucidrains' ``rotate_half``, as FiT). Positions are given per token as ``(h, w)``
indices, so padded variable-length sequences (and any aspect ratio) work.

Extrapolation beyond the training grid is chosen by name (:data:`EXTRAPOLATIONS`); every method is a function of
one axis ``(dim, theta, scale, train_len) -> frequencies`` with a per-sample ``scale = L_test / L_train >= 1``, and
optionally a temperature, a factor on q and k (logits times its square):

- ``none``: the training frequencies.
- ``pi`` / ``vision_pi``: position interpolation, ``theta_i / s``.
- ``ntk`` / ``vision_ntk``: NTK-aware base change ``b' = b * s^(d / (d - 2))`` (``d`` = channels of one axis).
- ``ntk_by_parts`` / ``vision_ntk_by_parts``: FiT's NTK-by-parts (YaRN's ``scaled_rope`` with its LLaMA constants):
  PI and NTK blended by the ramp between 1.25 and 0.75 rotations over the training length, then that and the
  training frequencies blended by the ramp between 16 and 2 rotations (:func:`ntk_by_parts_frequencies`).
- ``yarn`` / ``vision_yarn``: YaRN, ``theta_i' = (1 - g_i) theta_i / s + g_i theta_i`` with the ramp ``g`` between
  ``beta_fast = 32`` and ``beta_slow = 1`` rotations over the training length, plus the attention temperature
  ``mscale = 0.1 ln s + 1`` on q and k (logits times ``mscale^2``).
- ``ntk_pro1`` / ``ntk_pro2`` (and ``vision_*``): FiT's ``ntk-aware-pro1`` / ``-pro2``, NTK-aware frequencies with
  the temperature :func:`fit_proportion` of the longer side (pro1) or of the token count (pro2). Unlike the others
  it is not 1 inside the training grid: FiT's code doubles the length, so it exceeds 1 from half the training one.

Plain methods use one scale for both axes, ``max(h / h_train, w / w_train)``; ``vision_*`` scale height and width
separately (FiTv2's VisionNTK / VisionYaRN, FiT's ``decouple=True``). The temperatures depend on both sides, decoupled
or not, as FiT's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: YaRN's correction range, in rotations over the training length (FiT and the YaRN paper: 32 and 1).
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0
#: NTK-by-parts' two correction ranges in rotations (FiT's, from YaRN's scaled_rope): PI vs NTK, then vs none.
NTK_BY_PARTS_BETA, NTK_BY_PARTS_GAMMA = (1.25, 0.75), (16.0, 2.0)


@dataclass(frozen=True)
class RotaryEmbedding:
    """What :class:`~dit.nn.attention.DiTAttention` applies to queries and keys before the kernel.

    Args:
        cos: (B, N, 1, D) cosines, broadcast over heads.
        sin: (B, N, 1, D) sines.
        logit_scale: (B, 1, 1, 1) factor on the attention logits (YaRN temperature and/or the resolution-aware
            attention scale), applied to the queries; None: 1.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    logit_scale: torch.Tensor | None = None


# ----- frequencies --------------------------------------------------------------------------------------------
def axis_frequencies(dim: int, theta: float = 10000.0, device: torch.device | None = None) -> torch.Tensor:
    """The ``dim // 2`` frequencies of one axis with ``dim`` channels: ``1 / theta^(arange(0, dim, 2) / dim)``, fp64."""
    if dim % 2:
        raise ValueError(f"A rotary axis needs an even number of channels, got {dim}.")
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)  # (dim/2,)


def ntk_theta(theta: float, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """NTK-aware base ``theta * scale^(dim / (dim - 2))`` (``dim``: channels of the axis)."""
    return theta * scale.double() ** (dim / (dim - 2))


def yarn_correction_dim(rotations: float, dim: int, theta: float, train_len: int) -> float:
    """The (fractional) frequency index that makes ``rotations`` full turns over ``train_len`` positions."""
    return dim * math.log(train_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp(
    dim: int,
    theta: float,
    train_len: int,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
    device: torch.device | None = None,
) -> torch.Tensor:
    """YaRN's blend ``g`` (dim/2,): 1 keeps a frequency (fast, many turns in training), 0 interpolates it by ``s``.

    ``g_i = 1 - clamp((i - low) / (high - low), 0, 1)`` with ``low = floor(corr(beta_fast))`` and
    ``high = ceil(corr(beta_slow))`` clamped to ``[0, dim - 1]``, as in the YaRN and FiT code.
    """
    low = max(math.floor(yarn_correction_dim(beta_fast, dim, theta, train_len)), 0)
    high = min(math.ceil(yarn_correction_dim(beta_slow, dim, theta, train_len)), dim - 1)
    if low == high:
        high += 0.001  # no zero division
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)  # (dim/2,)
    return 1 - ramp


def yarn_mscale(scale: torch.Tensor) -> torch.Tensor:
    """YaRN's q/k magnitude factor ``0.1 ln s + 1`` (1 where ``s <= 1``)."""
    scale = scale.double()
    return torch.where(scale <= 1, torch.ones_like(scale), 0.1 * scale.log() + 1)


def fit_proportion(test_len: torch.Tensor, train_len: int) -> torch.Tensor:
    """FiT's ``ntk-aware-pro`` factor on cos and sin: ``sqrt(log(2 L) / log(L_train))`` where ``2 L > L_train``, else 1
    (``L``: the longer side (pro1) or the token count (pro2) of each sample, (B,); note the factor 2, FiT's)."""
    if train_len < 2:
        raise ValueError(f"FiT's proportion needs a training length >= 2 (its log is the divisor), got {train_len}.")
    doubled = 2 * test_len.double()  # (B,)
    ratio = (doubled.log() / math.log(train_len)).sqrt()
    return torch.where(doubled <= train_len, torch.ones_like(ratio), ratio)


def attention_logit_scale(test_tokens: torch.Tensor, train_tokens: int) -> torch.Tensor:
    """FiTv2's resolution-aware logit factor ``max(1, log(test_tokens) / log(train_tokens))`` (paper Eq. 15).

    The FiT code (``ntk-aware-pro2``) instead scales cos and sin by ``sqrt(log(2 h w) / log(train_tokens))``, i.e.
    logits by ``log(2 h w) / log(train_tokens)`` (an extra x2 inside the log: 1.206 instead of 1.081 at 20x20 for a
    16x16 training grid); this is the paper's formula, FiT's code's is the ``ntk_pro2`` method
    (:func:`fit_proportion`).
    """
    ratio = test_tokens.double().log() / math.log(train_tokens)
    return ratio.clamp(min=1.0)


# ----- extrapolation methods: one axis, per-sample scale (B,) -> frequencies (B, dim/2) ---------------------------
def _none(dim: int, theta: float, scale: torch.Tensor, train_len: int) -> torch.Tensor:
    return axis_frequencies(dim, theta, scale.device).expand(scale.shape[0], -1)


def _pi(dim: int, theta: float, scale: torch.Tensor, train_len: int) -> torch.Tensor:
    return axis_frequencies(dim, theta, scale.device)[None] / scale.double()[:, None]


def _ntk(dim: int, theta: float, scale: torch.Tensor, train_len: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=scale.device) / dim  # (dim/2,)
    return 1.0 / ntk_theta(theta, scale, dim)[:, None] ** exponents[None]


def _yarn(dim: int, theta: float, scale: torch.Tensor, train_len: int) -> torch.Tensor:
    base = axis_frequencies(dim, theta, scale.device)[None]  # (1, dim/2)
    keep = yarn_ramp(dim, theta, train_len, device=scale.device)[None]  # (1, dim/2)
    return (1 - keep) * base / scale.double()[:, None] + keep * base  # (B, dim/2)


def ntk_by_parts_frequencies(dim: int, theta: float, scale: torch.Tensor, train_len: int) -> torch.Tensor:
    """FiT's ``ntk-by-parts`` frequencies of one axis, (B, dim/2) for per-sample scales (B,).

    ``mixed = (1 - g1) * PI + g1 * NTK`` with ``g1`` the :func:`yarn_ramp` between 1.25 and 0.75 rotations, then
    ``(1 - g2) * mixed + g2 * theta_i`` with ``g2`` the ramp between 16 and 2 rotations over ``train_len``: the
    fastest frequencies are kept, the middle ones take NTK's base change, the slowest are interpolated.
    """
    base = axis_frequencies(dim, theta, scale.device)[None]  # (1, dim/2)
    to_ntk = yarn_ramp(dim, theta, train_len, *NTK_BY_PARTS_BETA, device=scale.device)[None]  # (1, dim/2)
    keep = yarn_ramp(dim, theta, train_len, *NTK_BY_PARTS_GAMMA, device=scale.device)[None]  # (1, dim/2)
    mixed = (1 - to_ntk) * _pi(dim, theta, scale, train_len) + to_ntk * _ntk(dim, theta, scale, train_len)
    return (1 - keep) * mixed + keep * base  # (B, dim/2)


# ----- temperatures: sizes (B, 2) and the training grid -> factor on q and k (B,) ---------------------------------
def _yarn_temperature(sizes: torch.Tensor, train_grid: tuple[int, int]) -> torch.Tensor:
    return yarn_mscale(axis_scales(sizes, train_grid, decoupled=False)[0])  # the larger axis scale


def _pro1_temperature(sizes: torch.Tensor, train_grid: tuple[int, int]) -> torch.Tensor:
    return fit_proportion(sizes.max(dim=1).values, max(train_grid))  # longer side against the training side


def _pro2_temperature(sizes: torch.Tensor, train_grid: tuple[int, int]) -> torch.Tensor:
    return fit_proportion(sizes[:, 0] * sizes[:, 1], train_grid[0] * train_grid[1])  # tokens against training tokens


@dataclass(frozen=True)
class Extrapolation:
    """A named extrapolation method.

    Args:
        axis_fn: ``(dim, theta, scale (B,), train_len) -> frequencies (B, dim/2)`` of one axis.
        decoupled: height and width get their own scale (``vision_*``), else both the larger one.
        temperature: ``(sizes (B, 2), train_grid) -> q/k magnitude factor (B,)`` (YaRN's mscale, FiT's
            proportion), or None.
    """

    axis_fn: Callable[[int, float, torch.Tensor, int], torch.Tensor]
    decoupled: bool = False
    temperature: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None


def _both(name: str, axis_fn, temperature=None) -> dict[str, Extrapolation]:
    """``name`` (one scale for both axes) and ``vision_<name>`` (one per axis)."""
    return {
        name: Extrapolation(axis_fn, temperature=temperature),
        f"vision_{name}": Extrapolation(axis_fn, decoupled=True, temperature=temperature),
    }


#: ``rope_extrapolation`` config value -> method.
EXTRAPOLATIONS: dict[str, Extrapolation] = {
    "none": Extrapolation(_none),
    **_both("pi", _pi),
    **_both("ntk", _ntk),
    **_both("ntk_by_parts", ntk_by_parts_frequencies),
    **_both("yarn", _yarn, _yarn_temperature),
    **_both("ntk_pro1", _ntk, _pro1_temperature),
    **_both("ntk_pro2", _ntk, _pro2_temperature),
}


def get_extrapolation(name: str) -> Extrapolation:
    """The method registered as ``name``; an unknown name is an error that lists the known ones."""
    if name not in EXTRAPOLATIONS:
        raise ValueError(f"Unknown rope_extrapolation {name!r}; choose one of {sorted(EXTRAPOLATIONS)}.")
    return EXTRAPOLATIONS[name]


def axis_scales(
    sizes: torch.Tensor, train_grid: tuple[int, int], decoupled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(s_h, s_w)`` (B,) each, ``>= 1``, for grids ``sizes`` (B, 2) = (h, w) in patches."""
    s_h = (sizes[:, 0].double() / train_grid[0]).clamp(min=1.0)  # (B,)
    s_w = (sizes[:, 1].double() / train_grid[1]).clamp(min=1.0)  # (B,)
    if decoupled:
        return s_h, s_w
    shared = torch.maximum(s_h, s_w)
    return shared, shared


def extrapolated_frequencies(
    sizes: torch.Tensor, head_dim: int, train_grid: tuple[int, int], method: str = "none", theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample frequencies of the two axes, (B, D/4) each, and the q/k temperature (B,) or None.

    The temperature (YaRN's, FiT's proportion) depends on both sides, decoupled or not, as FiT's does.
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary embedding needs a head width divisible by 4, got {head_dim}.")
    method_, dim = get_extrapolation(method), head_dim // 2
    s_h, s_w = axis_scales(sizes, train_grid, method_.decoupled)
    freqs_h = method_.axis_fn(dim, theta, s_h, train_grid[0])  # (B, D/4)
    freqs_w = method_.axis_fn(dim, theta, s_w, train_grid[1])  # (B, D/4)
    mscale = None if method_.temperature is None else method_.temperature(sizes, train_grid)  # (B,)
    return freqs_h, freqs_w, mscale


# ----- tables and rotation ------------------------------------------------------------------------------------
def rotary_tables(positions: torch.Tensor, freqs_h: torch.Tensor, freqs_w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``positions`` (B, N, 2) = (h, w) and per-sample frequencies (B, F) -> cos, sin (B, N, 1, 4F) in fp32.

    Channel layout ``[h-part | w-part]``, each frequency repeated for its interleaved channel pair.
    """
    pos = positions.double()  # (B, N, 2)
    angles_h = pos[..., 0, None] * freqs_h[:, None, :]  # (B, N, F)
    angles_w = pos[..., 1, None] * freqs_w[:, None, :]  # (B, N, F)
    angles = torch.cat([angles_h, angles_w], dim=-1).repeat_interleave(2, dim=-1)  # (B, N, 4F)
    return angles.cos().float()[:, :, None], angles.sin().float()[:, :, None]  # (B, N, 1, D)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...)`` -> ``(-x1, x0, -x3, x2, ...)``: a quarter turn of every interleaved pair."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, N, H, D) by the tables (B, N, 1, D); the result keeps ``x``'s dtype."""
    return x * cos.to(x.dtype) + rotate_pairs(x) * sin.to(x.dtype)


def rotary_embedding(
    positions: torch.Tensor,
    sizes: torch.Tensor,
    head_dim: int,
    train_grid: tuple[int, int],
    method: str = "none",
    logit_scale: bool = False,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> RotaryEmbedding:
    """Everything attention needs for tokens at ``positions`` (B, N, 2) of images ``sizes`` (B, 2) (h, w, patches).

    ``logit_scale`` switches on :func:`attention_logit_scale` with ``train_tokens = h_train * w_train``; it
    multiplies with the method's temperature squared (YaRN's ``mscale^2``, FiT's proportion squared). Angles are
    computed in fp64 and the tables stored in ``dtype`` (the model's, so no block casts them again); the logit scale
    is None when it is 1 for every sample by construction (no temperature, no attention scale). Everything is
    computed on ``positions``' device, with no host read.
    """
    sizes = sizes.to(positions.device, non_blocking=True)  # (B, 2)
    freqs_h, freqs_w, mscale = extrapolated_frequencies(sizes, head_dim, train_grid, method, theta)
    cos, sin = rotary_tables(positions, freqs_h, freqs_w)  # (B, N, 1, D)
    factor = None if mscale is None else mscale**2  # (B,)
    if logit_scale:
        scale = attention_logit_scale(sizes[:, 0] * sizes[:, 1], train_grid[0] * train_grid[1])  # (B,)
        factor = scale if factor is None else factor * scale
    factor = None if factor is None else factor.to(dtype)[:, None, None, None]  # (B, 1, 1, 1)
    return RotaryEmbedding(cos.to(dtype), sin.to(dtype), factor)
