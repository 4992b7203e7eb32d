"""`for_xnnpack`: the ExecuTorch export's rewrite of the BP model into XNNPACK-delegated ops is
the same function as the model it came from, module by module and whole, and leaves the
training model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bpfm.export import for_window
from bpfm.export.xnnpack_graph import (
    FP32_MODULES,
    BiasAfter,
    LinearPatch,
    PairMix,
    PlainNorm,
    SequenceMix,
    SplitAttention,
    XnnpackBPModel,
    _fold_norm,
    biases_apart,
    for_xnnpack,
)
from bpfm.model import create_model
from bpfm.model.attention import attention_core
from bpfm.model.cerebro import ConvPatch


def _loud(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Every parameter moved off its init: LayerNorm affines and biases away from 1 and 0."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * std)
    return model


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("head,hidden", [("paper", ()), ("linear", ()), ("mlp", (32,))])
def test_rewritten_model_computes_the_same_outputs(head, hidden):
    torch.manual_seed(0)
    model = _loud(create_model("small", head=head, head_hidden=hidden)).eval()
    before = copy.deepcopy(model.state_dict())
    rewritten = for_xnnpack(for_window(model))
    assert isinstance(rewritten, XnnpackBPModel)
    x = torch.randn(4, 2, 1250)
    with torch.no_grad():
        reference, out = model(x), rewritten(x)
    assert reference.abs().max() > 0.05  # a model whose outputs are not all ~0
    assert _max_abs(out, reference) < 1e-5
    # no LayerNorm, conv or fused qkv is left for portable kernels
    kinds = {type(m) for m in rewritten.modules()}
    assert not kinds & {nn.LayerNorm, nn.Conv2d, ConvPatch}
    # the training model keeps its modules, weights and train/eval switch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    model.train()
    assert model.training and all(m.training for m in model.modules())


def test_norm_folded_into_the_next_linear():
    torch.manual_seed(1)
    norm, linear = _loud(nn.LayerNorm(192)), _loud(nn.Linear(192, 48))
    x = torch.randn(3, 2, 19, 192) * 3 + 1
    with torch.no_grad():
        reference = linear(norm(x))
        folded = copy.deepcopy(linear)
        _fold_norm(norm, folded)
        out = folded(PlainNorm(192, norm.eps)(x))
    assert _max_abs(out, reference) < 1e-5


def test_patch_linear_is_the_patch_conv():
    torch.manual_seed(2)
    conv = _loud(ConvPatch(192, 64))
    x = torch.randn(3, 2, 1250)
    with torch.no_grad():
        assert _max_abs(LinearPatch(conv.proj, 2, 19)(x), conv(x)) < 1e-5


@pytest.mark.parametrize("over_channels", [True, False])
def test_attention_without_scores_or_last_axis_softmax(over_channels):
    """PairMix (tanh of the centred 2-channel scores) and SequenceMix (batched matmuls) against
    the training model's `attention_core` on the same qkv."""
    from bpfm.model.cerebro import Attention

    torch.manual_seed(3)
    attn = _loud(Attention(192, 12, over_channels=over_channels))
    mix = PairMix(19, 192, 12) if over_channels else SequenceMix(2, 19, 192, 12)
    split = SplitAttention(attn, mix)
    x = torch.randn(5, 2, 19, 192)
    with torch.no_grad():
        reference = attn.proj(attention_core(attn.qkv(x), 12, over_channels))
        assert _max_abs(split(x), reference) < 1e-5


def test_biases_apart_adds_every_int8_linear_bias_after_it():
    """Static int8's form: the same outputs, no Linear outside `FP32_MODULES` keeps a bias, and
    the `for_xnnpack` model it came from keeps its own."""
    torch.manual_seed(5)
    rewritten = for_xnnpack(for_window(_loud(create_model("small")).eval()))
    apart = biases_apart(rewritten)
    x = torch.randn(4, 2, 1250)
    with torch.no_grad():
        assert _max_abs(apart(x), rewritten(x)) < 1e-5
    kept = {id(m) for f in apart.modules() if isinstance(f, FP32_MODULES) for m in f.modules()}
    linears = [m for m in apart.modules() if isinstance(m, nn.Linear) and id(m) not in kept]
    assert len(linears) == 8 * 6 + 2  # q, k, v, proj, fc1, fc2 per block; patch; head
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, BiasAfter) for m in apart.modules()) == len(linears)
    assert any(isinstance(m, nn.Linear) and m.bias is not None for m in rewritten.modules())


def test_other_models_pass_through_unchanged():
    model = nn.Sequential(nn.Linear(4, 2))
    assert for_xnnpack(model) is model


@pytest.mark.slow
def test_rewritten_export_is_one_xnnpack_partition(tmp_path):
    """fp32 .pte of the rewrite: one XNNPACK partition, only the input's slice and the
    positional tables' broadcast left to portable kernels, the torch model's outputs; dynamic
    int8 quantizes the patch Linear too (the Conv2d stayed fp32); static int8, its biases int8
    adds after the Linears, carries no more scales than dynamic."""
    pytest.importorskip("executorch", reason="the .[edge] extra (CI installs it)")
    from bpfm.export import ExportConfig, export_model, load_export
    from bpfm.export.executorch import size_breakdown

    torch.manual_seed(4)
    model = _loud(create_model("small"), std=0.02).eval()
    x = torch.randn(3, 2, 1250)
    sizes = {}
    # XNNPACK quantizes a dynamic Linear's input per row, the torch int8 graph per tensor
    tolerance = {"fp32": 1e-4, "dynamic": 2e-2, "static": 2e-2}
    calib = [torch.randn(16, 2, 1250) for _ in range(4)]
    for mode in ("fp32", "dynamic", "static"):
        path = tmp_path / f"{mode}.pte"
        exported = export_model(model, ExportConfig("executorch", mode), calib, path)
        assert exported["delegated"]["xnnpack_partitions"] == 1
        assert exported["delegated"]["portable_ops"] <= 10
        with torch.no_grad():
            reference = model(x) if mode == "fp32" else exported["reference"](x)
            assert _max_abs(load_export(path)(x), reference) < tolerance[mode]
        sizes[mode] = size_breakdown(path)
    # 8 blocks of int8 q, k, v, proj, fc1, fc2 and the int8 patch Linear: >= 3.8x smaller
    assert sizes["fp32"]["file"] / sizes["dynamic"]["file"] >= 3.8
    # no int32 biases with their own scales (input scale x weight scale): one set, as dynamic
    assert sizes["static"]["scales"] <= sizes["dynamic"]["scales"]
    assert sizes["fp32"]["file"] / sizes["static"]["file"] >= 3.8
