"""Embeddings: patches with a cached 2D sin-cos position table, timesteps, micro-conditions and captions.

Parameter names follow diffusers (``pos_embed.proj``, ``timestep_embedder.linear_1``, ``caption_projection``),
so state dicts move between the two unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .linear import Linear


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``positions`` (M,) -> ``[sin, cos]`` embedding (M, embed_dim), frequencies computed in float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = torch.outer(positions.reshape(-1), omega)  # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D)


def sincos_2d(
    embed_dim: int,
    height: int,
    width: int,
    base_size: int,
    interpolation_scale: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """PixArt's 2D sin-cos table for an ``height x width`` patch grid -> (height*width, embed_dim), float32.

    Coordinates are normalised by the grid (``arange(n) / (n / base_size) / interpolation_scale``), so any
    grid, square or not, is an interpolation of the training grid. The first half of the channels encodes
    the column, the second half the row, as in PixArt and diffusers. Computed on ``device`` (default: the CPU).
    """
    if embed_dim % 4:
        raise ValueError(f"The position embedding width must be divisible by 4, got {embed_dim}.")
    rows = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation_scale
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    table = torch.cat([sincos_1d(embed_dim // 2, grid_cols), sincos_1d(embed_dim // 2, grid_rows)], dim=1)
    return table.float()  # (h*w, D)


def fractional_sincos(
    positions: torch.Tensor, sizes: torch.Tensor, base_grid: tuple[int, int], embed_dim: int
) -> torch.Tensor:
    """Per-token 2D sin-cos of each token's place as a fraction of its own image, on the ``base_grid`` scale.

    ``positions`` (B, L, 2) integer (row, col) of each token, ``sizes`` (B, 2) each sample's grid (h, w): the token
    at row ``i`` of an ``h``-row image sits at ``i * base_h / h``, so every size and aspect ratio spans the training
    grid's range (PixArt's position interpolation, one scale per axis). Channels as :func:`sincos_2d` (column half,
    then row half); for a square ``base_grid`` this equals ``sincos_2d(embed_dim, h, w, base_grid[0], 1)`` token for
    token. Returns (B, L, embed_dim) float32.
    """
    if embed_dim % 4:
        raise ValueError(f"The position embedding width must be divisible by 4, got {embed_dim}.")
    base = torch.tensor(base_grid, dtype=torch.float32, device=positions.device)  # (2,)
    cells = sizes.to(positions.device, torch.float32) / base  # (B, 2) image patches per base-grid patch
    coords = positions.float() / cells[:, None, :]  # (B, L, 2) rows, cols on the base grid's scale
    rows = sincos_1d(embed_dim // 2, coords[..., 0])  # (B*L, D/2)
    cols = sincos_1d(embed_dim // 2, coords[..., 1])  # (B*L, D/2)
    return torch.cat([cols, rows], dim=1).float().reshape(*positions.shape[:2], embed_dim)  # (B, L, D)


class PatchEmbed(nn.Module):
    """``p x p`` convolution to tokens plus the 2D sin-cos position table of the actual grid.

    The table is computed once per (height, width, device, dtype) and cached; it is not part of the state dict.

    Args:
        patch_size: side of a patch in latent pixels.
        in_channels: latent channels.
        embed_dim: token width.
        base_size: the training grid side (``sample_size // patch_size``).
        interpolation_scale: PixArt's position scale (``lewei_scale``).
        cache_size: how many grids to keep.
    """

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        base_size: int,
        interpolation_scale: float,
        cache_size: int = 16,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.base_size = base_size
        self.interpolation_scale = interpolation_scale
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def position_table(
        self, height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The (1, h*w, D) table of an ``height x width`` patch grid in ``dtype``, from the cache when possible.

        Computed in float64/float32 as PixArt does, then stored in ``dtype``: fp32 inputs get diffusers' exact
        sums, half-precision inputs skip an fp32 intermediate as large as the tokens. Inside a compiled graph the
        table is computed on ``device`` instead (no cache to guard on, no host copy; the compiler may fold it).
        """
        if torch.compiler.is_compiling():
            embed_dim = self.proj.out_channels
            return sincos_2d(embed_dim, height, width, self.base_size, self.interpolation_scale, device).to(dtype)[
                None
            ]
        key = (height, width, device, dtype)
        table = self._cache.get(key)
        if table is None:
            embed_dim = self.proj.out_channels
            table = sincos_2d(embed_dim, height, width, self.base_size, self.interpolation_scale)
            table = table.to(device, dtype)[None]  # (1, h*w, D)
            self._cache[key] = table
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, C, H, W) -> tokens (B, H/p * W/p, D) in row-major patch order."""
        height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        tokens = self.proj(latent).flatten(2).transpose(1, 2)  # (B, N, D), a transposed view
        # table first: the sum comes out contiguous, so no later op pays for the transposed layout
        return self.position_table(height, width, latent.device, tokens.dtype) + tokens


def timestep_sinusoid(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos, sin]`` embedding of (possibly fractional) timesteps (N,) -> (N, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (N, dim)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """``[sin, cos]`` embedding of guidance weights ``w * 1000`` (N,) -> (N, dim) float32.

    The formula of diffusers' ``get_guidance_scale_embedding`` (latent consistency models), so a student's
    ``timestep_cond`` means the same here as there. ``w`` is LCM's weight, ``guidance_scale - 1``.
    """
    half = dim // 2
    exponent = -math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device)
    angles = w.float()[:, None] * 1000.0 * torch.exp(exponent)[None, :]  # (N, half)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, 2 * half)
    return nn.functional.pad(embedding, (0, dim % 2))  # (N, dim)


#: Activations of the embedding MLPs, by the name a config gives.
EMBEDDING_ACTIVATIONS = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def _activation(name: str) -> nn.Module:
    if name not in EMBEDDING_ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(EMBEDDING_ACTIVATIONS)}.")
    return EMBEDDING_ACTIVATIONS[name]()


class TimestepEmbedding(nn.Module):
    """Two-layer MLP over a sinusoidal embedding (keys ``linear_1``, ``linear_2``), SiLU between them (diffusers';
    ``act_fn="gelu_tanh"``: MicroDiT's GELU(tanh)).

    With ``cond_proj_dim``, a bias-free ``cond_proj`` adds a condition (an LCM guidance embedding) to the
    sinusoid, as diffusers' ``TimestepEmbedding(cond_proj_dim=...)``; it starts at zero, so a model that gains it
    computes exactly what it did before.
    """

    def __init__(self, in_channels: int, embed_dim: int, cond_proj_dim: int | None = None, act_fn: str = "silu"):
        super().__init__()
        self.cond_proj = None
        if cond_proj_dim is not None:
            self.cond_proj = Linear(cond_proj_dim, in_channels, bias=False)
            nn.init.zeros_(self.cond_proj.weight)
        self.linear_1 = Linear(in_channels, embed_dim)
        self.act = _activation(act_fn)
        self.linear_2 = Linear(embed_dim, embed_dim)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("A timestep condition was given, but this model has no time_cond_proj_dim.")
            sample = sample + self.cond_proj(condition.to(sample.dtype))  # (B, in_channels)
        return self.linear_2(self.act(self.linear_1(sample)))


class CombinedTimestepSizeEmbeddings(nn.Module):
    """Timestep embedding plus PixArt-α's optional resolution and aspect-ratio micro-conditions.

    Args:
        embedding_dim: output width D (divisible by 3 with micro-conditions).
        use_additional_conditions: embed ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1) too.
    """

    def __init__(
        self, embedding_dim: int, use_additional_conditions: bool = False, time_cond_proj_dim: int | None = None
    ):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, cond_proj_dim=time_cond_proj_dim)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            if embedding_dim % 3:
                raise ValueError(f"Micro-conditions need a width divisible by 3, got {embedding_dim}.")
            self.resolution_embedder = TimestepEmbedding(256, embedding_dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(256, embedding_dim // 3)

    def forward(
        self,
        timestep: torch.Tensor,
        resolution: torch.Tensor | None,
        aspect_ratio: torch.Tensor | None,
        batch_size: int,
        hidden_dtype: torch.dtype,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_sinusoid(timestep).to(hidden_dtype), timestep_cond)  # (B, D)
        if not self.use_additional_conditions:
            return emb
        if resolution is None or aspect_ratio is None:
            raise ValueError(
                "This model uses micro-conditions: pass added_cond_kwargs with resolution and aspect_ratio."
            )
        res = self.resolution_embedder(timestep_sinusoid(resolution.flatten()).to(hidden_dtype))  # (2B, D/3)
        ar = self.aspect_ratio_embedder(timestep_sinusoid(aspect_ratio.flatten()).to(hidden_dtype))  # (B, D/3)
        return emb + torch.cat([res.reshape(batch_size, -1), ar.reshape(batch_size, -1)], dim=1)  # (B, D)


class CaptionProjection(nn.Module):
    """Caption features -> token width: ``linear_1``, GELU(tanh), ``linear_2``.

    With ``norm_eps``, a bias-free affine LayerNorm ``norm`` (weight only) sits between the activation and
    ``linear_2`` (MicroDiT's caption MLP and pooled-caption MLP).
    """

    def __init__(self, in_features: int, hidden_size: int, norm_eps: float | None = None):
        super().__init__()
        self.linear_1 = Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.norm = None if norm_eps is None else nn.LayerNorm(hidden_size, eps=norm_eps, bias=False)
        self.linear_2 = Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        hidden = self.act_1(self.linear_1(caption))  # (..., D)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.linear_2(hidden)
