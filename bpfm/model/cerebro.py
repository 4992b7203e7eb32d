"""CEReBrO encoder: per-channel patch tokens, learned channel + patch encodings, and pre-norm
transformer blocks that alternate inter-channel (even blocks) and intra-channel (odd blocks)
attention. Module and parameter names follow the official checkpoints (`research/cerebro.md` §5),
so their `model.*` keys load with a one-line prefix change.

Tokens are kept as contiguous [B, C, P, D] inside the blocks: LayerNorm, MLP and the qkv/proj
Linears work on any leading shape, so the token tensor itself never needs a transpose. Long
sequences and symbolic tracing attend through `F.scaled_dot_product_attention`; the short ones of
ECG + PPG windows (2 and 19 tokens) through `attention_core`, which is faster for them on CPU
and CUDA alike (`_use_sdpa`). All reshapes are view/permute/reshape/einsum, which torch.fx,
torch.export and torch.compile trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpfm.errors import BpfmError
from bpfm.model.attention import attention_core


@dataclass(frozen=True)
class CerebroConfig:
    dim: int = 192
    depth: int = 8
    heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 64
    max_channels: int = 64  # rows of channel_encoding
    max_patches: int = 100  # rows of patch_encoding
    drop_path: float = 0.2  # constant in every block, as the paper's code


# Registered sizes (timm-style factories); the paper calls "base" "medium".
SIZES: dict[str, Callable[..., CerebroConfig]] = {}
SIZE_ALIASES = {"base": "medium"}


def register_size(
    name: str,
) -> Callable[[Callable[..., CerebroConfig]], Callable[..., CerebroConfig]]:
    def add(factory: Callable[..., CerebroConfig]) -> Callable[..., CerebroConfig]:
        SIZES[name] = factory
        return factory

    return add


@register_size("small")
def cerebro_small(**overrides: Any) -> CerebroConfig:
    return replace(CerebroConfig(dim=192, depth=8, heads=12), **overrides)


@register_size("medium")
def cerebro_medium(**overrides: Any) -> CerebroConfig:
    return replace(CerebroConfig(dim=576, depth=10, heads=12), **overrides)


@register_size("large")
def cerebro_large(**overrides: Any) -> CerebroConfig:
    return replace(CerebroConfig(dim=768, depth=12, heads=12), **overrides)


def size_config(size: str, **overrides: Any) -> CerebroConfig:
    """The config of a registered size (or alias); unknown names list the valid ones."""
    name = SIZE_ALIASES.get(size, size)
    if name not in SIZES:
        valid = ", ".join([*SIZES, *SIZE_ALIASES])
        raise BpfmError(f"size: unknown model size {size!r} (valid: {valid})")
    return SIZES[name](**overrides)


def _picks_rows(x: torch.Tensor) -> bool:
    """Whether `DropPath` runs its branch on the kept rows only: for concrete CPU tensors, not
    under torch.compile or torch.fx tracing (no data-dependent shapes there)."""
    if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu"


class DropPath(nn.Module):
    """Stochastic depth around a residual branch: `x + branch(x) * keep / (1 - p)`, with `keep`
    drawn per sample while training (the identity plus branch otherwise).

    On CPU the branch runs on the kept samples only and its output is added back at their rows:
    the same result, since no layer of a branch mixes samples, without spending a fifth of the
    block's matmuls (p = 0.2) on outputs multiplied by zero. Accelerators keep the mask product:
    picking the rows there waits for the device."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(
        self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x + branch(x)
        keep_prob = 1.0 - self.p
        keep = x.new_empty(x.shape[0]).bernoulli_(keep_prob)
        if _picks_rows(x):
            rows = keep.nonzero().squeeze(1)
            if len(rows) == 0:
                return x
            if len(rows) == len(x):
                return x.add(branch(x), alpha=1.0 / keep_prob)
            return x.index_add(0, rows, branch(x.index_select(0, rows)), alpha=1.0 / keep_prob)
        return x + branch(x) * keep.div_(keep_prob).view((-1,) + (1,) * (x.dim() - 1))


# Beyond this length attention goes through SDPA: its fused kernels pay off there and never
# materialise the [length, length] scores (EEG pretraining: up to 100 patches, 64 channels).
LONG_SEQUENCE = 32


def _use_sdpa(x: torch.Tensor, axis: int) -> bool:
    """SDPA for long sequences only. For the 2- and 19-token sequences of ECG + PPG windows
    `attention_core` is faster on CPU and on CUDA alike: on an H100, cuDNN's SDPA kernels for
    the 2-token inter-channel attention took 41 % of a large bf16 training step
    (benchmarks/train_throughput.py, variant `sdpa`). Symbolic tracing has no concrete shapes
    and keeps the SDPA graph."""
    if isinstance(x, torch.fx.Proxy):
        return True
    return x.shape[axis] > LONG_SEQUENCE


