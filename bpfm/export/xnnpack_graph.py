"""The BP model rewritten into ops ExecuTorch's XNNPACK partitioner delegates (export only).

The training model's graph leaves 280 ops of the small model on ExecuTorch's portable kernels,
in 66 XNNPACK partitions: the partitioner in executorch 1.5.1 has no LayerNorm and no sum, takes
softmax over the last axis only, and no slice, squeeze or reshape whose shape names the dynamic
batch. `for_xnnpack` builds the same function out of ops it does take:

- the patch Conv2d(1, D, (1, 64), stride 64) as a Linear(64, D) over the window cut into patches,
  so that dynamic int8 quantizes it too (the conv stayed fp32: 49 KB);
- LayerNorm as (x - mean) * rsqrt(var + eps), the means a Linear with a constant 1/D row; its
  affine folded into the Linear it feeds (qkv, fc1, the head), so no LayerNorm weights remain;
- qkv split into three Linears (no slices of the dynamic-batch output), the softmax scale folded
  into q's weights;
- the 2-channel attention without scores or softmax: for two keys softmax is a sigmoid of the
  score difference, and with m the mean of the two channels out_i = m_v + tanh(q_i . (k_i -
  m_k)) * (v_i - m_v); the per-head dot product a Linear with a constant ones row [1, head_dim],
  the channel mean a Linear with a constant [1/2, 1/2] row over the channel axis;
- the 19-patch attention as batched matmuls with softmax over the last axis;
- the mean pooling a Linear with a constant 1/(C*P) row over the token axis.

Every reshape names its sizes except one inferred (-1) batch axis, which XNNPACK takes. The
constant-row Linears and the attention arithmetic are kept out of int8 quantization
(`FP32_MODULES`), so they compute in fp32 as the original ops do; the rewritten model matches the
original to float32 rounding (tests/quantize/test_xnnpack_graph.py).

Static int8 lowers `biases_apart` of that form: each int8 Linear without its bias, the bias an
add after it (`BiasAdd`), quantized as an int8 add of an int8 constant (one per-tensor scale),
delegated in the same partition. A static XNNPACK Linear stores its bias as int32 with
per-channel scales of its own (input scale x weight scale): 55 KB of the small model's scales
beyond the weights', and 4 bytes a channel. As an int8 add the bias costs 1 byte a channel and
no per-channel scales: the small model's static .pte is 3.85x smaller than the fp32 one instead
of 3.74x (an fp32 add after the Linear, dequantize-add-quantize, saved 14 KB less and ran
slower at batch 64). The extra add costs static int8 ~8 % at batch 64.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bpfm.training.predict import WINDOW_SHAPE


def _constant(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module.register_buffer(name, value, persistent=False)


class PlainNorm(nn.Module):
    """LayerNorm without its affine (folded into the next Linear): (x - mean) * rsqrt(var + eps)
    over the last axis, the means a Linear with a constant 1/D row (XNNPACK has no LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        _constant(self, "mean_row", torch.full((1, dim), 1.0 / dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.linear(x, self.mean_row)
        var = F.linear(centred * centred, self.mean_row)
        return centred * torch.rsqrt(var + self.eps)


class LinearPatch(nn.Module):
    """The patch Conv2d as one Linear(patch, D) per patch of each channel: [B, C, T] -> [B, C,
    P, D], samples past the last full patch dropped (as the conv's stride drops them)."""

    def __init__(self, conv: nn.Conv2d, channels: int, patches: int):
        super().__init__()
        dim, _, _, size = conv.weight.shape
        self.shape = (channels, patches, size)
        self.proj = nn.Linear(size, dim)
        with torch.no_grad():
            self.proj.weight.copy_(conv.weight.reshape(dim, size))
            self.proj.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, patches, size = self.shape
        return self.proj(_flat(x[:, :, : patches * size], channels, patches, size))


class LeadingMean(nn.Module):
    """The mean over the first axis after the batch, of `count` entries each `shape`: a Linear
    with a constant 1/count row over that axis moved last ([B, C, P, D] -> [B, 1, P, D] for
    the channel mean, [B, C*P, D] -> [B, D] for the token mean)."""

    def __init__(self, count: int, shape: tuple[int, ...], keep_axis: bool):
        super().__init__()
        self.count, self.shape = count, shape
        self.out_shape = (1, *shape) if keep_axis else shape
        _constant(self, "mean_row", torch.full((1, count), 1.0 / count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.count, math.prod(self.shape)).permute(0, 2, 1)
        return F.linear(rows, self.mean_row).reshape(-1, *self.out_shape)


class PairMix(nn.Module):
    """Softmax attention over 2 channels from q (pre-scaled), k, v [B, 2, P, D]. With two keys the
    weights are sigmoid(s_i0 - s_i1) and 1 - that; around the channel means m_k, m_v this is
    out_i = m_v + tanh(q_i . (k_i - m_k)) * (v_i - m_v), per head."""

    def __init__(self, patches: int, dim: int, heads: int):
        super().__init__()
        self.shape = (patches, heads, dim // heads)
        self.channel_mean = LeadingMean(2, (patches, dim), keep_axis=True)
        # sums each head's head_dim features: 16 floats, not a [H, D] block-diagonal matrix
        _constant(self, "head_row", torch.ones(1, dim // heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        patches, heads, width = self.shape
        mean_v = self.channel_mean(v)
        prod = (q * (k - self.channel_mean(k))).view(-1, 2, patches, heads, width)
        weights = torch.tanh(F.linear(prod, self.head_row))  # [B, 2, P, H, 1]
        heads_out = weights * (v - mean_v).reshape(-1, 2, patches, heads, width)
        return mean_v + heads_out.reshape(-1, 2, patches, heads * width)


def _flat(x: torch.Tensor, *sizes: int) -> torch.Tensor:
    """`x.reshape(-1, *sizes)` that keeps the -1: a reshape of a permuted or sliced tensor
    would be exported with the dynamic batch's symbolic size, which XNNPACK does not take."""
    return x.contiguous().view(-1, *sizes)


class SequenceMix(nn.Module):
    """Softmax attention over the P patches of each channel from q (pre-scaled), k, v [B, C, P,
    D]: batched matmuls per (sample, channel, head), softmax over the last axis."""

    def __init__(self, channels: int, patches: int, dim: int, heads: int):
        super().__init__()
        self.shape = (channels, patches, heads, dim // heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        channels, patches, heads, width = self.shape
        split = (-1, channels, patches, heads, width)
        qh = _flat(q.reshape(split).permute(0, 1, 3, 2, 4), patches, width)
        kh = _flat(k.reshape(split).permute(0, 1, 3, 4, 2), width, patches)
        vh = _flat(v.reshape(split).permute(0, 1, 3, 2, 4), patches, width)
        out = torch.bmm(torch.bmm(qh, kh).softmax(-1), vh)
        out = out.reshape(-1, channels, heads, patches, width).permute(0, 1, 3, 2, 4)
        return _flat(out, channels, patches, heads * width)


class SplitAttention(nn.Module):
    """`Attention` with its qkv Linear split into q, k and v (q pre-scaled by head_dim^-0.5)."""

    def __init__(self, attn: nn.Module, mix: nn.Module):
        super().__init__()
        dim = attn.proj.in_features
        scale = (dim // attn.heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        with torch.no_grad():
            for i, (part, factor) in enumerate(((self.q, scale), (self.k, 1.0), (self.v, 1.0))):
                part.weight.copy_(attn.qkv.weight[i * dim : (i + 1) * dim] * factor)
                part.bias.copy_(attn.qkv.bias[i * dim : (i + 1) * dim] * factor)
        self.mix = mix
        self.proj = copy.deepcopy(attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(self.q(x), self.k(x), self.v(x)))


class XnnpackBlock(nn.Module):
    def __init__(self, block: nn.Module, attn: nn.Module):
        super().__init__()
        self.norm1 = PlainNorm(block.norm1.normalized_shape[0], block.norm1.eps)
        self.attn = attn
        self.norm2 = PlainNorm(block.norm2.normalized_shape[0], block.norm2.eps)
        self.mlp = block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class XnnpackBPModel(nn.Module):
    """The BP model on [B, C, T] windows of one shape, out of XNNPACK-delegated ops."""

    def __init__(self, patch: LinearPatch, encoder: nn.Module, blocks: list[nn.Module],
                 norm: nn.Module, pool: nn.Module, head: nn.Module):
        super().__init__()
        self.patch = patch
        # the tables' rows, not their [1, C, P, D] sum: 8 KB instead of 29 in the file
        channels, patches, _ = patch.shape
        self.channel_encoding = nn.Parameter(encoder.channel_encoding[:, :channels].clone())
        self.patch_encoding = nn.Parameter(encoder.patch_encoding[:, :patches].clone())
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.pool = pool
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, patches, _ = self.patch.shape
        half = self.channel_encoding.shape[-1]
        tokens = self.patch(x) + torch.cat(
            [self.channel_encoding.unsqueeze(2).expand(1, channels, patches, half),
             self.patch_encoding.unsqueeze(1).expand(1, channels, patches, half)], dim=-1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.pool(self.norm(tokens)))


class BiasAdd(nn.Module):
    """A Linear's bias added after it; statically quantized an int8 add whose bias is an int8
    constant with one per-tensor scale (1 byte a channel instead of the int32 bias's 4 and its
    per-channel scales)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class BiasAfter(nn.Module):
    """A Linear without bias, then its bias as an add: statically quantized, the Linear carries
    no int32 bias and no per-channel bias scales (input scale x weight scale)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)
        self.bias = BiasAdd(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias(self.linear(x))


# modules whose ops stay fp32 in every int8 mode: normalisation, attention arithmetic, means
FP32_MODULES = (PlainNorm, PairMix, SequenceMix, LeadingMean)


def biases_apart(model: nn.Module) -> nn.Module:
    """A copy of `model` (a `for_xnnpack` form) whose int8 Linears add their bias after them
    (`BiasAfter`); the constant-row Linears of `FP32_MODULES` have none."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        if isinstance(parent, FP32_MODULES):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is not None:
                setattr(parent, name, BiasAfter(child))
    return model


@torch.no_grad()
def _fold_norm(norm: nn.LayerNorm, linear: nn.Linear) -> None:
    """linear(n * g + b) = (W * g) n + (W b + c): the norm's affine moved into the Linear."""
    linear.bias.add_(linear.weight @ norm.bias)
    linear.weight.mul_(norm.weight)


def _first_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear a head applies first to the pooled features (`fc`, or an mlp's first)."""
    hidden = getattr(head, "hidden", None)
    first = hidden[0] if isinstance(hidden, nn.Sequential) and len(hidden) else \
        getattr(head, "fc", None)
    return first if isinstance(first, nn.Linear) else None


def for_xnnpack(model: nn.Module) -> nn.Module:
    """The XNNPACK form of a BP model (`bpfm.model.BPModel` with a CEReBrO encoder) on bpfm
    windows, or `model` itself when it is not one: a new module, `model` is left as it is."""
    from bpfm.model.bp_model import BPModel
    from bpfm.model.cerebro import CerebroEncoder

    encoder = getattr(model, "encoder", None)
    if not isinstance(model, BPModel) or not isinstance(encoder, CerebroEncoder):
        return model
    head = copy.deepcopy(model.head)
    channels = WINDOW_SHAPE[0]
    if _first_linear(head) is None or channels != 2:  # PairMix is the two-key softmax
        return model
    patches = WINDOW_SHAPE[1] // encoder.config.patch_size
    dim, heads = encoder.config.dim, encoder.config.heads
    blocks = [_block(block, channels, patches, dim, heads) for block in encoder.blocks]
    _fold_norm(encoder.norm, _first_linear(head))  # the mean of n*g+b is mean(n)*g+b
    return XnnpackBPModel(LinearPatch(encoder.patch_embed.patch_embed.proj, channels, patches),
                          encoder, blocks, PlainNorm(dim, encoder.norm.eps),
                          LeadingMean(channels * patches, (dim,), keep_axis=False), head).eval()


def _block(block: nn.Module, channels: int, patches: int, dim: int, heads: int) -> nn.Module:
    block = copy.deepcopy(block)
    mix = PairMix(patches, dim, heads) if block.attn.over_channels else \
        SequenceMix(channels, patches, dim, heads)
    attn = SplitAttention(block.attn, mix)
    _fold_norm(block.norm1, attn.q)
    _fold_norm(block.norm1, attn.k)
    _fold_norm(block.norm1, attn.v)
    _fold_norm(block.norm2, block.mlp.fc1)
    return XnnpackBlock(block, attn)
