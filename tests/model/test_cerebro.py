"""Architecture: exact sizes, freeze counts, shapes, attention equivalence, tracing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfm.errors import BpfmError
from bpfm.model import apply_freeze, cerebro, count_parameters, create_model
from bpfm.model.cerebro import CerebroConfig, CerebroEncoder

PAPER = {
    "small": (3_588_290, 12_866),
    "medium": (39_976_130, 38_594),
    "large": (85_171_970, 51_458),
}


@pytest.mark.parametrize("size", sorted(PAPER))
def test_parameter_counts_match_the_paper_configs(size):
    model = create_model(size, device="meta")
    assert count_parameters(model) == (PAPER[size][0], PAPER[size][0])
    apply_freeze(model, "frozen")
    assert count_parameters(model) == PAPER[size]
    apply_freeze(model, "unfrozen")
    assert count_parameters(model)[1] == PAPER[size][0]


def test_base_is_an_alias_of_medium():
    assert count_parameters(create_model("base", device="meta"))[0] == PAPER["medium"][0]
    assert create_model("base", device="meta").spec["size"] == "medium"


def test_frozen_trains_only_patch_embed_and_head(small_model):
    apply_freeze(small_model, "frozen")
    trainable = {n for n, p in small_model.named_parameters() if p.requires_grad}
    assert trainable == {
        "encoder.patch_embed.patch_embed.proj.weight",
        "encoder.patch_embed.patch_embed.proj.bias",
        "head.fc.weight",
        "head.fc.bias",
    }


def test_forward_shape_for_ecg_ppg_windows(small_model):
    with torch.no_grad():
        assert small_model(torch.randn(3, 2, 1250)).shape == (3, 2)
        assert small_model.encoder(torch.randn(3, 2, 1250)).shape == (3, 38, 192)


@pytest.fixture
def tiny_encoder():
    return CerebroEncoder(CerebroConfig(dim=24, depth=2, heads=2)).eval()


@pytest.mark.parametrize(
    ("channels", "samples", "tokens"), [(1, 64, 1), (5, 700, 50), (19, 1280, 380), (64, 6400, 6400)]
)
def test_other_channel_counts_and_lengths(tiny_encoder, channels, samples, tokens):
    with torch.no_grad():
        out = tiny_encoder(torch.randn(1, channels, samples))
    assert out.shape == (1, tokens, 24)


def test_last_partial_patch_is_ignored(small_model):
    x = torch.randn(2, 2, 1250)
    y = x.clone()
    y[..., 1216:] = 1e3  # the last 34 samples are dropped
    with torch.no_grad():
        assert torch.equal(small_model(x), small_model(y))


@pytest.mark.parametrize("shape", [(2, 1250), (1, 65, 1250), (1, 2, 63), (1, 2, 6464)])
def test_wrong_input_shapes_give_one_line_errors(small_model, shape):
    with pytest.raises(BpfmError, match="input:") as err:
        small_model(torch.randn(*shape))
    assert "\n" not in str(err.value)


def test_a_window_with_nan_is_refused_before_the_model():
    from bpfm.training.predict import check_batch

    x = torch.randn(1, 2, 1250)
    x[0, 1, 5] = float("nan")
    with pytest.raises(BpfmError, match="NaN"):
        check_batch(x)


def explicit_attention(attn, x):
    """The official code's way: rearrange tokens into sequences, softmax(q k^T / sqrt(d)) v."""
    b, c, p, d = x.shape
    seq = x.transpose(1, 2).reshape(b * p, c, d) if attn.over_channels else x.reshape(b * c, p, d)
    s, n, _ = seq.shape
    qkv = F.linear(seq, attn.qkv.weight, attn.qkv.bias).reshape(s, n, 3, attn.heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = F.linear((weights @ v).transpose(1, 2).reshape(s, n, d), attn.proj.weight, attn.proj.bias)
    if attn.over_channels:
        return out.view(b, p, c, d).transpose(1, 2)
    return out.view(b, c, p, d)


@pytest.fixture(params=["core", "sdpa"])
def attention_path(request, monkeypatch):
    """Both branches of `Attention`: `attention_core` (short sequences) and SDPA (long ones,
    tracing)."""
    if request.param == "sdpa":
        monkeypatch.setattr(cerebro, "_use_sdpa", lambda x, axis: True)
    return request.param


# (channels, patches): inter-channel attention over 2 (broadcast) and 6 (einsum) tokens,
# intra-channel over 19 (einsum), 3 (broadcast) and 40 (SDPA: a long sequence)
SHAPES = [(2, 19), (6, 3), (2, 40)]


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize(("channels", "patches"), SHAPES)
def test_attention_equals_explicit_softmax(small_model, attention_path, block, channels, patches):
    attn = small_model.encoder.blocks[block].attn
    assert attn.over_channels == (block == 0)
    x = torch.randn(2, channels, patches, 192, dtype=torch.float64)
    attn = attn.double()
    with torch.no_grad():
        torch.testing.assert_close(attn(x), explicit_attention(attn, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("channels", "patches"), SHAPES)
def test_attention_core_gradients_equal_sdpa(small_model, monkeypatch, channels, patches):
    model = small_model.double().train()
    x = torch.randn(2, channels, patches * 64, dtype=torch.float64)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)  # the same drop-path draws on both branches
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "attn" in n}

    core = grads()
    monkeypatch.setattr(cerebro, "_use_sdpa", lambda x, axis: True)
    torch.testing.assert_close(core, grads(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_short_sequences_skip_sdpa_on_every_device(device):
    """cuDNN's SDPA for the 2-token inter-channel attention took 41 % of a large bf16 training
    step on an H100; the path choice depends on the sequence length, not on the device."""
    tokens = torch.empty(2, 2, 40, 8, device=device)  # [B, C, P, D]
    assert not cerebro._use_sdpa(tokens, axis=1)  # 2 channels
    assert cerebro._use_sdpa(tokens, axis=2)  # 40 patches
    assert not cerebro._use_sdpa(tokens[:, :, :19], axis=2)


def test_tokens_stay_contiguous_through_the_blocks(small_model):
    """A D-strided token layout makes every LayerNorm and Linear copy its input first."""
    seen = []
    for block in small_model.encoder.blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        small_model(torch.randn(2, 2, 1250))
    assert seen == [True] * len(small_model.encoder.blocks)


def test_inter_channel_block_mixes_channels_intra_block_does_not(small_model):
    x = torch.randn(1, 2, 19, 192)
    y = x.clone()
    y[0, 1, 3] += 1.0  # change one token of channel 1 at patch 3
    with torch.no_grad():
        inter = small_model.encoder.blocks[0].attn
        intra = small_model.encoder.blocks[1].attn
        changed_inter = (inter(x) - inter(y)).abs().sum(-1)[0] > 1e-6
        changed_intra = (intra(x) - intra(y)).abs().sum(-1)[0] > 1e-6
    assert changed_inter[:, 3].all() and not changed_inter[:, :3].any()
    assert changed_intra[1].all() and not changed_intra[0].any()


def test_drop_path_is_active_in_training_only(tiny_encoder):
    x = torch.randn(8, 2, 1250)
    with torch.no_grad():
        assert torch.equal(tiny_encoder(x), tiny_encoder(x))
        tiny_encoder.train()
        assert not torch.equal(tiny_encoder(x), tiny_encoder(x))


def mask_product_drop_path(x, branch, p=0.5):
    """The paper code's stochastic depth: the branch on every sample, times a per-sample mask."""
    keep = x.new_empty(x.shape[0]).bernoulli_(1 - p).div_(1 - p)
    return x + branch(x) * keep.view(-1, 1, 1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drop_path_on_kept_rows_equals_the_mask_product(small_model, seed, monkeypatch):
    """On CPU the branch runs on the kept samples only; outputs and every gradient match the
    mask product of the same draw."""
    block = small_model.encoder.blocks[1].train()
    block.drop_path.p = 0.5
    x = torch.randn(16, 2, 19, 192)

    def branch(t):
        return block.mlp(block.norm2(t))

    def run(drop_path):
        block.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(seed)
        out = drop_path(leaf, branch)
        out.square().sum().backward()
        return out.detach(), [leaf.grad, *(p.grad for p in block.mlp.parameters())]

    out, grads = run(block.drop_path)
    expected, expected_grads = run(mask_product_drop_path)
    with monkeypatch.context() as patch:  # the model's own mask path (CUDA, torch.compile)
        patch.setattr(cerebro, "_picks_rows", lambda x: False)
        masked, masked_grads = run(block.drop_path)
    torch.testing.assert_close(masked, expected, rtol=0, atol=0)
    assert 0 < (out != x).any(dim=(1, 2, 3)).sum() < len(x)  # some rows dropped, some kept
    torch.testing.assert_close(out, expected)
    for grad, expected_grad, masked_grad in zip(grads, expected_grads, masked_grads, strict=True):
        # weight gradients sum over fewer rows here: fp32 rounding, not a different result
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(masked_grad, expected_grad, rtol=0, atol=0)


def test_drop_path_with_every_row_dropped_skips_the_branch():
    drop_path = cerebro.DropPath(1.0 - 1e-12).train()
    x = torch.randn(4, 2, 3, 8)

    def branch(t):
        raise AssertionError("branch ran although every row was dropped")

    assert torch.equal(drop_path(x, branch), x)


def test_fx_symbolic_trace_matches_eager(small_model):
    x = torch.randn(2, 2, 1250)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(small_model)(x), small_model(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": "huge"}, "size: unknown model size 'huge' (valid: small, medium, large, base)"),
        ({"size": "small", "head": "cnn"}, "head: unknown head 'cnn' (valid: paper, linear, mlp)"),
        ({"size": "small", "head": "mlp"}, "head_hidden:"),
    ],
)
def test_unknown_names_list_valid_ones(kwargs, message):
    with pytest.raises(BpfmError) as err:
        create_model(**kwargs, device="meta")
    assert str(err.value).startswith(message)


def test_unknown_freeze_policy(small_model):
    with pytest.raises(BpfmError, match=r"valid: frozen, unfrozen"):
        apply_freeze(small_model, "partial")