class Attention(nn.Module):
    """Multi-head self-attention along one axis of [B, C, P, D] tokens.

    `over_channels=True` attends across the C channels at each time position (inter-channel);
    otherwise across the P patches of each channel (intra-channel)."""

    def __init__(self, dim: int, heads: int, over_channels: bool):
        super().__init__()
        if dim % heads:
            raise BpfmError(f"heads: {heads} does not divide the model width {dim}")
        self.heads = heads
        self.over_channels = over_channels
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, C, P, D] -> q, k, v each [sequences, heads, length, head_dim]."""
        b, c, p, d = x.shape
        qkv = self.qkv(x).view(b, c, p, 3, self.heads, d // self.heads)
        if self.over_channels:  # sequences (B, P), length C
            qkv = qkv.permute(3, 0, 2, 4, 1, 5).reshape(3, b * p, self.heads, c, d // self.heads)
        else:  # sequences (B, C), length P
            qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, b * c, self.heads, p, d // self.heads)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[sequences, heads, length, head_dim] -> [B, C, P, D]."""
        b, c, p, d = shape
        if self.over_channels:
            out = out.view(b, p, self.heads, c, d // self.heads).permute(0, 3, 1, 2, 4)
        else:
            out = out.view(b, c, self.heads, p, d // self.heads).permute(0, 1, 3, 2, 4)
        return out.reshape(b, c, p, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_sdpa(x, axis=1 if self.over_channels else 2):
            q, k, v = self.split_heads(x)
            return self.proj(self.merge_heads(F.scaled_dot_product_attention(q, k, v), x.shape))
        return self.proj(attention_core(self.qkv(x), self.heads, self.over_channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as timm's Mlp
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: CerebroConfig, block_idx: int):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, config.heads, over_channels=block_idx % 2 == 0)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, config.mlp_ratio * dim)
        self.drop_path = DropPath(config.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path(x, lambda t: self.attn(self.norm1(t)))
        return self.drop_path(x, lambda t: self.mlp(self.norm2(t)))


class ConvPatch(nn.Module):
    """Conv2d(1, D, (1, patch), stride (1, patch)): one Linear per patch, shared by channels."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=(1, patch_size), stride=(1, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, T] -> [B, C, P, D]. Contiguous: the permuted conv output would otherwise pass
        # its D-strided layout on through every residual add, and each LayerNorm and Linear
        # would copy its input back to contiguous.
        return self.proj(x.unsqueeze(1)).permute(0, 2, 3, 1).contiguous()


class PatchEmbed(nn.Module):
    """Wrapper kept so the keys read `patch_embed.patch_embed.proj.*`, as in the official code."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.patch_embed = ConvPatch(dim, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


class CerebroEncoder(nn.Module):
    """[B, C, T] signals -> [B, C*P, D] normalised tokens (channel-major, P = T // patch_size)."""

    def __init__(self, config: CerebroConfig):
        super().__init__()
        if config.dim % 2:
            raise BpfmError(f"dim: model width {config.dim} must be even (two half encodings)")
        self.config = config
        dim = config.dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pad_token = nn.Parameter(torch.zeros(1, 1, dim))  # kept for the official key layout
        self.channel_encoding = nn.Parameter(torch.zeros(1, config.max_channels, dim // 2))
        self.patch_encoding = nn.Parameter(torch.zeros(1, config.max_patches, dim // 2))
        self.patch_embed = PatchEmbed(dim, config.patch_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.norm = nn.LayerNorm(dim)

    def check_shape(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.dim() != 3:
            raise BpfmError(f"input: expected [batch, channels, samples], got {list(x.shape)}")
        channels, patches = x.shape[1], x.shape[2] // cfg.patch_size
        if not 1 <= channels <= cfg.max_channels:
            raise BpfmError(f"input: {channels} channels, the model takes 1..{cfg.max_channels}")
        if not 1 <= patches <= cfg.max_patches:
            raise BpfmError(
                f"input: {x.shape[2]} samples give {patches} patches of {cfg.patch_size}, "
                f"the model takes 1..{cfg.max_patches}"
            )

    def positional_encoding(self, channels: int, patches: int) -> torch.Tensor:
        """[1, C, P, D]: channel encoding in the first D/2 features, patch encoding in the rest."""
        half = self.config.dim // 2
        chan = self.channel_encoding[:, :channels].unsqueeze(2).expand(1, channels, patches, half)
        patch = self.patch_encoding[:, :patches].unsqueeze(1).expand(1, channels, patches, half)
        return torch.cat([chan, patch], dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (bool [B, C, P], True = hidden) swaps tokens for `mask_token` (SimMIM)."""
        if not isinstance(x, torch.fx.Proxy):  # symbolic tracing has no concrete shapes
            self.check_shape(x)
        tokens = self.patch_embed(x)  # [B, C, P, D]; samples past the last full patch dropped
        b, c, p, d = tokens.shape
        if mask is not None:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.positional_encoding(c, p)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens).reshape(b, c * p, d)
