"""Training and inference throughput of the CEReBrO BP model, against the paper code's explicit
softmax(QK^T)V attention on the same weights.

    python benchmarks/train_throughput.py --sizes small,medium,large [--threads 2] [--json]
    python benchmarks/train_throughput.py --variants model,masked,explicit,sdpa,compiled  # CPU
    python benchmarks/train_throughput.py --device cuda   # large, bf16 autocast, batch 1024, MFU

Variants: `model` is bpfm's model as shipped (its `attention.attention_core` for these short
sequences; on CPU drop path running each residual branch on the kept samples only, on CUDA the
mask product); `masked` is the same with the paper code's drop path (every sample through every
branch, times a 0/1 mask); `explicit` swaps in the paper code's attention (tokens rearranged
into sequences, scores materialised); `sdpa` forces the model's `F.scaled_dot_product_attention`
branch; `compiled` is `torch.compile(model)` in `--compile-mode` (its compile time is reported
apart, not in the steps).

Model FLOPs are analytic (dense layers + attention, forward x3 for a training step; the
convention behind the paper's 154/196/198 GFLOP/s figures and behind MFU); optimizer, norms and
activations are not counted. They are the same for every variant, so the GFLOP/s columns rank
samples/s. Where drop path skips the dropped samples' branches (p = 0.2: a fifth of the blocks'
work in expectation), the arithmetic actually executed is lower: `exec` reports that rate.
On CPU the rates are compared with that of a 2048x2048 float32 matmul measured in the same loop
as the steps (so both see the same load on a shared machine); on CUDA with the GPU's dense bf16
peak. A training step is forward + backward + Adam step on MSE loss (`fused` Adam by default,
as `--adam plain` the per-parameter loop); the median step time is reported.
On a shared machine whose load average exceeds its cores, two OpenMP threads spin against other
processes (a 2-thread step then runs slower than a 1-thread one): compare with `--threads 1`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import time
import types
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

import bpfm.model.cerebro as cerebro
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
VARIANTS = ("model", "masked", "explicit", "sdpa", "compiled")
# max-autotune benchmarks Triton GEMM templates that can fuse the bias, GELU and residual
# epilogues (minutes of compile for large); reduce-overhead replays CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_N = 2048


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


def forward_flops(size: str, channels: int = 2, samples: int = 1250) -> tuple[float, float]:
    """Analytic forward FLOPs per sample (multiply-add = 2): all, and those in the blocks'
    residual branches (what drop path can skip)."""
    cfg = size_config(size)
    d, patches = cfg.dim, samples // cfg.patch_size
    tokens = channels * patches
    dense = 2 * (3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d)  # qkv, proj, fc1 + fc2
    branches = 0
    for i in range(cfg.depth):
        length = channels if i % 2 == 0 else patches
        branches += tokens * (dense + 4 * length * d)  # q k^T and weights @ v
    patch_embedding, head = tokens * 2 * cfg.patch_size * d, 2 * d * 2
    return float(patch_embedding + branches + head), float(branches)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_step(device: torch.device, dtype: torch.dtype, n: int = MATMUL_N) -> Callable[[], None]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def step() -> None:
        a @ b

    return step


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    step = matmul_step(device, dtype, n)
    times = []
    for _ in range(repeats + 3):
        start = _now(device)
        step()
        times.append(_now(device) - start)
    return 2 * n**3 / statistics.median(times[3:])


# Within these, the model takes its SDPA branch for every length / drops paths by the mask
# product on CPU too.
PATCHES = {
    "sdpa": (cerebro, "_use_sdpa", lambda x, axis: True),
    "masked": (cerebro, "_picks_rows", lambda x: False),
}


def picks_rows(variant: str, device: torch.device) -> bool:
    """Whether the variant's drop path skips the dropped samples' branches."""
    return device.type == "cpu" and variant not in ("masked", "compiled")


def make_step(model, x, y, train: bool, autocast: bool, adam: str, variant: str = "model"):
    """One training step (forward, backward, Adam) or one inference forward."""
    params = model.parameters()
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=adam == "fused") if train else None

    def run() -> None:
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

    def step() -> None:
        patch = mock.patch.object(*PATCHES[variant]) if variant in PATCHES else None
        with patch or contextlib.nullcontext():
            run()

    return step


def build_variants(model, names, x, y, autocast, adam, compile_mode="default") -> tuple[dict, dict]:
    """{(variant, mode): step} and extras (max abs diff to explicit, compile seconds)."""
    variants, extras = {}, {}
    explicit = with_explicit_attention(model)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        reference = explicit.eval()(x).float()
        extras["max_abs_diff_model_vs_explicit"] = (
            (model.eval()(x).float() - reference).abs().max().item()
        )
    for name in names:
        net = {"explicit": explicit}.get(name, model)
        if name == "compiled":
            net = copy.deepcopy(model)
            compiled = torch.compile(net, mode=compile_mode)
            started = time.perf_counter()
            make_step(compiled, x, y, True, autocast, adam)()  # compiles forward and backward
            make_step(compiled, x, y, False, autocast, adam)()  # and the no-grad forward
            extras["compile_s"] = time.perf_counter() - started
            net = compiled
        for mode in ("train", "infer"):
            variants[(name, mode)] = make_step(
                net, x, y, mode == "train", autocast, adam, variant=name
            )
    return variants, extras


def bench_size(
    size, device, batch, iters, warmup, peak, autocast, names, adam, compile_mode="default"
) -> dict:
    """All variants' steps and (on CPU) the reference matmul are interleaved, so they see the
    same load on a shared machine. On CPU a step's share of the matmul rate is the median over
    rounds of its rate against the matmul's rate in the same round: this VM's speed drifts by a
    third within a run, and pairing cancels the drift that a ratio of two medians keeps (six
    runs of small: 77-82 % as a ratio of medians, 77.5-79 % paired)."""
    torch.manual_seed(0)
    model = create_model(size).to(device)
    x = torch.randn(batch, 2, 1250, device=device)
    y = torch.randn(batch, 2, device=device)
    steps, row_extras = build_variants(model, names, x, y, autocast, adam, compile_mode)
    if peak is None:
        steps[("matmul", "ref")] = matmul_step(device, torch.float32)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    shuffle = random.Random(0).sample
    for i in range(warmup + iters):
        # a new order each round: no variant always runs right after another (or the matmul)
        for key in shuffle(list(steps), len(steps)):
            start = _now(device)
            steps[key]()
            if i >= warmup:
                times[key].append(_now(device) - start)
    # the matmul's rate in the same round on CPU, the fixed peak on CUDA
    matmul_times = times.pop(("matmul", "ref"), None)
    peaks = [2 * MATMUL_N**3 / t for t in matmul_times] if matmul_times else [peak] * iters
    flops, branch_flops = forward_flops(size)
    row = {"size": size, "batch": batch, "reference_gflop_s": statistics.median(peaks) / 1e9}
    row.update(row_extras)
    for (name, mode), values in times.items():
        seconds = statistics.median(values)
        step_flops = (3 if mode == "train" else 1) * flops * batch
        row[f"{name}_{mode}_samples_s"] = batch / seconds
        row[f"{name}_{mode}_gflop_s"] = step_flops / seconds / 1e9
        shares = [step_flops / t / rate for t, rate in zip(values, peaks, strict=True)]
        row[f"{name}_{mode}_share_of_peak"] = statistics.median(shares)
        if len(shares) > 1:
            row[f"{name}_{mode}_share_quartiles"] = statistics.quantiles(shares, n=4)[::2]
        if mode == "train" and picks_rows(name, device):
            executed = flops - model.spec["drop_path"] * branch_flops  # expected, per sample
            row[f"{name}_train_executed_gflop_s"] = 3 * executed * batch / seconds / 1e9
    for name in names:  # paired: the step times of one round, so drift within a run cancels
        pairs = zip(times[("model", "train")], times[(name, "train")], strict=True)
        row[f"{name}_train_time_vs_model"] = statistics.median(t / m for m, t in pairs)
    if "explicit" in names:
        row["train_speedup_vs_explicit"] = (
            row["model_train_samples_s"] / row["explicit_train_samples_s"]
        )
    return row


def gpu_peak(name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    for key, tflops in GPU_BF16_PEAK.items():
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")


def quartiles(pair: list[float] | None) -> str:
    return f" (IQR {100 * pair[0]:.0f}-{100 * pair[1]:.0f}%)" if pair and pair[0] != pair[1] else ""


def describe(row: dict, names: list[str], cuda: bool) -> str:
    ref = "peak" if cuda else f"matmul {row['reference_gflop_s']:.0f} GFLOP/s"
    parts = [f"{row['size']:>6} b{row['batch']} ({ref}):"]
    for name in names:
        executed = row.get(f"{name}_train_executed_gflop_s")
        paired = f", step x{row[f'{name}_train_time_vs_model']:.3f} of model's (paired)"
        parts.append(
            f"{name} train {row[f'{name}_train_samples_s']:.1f}/s "
            f"{row[f'{name}_train_gflop_s']:.1f} GFLOP/s "
            f"{100 * row[f'{name}_train_share_of_peak']:.0f}%"
            + quartiles(row.get(f"{name}_train_share_quartiles"))
            + (f" (exec {executed:.1f})" if executed is not None else "")
            + (paired if name != "model" else "")
            + f", infer {row[f'{name}_infer_samples_s']:.1f}/s |"
        )
    parts.append(f"max|diff| {row['max_abs_diff_model_vs_explicit']:.2e}")
    if "compile_s" in row:
        parts.append(f"compile {row['compile_s']:.0f} s")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default=None, help="comma-separated (default small on CPU, large on CUDA)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--batch", type=int, default=None, help="default 32 on CPU, 1024 (the recipe's) on CUDA"
    )
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"from {', '.join(VARIANTS)} (default model,masked,explicit on CPU, "
        "model,sdpa,explicit,compiled on CUDA)",
    )
    parser.add_argument("--adam", default="fused", choices=("fused", "plain"))
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode of the compiled variant",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak")
    parser.add_argument("--json", action="store_true", help="one JSON object as the last line")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    default = "model,sdpa,explicit,compiled" if cuda else "model,masked,explicit"
    variants = args.variants or default
    names = variants.split(",")
    if set(names) - set(VARIANTS) or "model" not in names:
        raise SystemExit(f"--variants: {variants!r}: model plus any of {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (args.sizes or ("large" if cuda else "small")).split(",")
    batch = args.batch or (1024 if cuda else 32)
    peak = None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = gpu_peak(torch.cuda.get_device_name(), args.peak_tflops)
        reference = {
            "gpu": torch.cuda.get_device_name(),
            "bf16_peak_tflops": peak / 1e12,
            # 8192^3: large enough that launch and sync overheads vanish
            "measured_bf16_matmul_tflops": matmul_rate(device, torch.bfloat16, 8192) / 1e12,
        }
    else:
        reference = {"threads": torch.get_num_threads(), "adam": args.adam}
    if "compiled" in names:
        reference["compile_mode"] = args.compile_mode
    reference["load_avg_1m_before"] = os.getloadavg()[0]
    print(json.dumps(reference) if args.json else reference)
    rows = []
    for size in sizes:
        row = bench_size(
            size, device, batch, args.iters, args.warmup, peak, cuda, names, args.adam,
            args.compile_mode,
        )
        row["load_avg_1m_after"] = os.getloadavg()[0]
        rows.append(row)
        if not args.json:
            print(describe(row, names, cuda), f"| load {row['load_avg_1m_after']:.2f}")
    if args.json:
        print(json.dumps({"device": args.device, **reference, "results": rows}))


if __name__ == "__main__":
    main()
