"""Model size and CPU latency, measured the same way for every variant.

Size: bytes of `torch.save(state_dict)` (the paper's measure; its "MB" are MiB = 2^20 bytes), or
for a pt2e graph the bytes of the tensors it holds. Latency: median wall time (and thread CPU
time) of `runs` forward passes after `warmup` passes, at a fixed torch thread count; the models
compared are run round-robin, so that load from other processes on a shared machine hits all of
them alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from bpfm.model.checkpoint import saved_size
from bpfm.quant.fx import ao_warnings_filtered
from bpfm.quant.quantized import WINDOW_SHAPE

MIB = 2**20


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of `torch.save(module.state_dict())`, as the paper measured model size (packed int8
    weights and their dtype/qparams entries included; a model on the meta device is sized as
    if materialised, since values do not change the size)."""
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in module.state_dict().values()):
        module = module.to_empty(device="cpu")
    with ao_warnings_filtered():
        return saved_size(module.state_dict())


def graph_tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors a GraphModule's graphs read with get_attr: parameters,
    buffers and constants (where pt2e keeps its int8 weights), but not the fp32 originals that
    conversion leaves attached and the graph no longer uses."""
    tensors: dict[tuple[int, int], int] = {}

    def add(tensor: torch.Tensor) -> None:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[key] = max(tensors.get(key, 0), tensor.numel() * tensor.element_size())

    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op == "get_attr":
                value = _attr(sub, node.target)
                if isinstance(value, torch.Tensor):
                    add(value)
    return sum(tensors.values())


def _attr(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def latency_ms(models: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
               batch_sizes: Sequence[int] = (1, 64), *, runs: int = 20, warmup: int = 3,
               threads: int = 1, seed: int = 0) -> dict[str, dict[int, float]]:
    """{model name: {batch size: median wall ms}}; see `timings`."""
    result = timings(models, batch_sizes, runs=runs, warmup=warmup, threads=threads, seed=seed)
    return {name: {b: t["wall_ms"] for b, t in per.items()} for name, per in result.items()}


@torch.inference_mode()
def timings(models: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
            batch_sizes: Sequence[int] = (1, 64), *, runs: int = 20, warmup: int = 3,
            threads: int = 1, seed: int = 0) -> dict[str, dict[int, dict[str, float]]]:
    """{model name: {batch size: {"wall_ms", "cpu_ms"}}}: medians over `runs` timed forward
    passes of random windows [B, 2, 1250], the models interleaved, after `warmup` untimed
    passes each (the first pass of a compiled model compiles it). `cpu_ms` is the CPU time of
    the calling thread, exact as a latency only at threads=1; on a shared machine it leaves
    out the time other processes held the core, so its ratios are steadier than wall time's."""
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, dict[int, dict[str, float]]] = {name: {} for name in models}
    with fixed_threads(threads):
        for batch in batch_sizes:
            x = torch.randn(batch, *WINDOW_SHAPE, generator=generator)
            for model in models.values():
                for _ in range(warmup):
                    model(x)
            wall: dict[str, list[float]] = {name: [] for name in models}
            cpu: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(runs):
                for name, model in models.items():
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    model(x)
                    cpu[name].append(time.thread_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
            for name in models:
                result[name][batch] = {"wall_ms": statistics.median(wall[name]) * 1000.0,
                                       "cpu_ms": statistics.median(cpu[name]) * 1000.0}
    return result
