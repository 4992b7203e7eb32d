"""Training and inference throughput of the CEReBrO BP model, SDPA vs the paper code's explicit
softmax(QK^T)V attention on the same weights.

    python benchmarks/train_throughput.py --sizes small,medium,large [--threads 2] [--json]
    python benchmarks/train_throughput.py --device cuda            # bf16 autocast, large, MFU

Model FLOPs are analytic (dense layers + attention, forward x3 for a training step; the
convention behind the paper's 154/196/198 GFLOP/s figures). On CPU they are compared with the
measured rate of a 2048x2048 float32 matmul; on CUDA with the GPU's dense bf16 peak.
A training step is forward + backward + Adam step on MSE loss; the median step time is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import types

import torch
import torch.nn.functional as F

from bpfm.model import create_model, size_config
from bpfm.model.cerebro import Attention

# Dense bf16 peaks (TFLOP/s, no sparsity) for MFU; others need --peak-tflops.
GPU_BF16_PEAK = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "A10": 125.0,
}


def explicit_attention(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """The paper code's attention: tokens rearranged into sequences, scores materialised."""
    b, c, p, d = x.shape
    seq = x.transpose(1, 2).reshape(b * p, c, d) if self.over_channels else x.reshape(b * c, p, d)
    s, n, _ = seq.shape
    q, k, v = self.qkv(seq).reshape(s, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = self.proj((weights @ v).transpose(1, 2).reshape(s, n, d))
    if self.over_channels:
        return out.view(b, p, c, d).transpose(1, 2)
    return out.view(b, c, p, d)


def with_explicit_attention(model: torch.nn.Module) -> torch.nn.Module:
    explicit = copy.deepcopy(model)
    for module in explicit.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(explicit_attention, module)
    return explicit


def forward_flops(size: str, channels: int = 2, samples: int = 1250) -> float:
    """Analytic forward FLOPs per sample (multiply-add = 2)."""
    cfg = size_config(size)
    d, patches = cfg.dim, samples // cfg.patch_size
    tokens = channels * patches
    dense = 2 * (3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d)  # qkv, proj, fc1 + fc2
    total = tokens * 2 * cfg.patch_size * d  # patch embedding
    for i in range(cfg.depth):
        length = channels if i % 2 == 0 else patches
        total += tokens * (dense + 4 * length * d)  # q k^T and weights @ v
    return float(total + 2 * d * 2)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        start = _now(device)
        a @ b
        times.append(_now(device) - start)
    return 2 * n**3 / statistics.median(times[1:])


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_step(model, x, y, train: bool, autocast: bool):
    """One training step (forward, backward, Adam) or one inference forward."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4) if train else None

    def step() -> None:
        model.train(train)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            if not train:
                with torch.no_grad():
                    model(x)
                return
            loss = F.mse_loss(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_size(size, device, batch, iters, warmup, peak, autocast) -> dict:
    """SDPA and explicit steps are interleaved, so both see the same load on a shared machine."""
    torch.manual_seed(0)
    model = create_model(size).to(device)
    explicit = with_explicit_attention(model)
    x = torch.randn(batch, 2, 1250, device=device)
    y = torch.randn(batch, 2, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        diff = (model.eval()(x).float() - explicit.eval()(x).float()).abs().max().item()
    steps = {
        (name, mode): make_step(variant, x, y, mode == "train", autocast)
        for name, variant in (("sdpa", model), ("explicit", explicit))
        for mode in ("train", "infer")
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for i in range(warmup + iters):
        for key, step in steps.items():
            start = _now(device)
            step()
            if i >= warmup:
                times[key].append(_now(device) - start)
    flops = forward_flops(size)
    row = {"size": size, "batch": batch, "max_abs_diff_sdpa_vs_explicit": diff}
    for (name, mode), values in times.items():
        seconds = statistics.median(values)
        step_flops = (3 if mode == "train" else 1) * flops * batch
        row[f"{name}_{mode}_samples_s"] = batch / seconds
        row[f"{name}_{mode}_gflop_s"] = step_flops / seconds / 1e9
        row[f"{name}_{mode}_share_of_peak"] = step_flops / seconds / peak
    row["train_speedup_sdpa_vs_explicit"] = (
        row["sdpa_train_samples_s"] / row["explicit_train_samples_s"]
    )
    return row


def gpu_peak(name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    for key, tflops in GPU_BF16_PEAK.items():
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default=None, help="comma-separated (default small on CPU, large on CUDA)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak")
    parser.add_argument("--json", action="store_true", help="one JSON object as the last line")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (args.sizes or ("large" if cuda else "small")).split(",")
    batch = args.batch or (256 if cuda else 32)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = gpu_peak(torch.cuda.get_device_name(), args.peak_tflops)
        reference = {
            "gpu": torch.cuda.get_device_name(),
            "bf16_peak_tflops": peak / 1e12,
            "measured_bf16_matmul_tflops": matmul_rate(device, torch.bfloat16) / 1e12,
        }
    else:
        peak = matmul_rate(device, torch.float32)
        reference = {"threads": torch.get_num_threads(), "matmul_2048_f32_gflops": peak / 1e9}
    print(json.dumps(reference) if args.json else reference)
    rows = []
    for size in sizes:
        row = bench_size(size, device, batch, args.iters, args.warmup, peak, autocast=cuda)
        rows.append(row)
        if not args.json:
            print(
                f"{size:>6} b{batch}: train {row['sdpa_train_samples_s']:.1f} samples/s "
                f"({row['sdpa_train_gflop_s']:.1f} GFLOP/s, "
                f"{100 * row['sdpa_train_share_of_peak']:.0f}% of {'peak' if cuda else 'matmul'}), "
                f"infer {row['sdpa_infer_samples_s']:.1f}/s | explicit: train "
                f"{row['explicit_train_samples_s']:.1f}/s "
                f"({100 * row['explicit_train_share_of_peak']:.0f}%), "
                f"infer {row['explicit_infer_samples_s']:.1f}/s | "
                f"max|diff| {row['max_abs_diff_sdpa_vs_explicit']:.2e}"
            )
    if args.json:
        print(json.dumps({"device": args.device, **reference, "results": rows}))


if __name__ == "__main__":
    main()
