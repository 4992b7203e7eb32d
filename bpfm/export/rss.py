"""Peak resident memory of a runtime process running one export at batch 1, as a script:
`python rss.py FILE [--threads 1] [--runs 20]` prints {"baseline_mib", "peak_mib",
"above_baseline_mib"} as one JSON line.

Run by path, not as `bpfm.export.rss`: importing the bpfm package would load torch into the
process and count it. The baseline is the interpreter with the runtime imported (ExecuTorch's
Python runtime imports torch itself; ONNX Runtime runs on numpy alone).
"""

from __future__ import annotations

import argparse
import json
import resource

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak() -> None:
    """Linux resets a process's peak RSS (VmHWM) when 5 is written to clear_refs: the peak read
    later is then that of loading and running the model, not of importing the runtime."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 2, 1250)).astype(np.float32)
    # each runtime is imported only on its own branch: the other one's import would count in the
    # baseline (and need not be installed)
    if args.file.endswith(".pte"):
        import torch
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(args.threads)
        runtime = Runtime.get()
        tensor = torch.from_numpy(x)
        baseline = _rss_mib()
        _reset_peak()
        method = runtime.load_program(args.file).load_method("forward")

        def run() -> None:
            method.execute([tensor])
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        baseline = _rss_mib()
        _reset_peak()
        session = ort.InferenceSession(args.file, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run() -> None:
            session.run(None, {name: x})
    for _ in range(args.runs):
        run()
    peak = _peak_mib()
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak,
                      "above_baseline_mib": max(peak - baseline, 0.0)}))


if __name__ == "__main__":
    main()
