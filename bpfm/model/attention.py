"""softmax(q k^T / sqrt(e)) v for the short sequences of ECG + PPG windows: the 2-channel
inter-channel attention and the 19-patch intra-channel one. `Attention` in `cerebro.py` sends
long sequences to `F.scaled_dot_product_attention` and short ones here, through `attend`.

Input is a qkv Linear's output [B, C, P, 3D] and output the proj Linear's input [B, C, P, D];
attention runs across channels (`over_channels`) or across the patches of each channel.

- `attention_core` is the reference: plain autograd ops on strided views of qkv, no
  sequence-major copy of the tokens. It runs on every device and traces under torch.compile.
- `PairAttention` is the 2-token case (2 channels: every inter-channel block of an ECG + PPG
  model) with a hand-written backward that writes the gradient of qkv in one buffer. At this
  size the work is memory passes and per-op overhead, not arithmetic, and autograd's backward
  of the broadcast products spends it on reductions over broadcast dimensions and on restacking
  q, k and v. On 2 CPU threads its forward plus backward takes 55-60 % of `attention_core`'s
  (2.4 against 4.1-4.3 ms for a small block at batch 26); a whole training step of small gains
  0-2.5 %, within this VM's noise (benchmarks/train_throughput.py, variant `autograd`).
  `attend` uses it on eager CPU only: accelerators were measured with `attention_core`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

# Sequences up to this length attend by broadcast products instead of batched matmuls: the
# inter-channel blocks of a 2-channel model attend over 2 tokens, where a [2, 2] matmul per
# (sample, patch, head) costs far more in call overhead than its arithmetic.
SHORT_SEQUENCE = 4


def _heads_view(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, C, P, 3D] -> [B, C, P, 3, H, E] (a view)."""
    b, c, p, width = qkv.shape
    return qkv.view(b, c, p, 3, heads, width // (3 * heads))


def attention_core(qkv: torch.Tensor, heads: int, over_channels: bool) -> torch.Tensor:
    """The reference short-sequence attention, [B, C, P, 3D] -> [B, C, P, D].

    q, k and v stay strided views of `qkv` ([B, C, P, H, E]); no sequence-major copy of the
    tokens is made, and short sequences avoid per-sequence matmul calls altogether."""
    b, c, p, width = qkv.shape
    d = width // 3
    q, k, v = _heads_view(qkv, heads).unbind(3)
    scale = q.shape[-1] ** -0.5
    axis = 1 if over_channels else 2
    if q.shape[axis] <= SHORT_SEQUENCE:
        # scores [.., i, j, ..]: query position i on `axis`, key position j next to it; scaled
        # after the sum, where they are a head_dim-th the size of q
        scores = (q.unsqueeze(axis + 1) * k.unsqueeze(axis)).sum(-1)
        weights = (scores * scale).softmax(axis + 1)
        out = (weights.unsqueeze(-1) * v.unsqueeze(axis)).sum(axis + 1)
        return out.reshape(b, c, p, d)
    q = q * scale
    if over_channels:
        weights = torch.einsum("bcphe,bkphe->bphck", q, k).softmax(-1)
        out = torch.einsum("bphck,bkphe->bcphe", weights, v)
    else:
        weights = torch.einsum("bcphe,bckhe->bchpk", q, k).softmax(-1)
        out = torch.einsum("bchpk,bckhe->bcphe", weights, v)
    return out.reshape(b, c, p, d)


class PairAttention(torch.autograd.Function):
    """Attention over exactly 2 tokens on `axis` (1: channels, 2: patches). A softmax over two
    scores is the sigmoid of their difference, so query i weighs the first token by
    w_i = sigmoid(q_i . (k_0 - k_1) * scale) and gets v_1 + w_i (v_0 - v_1)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, qkv: torch.Tensor, heads: int, axis: int
    ) -> torch.Tensor:
        b, c, p, width = qkv.shape
        q, k, v = _heads_view(qkv, heads).unbind(3)
        scale = q.shape[-1] ** -0.5
        k0, k1 = k.unbind(axis)
        v0, v1 = v.unbind(axis)
        key_diff = (k0 - k1).unsqueeze(axis)
        value_diff = (v0 - v1).unsqueeze(axis)
        weight = (q * key_diff).sum(-1, keepdim=True).mul_(scale).sigmoid_()
        out = torch.addcmul(v1.unsqueeze(axis), weight, value_diff)
        ctx.save_for_backward(qkv, key_diff, value_diff, weight)
        ctx.heads, ctx.axis, ctx.scale = heads, axis, scale
        return out.reshape(b, c, p, width // 3)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qkv, key_diff, value_diff, weight = ctx.saved_tensors
        axis = ctx.axis
        split = _heads_view(qkv, ctx.heads)
        q = split[:, :, :, 0]
        grad_out = grad_out.view(q.shape)
        grad = torch.empty_like(split)
        grad_q, grad_k, grad_v = grad.unbind(3)
        # d loss / d score_i, through the sigmoid and the scale
        grad_score = (grad_out * value_diff).sum(-1, keepdim=True)
        grad_score.mul_(weight * (1 - weight) * ctx.scale)
        torch.mul(grad_score, key_diff, out=grad_q)
        grad_k0 = torch.sum(grad_score * q, axis, out=grad_k.select(axis, 0))
        torch.neg(grad_k0, out=grad_k.select(axis, 1))  # k_1 gets its negative
        grad_v0 = torch.sum(weight * grad_out, axis, out=grad_v.select(axis, 0))
        # v_1 gets the rest of each query's gradient
        torch.sub(grad_out.sum(axis), grad_v0, out=grad_v.select(axis, 1))
        return grad.view(qkv.shape), None, None


def _hand_backward(qkv: torch.Tensor) -> bool:
    """Whether `attend` takes `PairAttention`: eager CPU tensors that need a gradient, outside
    CPU autocast (whose casts would not reach the backward)."""
    return (
        qkv.requires_grad
        and qkv.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
    )


def attend(qkv: torch.Tensor, heads: int, over_channels: bool) -> torch.Tensor:
    """Short-sequence attention, [B, C, P, 3D] -> [B, C, P, D]; see the module docstring."""
    axis = 1 if over_channels else 2
    if qkv.shape[axis] == 2 and _hand_backward(qkv):
        return PairAttention.apply(qkv, heads, axis)
    return attention_core(qkv, heads, over_channels)
