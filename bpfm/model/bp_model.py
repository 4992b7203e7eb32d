"""The BP model: CEReBrO's encoder, a blood-pressure head on the pooled features, the paper's
xavier init and freeze policies; `create_model(size, head=...)` builds one.

Heads sit on the pooled encoder features. Every head ends in a Linear named `fc`
(the official `model_head.mlp.0.fc.*` maps onto the paper head's `fc`) and has
`set_output_bias(values)` so training can start from the target mean.

The paper head applies GELU after its Linear, so its output cannot go below about -0.17. That is
harmless for raw mmHg targets (~120/70, where GELU is the identity) but would clip every
below-mean value of standardised targets. The paper head therefore carries a fixed (not trained)
`offset` buffer subtracted after the GELU: `set_output_bias` puts the Linear's bias at least
`GELU_MARGIN` into GELU's linear range and stores the difference in `offset`. With the default
offset 0 it is exactly the paper's head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.model.cerebro import SIZE_ALIASES, CerebroEncoder, size_config

HEADS = ("paper", "linear", "mlp")
FREEZE_POLICIES = ("frozen", "unfrozen")
GELU_MARGIN = 4.0  # GELU(z) ~= z for z > ~3; 4 leaves room for targets 4 std below the mean


def _as_values(values: Sequence[float] | torch.Tensor, outputs: int) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if values.numel() != outputs:
        raise BpfmError(f"head: output bias needs {outputs} values, got {values.numel()}")
    return values


class PaperHead(nn.Module):
    """Linear(D, outputs) then GELU, as the paper's `MlpClassificationHead(hidden_layers=None)`."""

    def __init__(self, dim: int, outputs: int = 2, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, outputs)
        self.act = nn.GELU()
        self.register_buffer("offset", torch.zeros(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.drop(x))) - self.offset

    @torch.no_grad()
    def set_output_bias(self, values: Sequence[float] | torch.Tensor) -> None:
        values = _as_values(values, self.fc.out_features).to(self.offset)
        self.offset.copy_((GELU_MARGIN - values).clamp(min=0.0))
        self.fc.bias.copy_(values + self.offset)


class LinearHead(nn.Module):
    def __init__(self, dim: int, outputs: int = 2, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))

    @torch.no_grad()
    def set_output_bias(self, values: Sequence[float] | torch.Tensor) -> None:
        self.fc.bias.copy_(_as_values(values, self.fc.out_features))


class MlpHead(LinearHead):
    """(Linear, GELU, Dropout) per hidden size, then the output Linear `fc`."""

    def __init__(self, dim: int, outputs: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__(hidden[-1], outputs, dropout)
        layers: list[nn.Module] = []
        for width_in, width_out in zip((dim, *hidden[:-1]), hidden, strict=True):
            layers += [nn.Linear(width_in, width_out), nn.GELU(), nn.Dropout(dropout)]
        self.hidden = nn.Sequential(*layers)
        self.drop = nn.Identity()  # the last hidden layer already ends in dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x))


def make_head(
    kind: str, dim: int, outputs: int = 2, hidden: Sequence[int] = (), dropout: float = 0.0
) -> nn.Module:
    """A head by name: `paper`, `linear` or `mlp` (needs `hidden` sizes)."""
    if not 0.0 <= dropout < 1.0:
        raise BpfmError(f"head_dropout: {dropout} is not in [0, 1)")
    if kind == "paper":
        return PaperHead(dim, outputs, dropout)
    if kind == "linear":
        return LinearHead(dim, outputs, dropout)
    if kind == "mlp":
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise BpfmError(f"head_hidden: the mlp head needs positive hidden sizes, got {hidden}")
        return MlpHead(dim, outputs, hidden, dropout)
    raise BpfmError(f"head: unknown head {kind!r} (valid: {', '.join(HEADS)})")


class BPModel(nn.Module):
    """Encoder + mean pooling over all tokens + head; outputs [B, 2] ordered [SBP, DBP].

    `spec` holds the `create_model` arguments, so a saved model can be rebuilt from its meta."""

    outputs = ("sbp", "dbp")

    def __init__(self, encoder: nn.Module, head: nn.Module, spec: dict):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.spec = dict(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))

    def set_output_bias(self, values: Sequence[float] | torch.Tensor) -> None:
        """Start the outputs at `values` (e.g. the training targets' mean, in the loss's units)."""
        self.head.set_output_bias(values)


def create_model(
    size: str,
    *,
    head: str = "paper",
    head_hidden: Sequence[int] = (),
    head_dropout: float = 0.0,
    in_channels: int = 2,
    drop_path: float = 0.2,
    device: str | torch.device | None = None,
) -> BPModel:
    """A CEReBrO BP model with the paper's xavier init. `device="meta"` builds it without memory
    (for parameter counts); `in_channels` is recorded for checks, the encoder takes any count."""
    config = size_config(size, drop_path=drop_path)
    if not 1 <= in_channels <= config.max_channels:
        raise BpfmError(f"in_channels: {in_channels} not in 1..{config.max_channels}")
    spec = {
        "size": SIZE_ALIASES.get(size, size),
        "head": head,
        "head_hidden": [int(h) for h in head_hidden],
        "head_dropout": float(head_dropout),
        "in_channels": int(in_channels),
        "drop_path": float(drop_path),
    }
    with torch.device(device or "cpu"):
        model = BPModel(
            CerebroEncoder(config),
            make_head(head, config.dim, 2, head_hidden, head_dropout),
            spec,
        )
        init_xavier(model)
    return model


def _trunc_normal_tight(tensor: torch.Tensor, std: float = 0.02) -> None:
    # The paper's wrapper passes a=-std, b=std: truncation at one standard deviation.
    nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)


@torch.no_grad()
def init_xavier(model: nn.Module) -> nn.Module:
    """The paper code's init: xavier-uniform Linears (bias 0), LayerNorm 1/0, xavier patch conv
    (bias left at PyTorch's default), tokens and encodings trunc-normal(0.02, +-1 std),
    attn.proj and mlp.fc2 weights divided by sqrt(2 * layer_id), head Linear trunc-normal(0.02)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, CerebroEncoder):
            conv = module.patch_embed.patch_embed.proj.weight
            nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
            for tensor in (
                module.mask_token,
                module.pad_token,
                module.channel_encoding,
                module.patch_encoding,
            ):
                _trunc_normal_tight(tensor)
            for layer_id, block in enumerate(module.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        elif isinstance(module, PaperHead | LinearHead):
            nn.init.trunc_normal_(module.fc.weight, std=0.02)
            nn.init.zeros_(module.fc.bias)
    return model


def apply_freeze(model: nn.Module, policy: str) -> nn.Module:
    """`frozen`: only the patch embedding and the head train (the paper's
    `freeze_attention_blocks`); `unfrozen`: everything trains."""
    if policy not in FREEZE_POLICIES:
        raise BpfmError(f"freeze: unknown policy {policy!r} (valid: {', '.join(FREEZE_POLICIES)})")
    frozen = policy == "frozen"
    for name, parameter in model.named_parameters():
        trainable = name.startswith(("encoder.patch_embed.", "head."))
        parameter.requires_grad_(trainable or not frozen)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
