"""Post-training INT8 quantization of BP models (the paper's Section II-D).

- `quantized`: `QuantConfig` (one variant), `InputQuantizer`, `QuantizedModel`.
- `convert`: `quantize(model, QuantConfig(...), calib_batches)`, `save_quantized`, `load_quantized`.
- `fx`: torch.ao FX graph mode, as the paper (`prepare_fx` / `convert_fx`); real int8 kernels
  (fbgemm/onednn) in eager mode, and a `torch.save(state_dict)` size comparable to the paper's.
- `pt2e`: torchao export quantization (`X86InductorQuantizer`); a reference Q/DQ graph that is
  fast once compiled with Inductor (`bpfm.quant.convert.runnable`).
- `measure`: size and latency; `study`: one trained model's variants measured against fp32.
"""
