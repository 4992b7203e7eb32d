"""softmax(q k^T / sqrt(e)) v for the short sequences of ECG + PPG windows: the 2-channel
inter-channel attention and the 19-patch intra-channel one. `Attention` in `cerebro.py` sends
long sequences to `F.scaled_dot_product_attention` and short ones to `attention_core`.

Input is a qkv Linear's output [B, C, P, 3D] and output the proj Linear's input [B, C, P, D];
attention runs across channels (`over_channels`) or across the patches of each channel. Plain
autograd ops on strided views of qkv, no sequence-major copy of the tokens: it runs on every
device and traces under torch.compile. A hand-written backward of the 2-token case gained about
3 % of a small training step on CPU (median of paired rounds, 0.97-1.09 over five runs on a
loaded 2-core VM), under the 5 % that would pay for a second implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

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
