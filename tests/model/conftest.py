"""Fixtures for the model tests: a small model in eval mode and an official-layout checkpoint
built from the documented key names and shapes (research/cerebro.md section 5), not from bpfm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def official_state_dict(
    dim: int, depth: int, *, head: bool = True, decoder: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "model.mask_token": rnd(1, 1, dim),
        "model.pad_token": rnd(1, 1, dim),
        "model.channel_encoding": rnd(1, 64, dim // 2),
        "model.patch_encoding": rnd(1, 100, dim // 2),
        "model.patch_embed.patch_embed.proj.weight": rnd(dim, 1, 1, 64),
        "model.patch_embed.patch_embed.proj.bias": rnd(dim),
    }
    for i in range(depth):
        p = f"model.blocks.{i}."
        state.update(
            {
                p + "norm1.weight": 1 + rnd(dim),
                p + "norm1.bias": rnd(dim),
                p + "attn.qkv.weight": rnd(3 * dim, dim),
                p + "attn.qkv.bias": rnd(3 * dim),
                p + "attn.proj.weight": rnd(dim, dim),
                p + "attn.proj.bias": rnd(dim),
                p + "norm2.weight": 1 + rnd(dim),
                p + "norm2.bias": rnd(dim),
                p + "mlp.fc1.weight": rnd(4 * dim, dim),
                p + "mlp.fc1.bias": rnd(4 * dim),
                p + "mlp.fc2.weight": rnd(dim, 4 * dim),
                p + "mlp.fc2.bias": rnd(dim),
            }
        )
    state["model.norm.weight"] = 1 + rnd(dim)
    state["model.norm.bias"] = rnd(dim)
    if head:  # rows [DBP, SBP]; a large bias keeps the GELU in its linear range
        state["model_head.mlp.0.fc.weight"] = rnd(2, dim) * 10
        state["model_head.mlp.0.fc.bias"] = torch.tensor([70.0, 120.0])
    if decoder:
        state["model_head.decoder_pred.weight"] = rnd(64, dim)
        state["model_head.decoder_pred.bias"] = rnd(64)
    return state


def write_lightning_ckpt(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(
        {"state_dict": state, "epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.5.0"},
        path,
    )
    return path


@pytest.fixture
def official_small_ckpt(tmp_path: Path) -> Path:
    return write_lightning_ckpt(
        tmp_path / "cerebro_alternating_small.ckpt", official_state_dict(192, 8)
    )


@pytest.fixture
def small_model():
    from bpfm.model import create_model

    return create_model("small").eval()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin against other
    processes and run ~10x slower; restored afterwards for other areas' tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
