"""The pt2e backend (torchao export quantization): the small model uncompiled (its eager Q/DQ
graph gives the same numbers as the compiled one), and the compiled path once, on a toy model,
since a cold Inductor compile of the small model takes minutes on 2 busy cores."""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import torch
from torch import nn

from bpfm.quant.convert import load_quantized, quantize, runnable, save_quantized, size_bytes
from bpfm.quant.measure import MIB, state_dict_bytes
from bpfm.quant.quantized import QuantConfig


def test_pt2e_static_stays_close_to_fp32_and_round_trips(
    trained, split, calib_batches, test_windows, tmp_path
):
    from bpfm.training.predict import predict

    model, _, meta = trained
    config = QuantConfig("static", observer="histogram", backend="pt2e", quantize_input=True)
    quantized = quantize(model, config, calib_batches[:1])  # one batch: histograms are slow
    fp32 = predict(model, split.test, meta)
    estimate = predict(quantized, split.test, meta).estimate
    fp32_mae = np.abs(fp32.estimate - fp32.target).mean(axis=0)
    quant_mae = np.abs(estimate - fp32.target).mean(axis=0)
    assert np.all(np.abs(quant_mae - fp32_mae) <= 0.05 * fp32_mae), (quant_mae, fp32_mae)
    assert not np.array_equal(estimate, fp32.estimate)

    size, kind = size_bytes(quantized)
    assert kind == "int8_tensor_bytes"
    assert state_dict_bytes(model) / size >= 3.5
    constants = [attrgetter(n.target)(quantized.net) for n in quantized.net.graph.nodes
                 if n.op == "get_attr"]
    int8 = [t for t in constants if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    assert len(int8) == sum(isinstance(m, nn.Linear) for m in model.modules())  # conv stays fp32

    path = save_quantized(quantized, tmp_path)
    assert path.name == "model.pt2"
    reloaded = load_quantized(tmp_path)
    assert reloaded.config == config
    with torch.inference_mode():
        assert torch.equal(reloaded(test_windows), quantized(test_windows))


class Toy(nn.Module):
    """Two Linears over [B, 2, 1250] windows: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(1250, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).mean(dim=1)


def test_compiled_pt2e_matches_its_reference_graph_at_any_batch_size():
    torch.manual_seed(0)
    model = Toy().eval()
    calib = [torch.randn(16, 2, 1250)]
    quantized = quantize(model, QuantConfig("static", backend="pt2e"), calib)
    compiled = runnable(quantized, (4,))
    assert compiled is runnable(quantized, (4,))  # compiled once, kept
    assert "_compiled" not in dict(quantized.named_children())  # not saved or sized with it
    x = torch.randn(6, 2, 1250)  # not a compiled size: run as 4 + (2 padded to 4)
    with torch.inference_mode():
        reference = quantized(x)
        out = compiled(x)
    assert out.shape == (6, 2)
    # the int8 kernels round differently from the reference Q/DQ graph, by about one step
    assert torch.allclose(out, reference, atol=0.05), (out - reference).abs().max()
    assert (reference - model(x)).abs().max() < 0.1
    assert size_bytes(quantized)[0] < state_dict_bytes(model) / 3.5
    assert MIB == 2**20
