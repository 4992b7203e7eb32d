"""The hand-written 2-token attention equals autograd's through the reference `attention_core`,
and `attend` takes it exactly where it should."""

from __future__ import annotations

import pytest
import torch

from bpfm.model import attention
from bpfm.model.attention import PairAttention, attend, attention_core

HEADS = 2

# (channels, patches, over_channels): 2 tokens on either axis
CASES = [(2, 5, True), (3, 2, False), (2, 2, True)]


def qkv_tensor(channels: int, patches: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(channels * 10 + patches)
    qkv = torch.randn(3, channels, patches, 3 * HEADS * 4, generator=generator, dtype=dtype)
    return qkv.requires_grad_()


@pytest.mark.parametrize(("channels", "patches", "over_channels"), CASES)
def test_outputs_and_gradients_equal_attention_core(channels, patches, over_channels):
    qkv = qkv_tensor(channels, patches)
    grad_out = torch.randn(3, channels, patches, HEADS * 4, dtype=torch.float64)
    expected = attention_core(qkv, HEADS, over_channels)
    (expected_grad,) = torch.autograd.grad(expected, qkv, grad_out)
    out = PairAttention.apply(qkv, HEADS, 1 if over_channels else 2)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("channels", "patches", "over_channels"), CASES)
def test_gradients_pass_gradcheck(channels, patches, over_channels):
    qkv = qkv_tensor(channels, patches)
    axis = 1 if over_channels else 2
    assert torch.autograd.gradcheck(lambda t: PairAttention.apply(t, HEADS, axis), (qkv,))


@pytest.mark.parametrize(
    ("channels", "patches", "over_channels", "pair"),
    [
        (2, 19, True, True),
        (2, 19, False, False),  # 19 tokens: attention_core's einsums
        (6, 3, False, False),  # 3 tokens: attention_core's broadcast products
    ],
)
def test_attend_takes_the_pair_function_for_2_tokens(channels, patches, over_channels, pair):
    qkv = qkv_tensor(channels, patches, torch.float32)
    backward = type(attend(qkv, HEADS, over_channels).grad_fn).__name__
    assert (backward == "PairAttentionBackward") == pair


def test_attend_keeps_autograd_where_no_gradient_or_autocast():
    qkv = qkv_tensor(2, 19, torch.float32)
    with torch.no_grad():
        assert attend(qkv, HEADS, True).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not attention._hand_backward(qkv)
    assert attention._hand_backward(qkv)
    assert not attention._hand_backward(qkv.detach())
