"""What a dry run adds to the plan of cells and trials (`bpfm.orchestration.grid.dry_run`): the
work a launch would do before and after training, and the device choice of `--gpus`, all without
starting Ray."""

from __future__ import annotations

import os
from typing import Any

from bpfm.errors import BpfmError
from bpfm.io.storage import exists
from bpfm.profiles import Profile

# bpfm.orchestration.ray_grid.run_grid's default: one CPU per quantization task, no GPU
QUANT_TASK_CPUS = 1.0


def gpus_now(policy: str) -> tuple[float | None, str]:
    """(GPUs a launch would plan with, why). On a cluster (RAY_ADDRESS) `auto` asks the cluster at
    launch; a dry run does not join it."""
    if policy == "never":
        return 0.0, "--gpus never: every trial on CPUs"
    if policy == "always":
        return 1.0, "--gpus always: trials request their profile's GPUs even if none are up yet"
    if os.environ.get("RAY_ADDRESS"):
        return None, ("--gpus auto: decided at launch from the GPUs the cluster at RAY_ADDRESS "
                      "has then (not queried by a dry run)")
    import torch  # lazy: torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    where = f"{count} GPU{'s' if count != 1 else ''}" if count else "no GPU"
    device = "GPUs as the profile's resources say" if count else "CPUs"
    return float(count), f"--gpus auto: this machine has {where} now, so trials run on {device}"


def launch_notes(profile: Profile, plan: dict[str, Any], gpus: str) -> list[str]:
    """Stage 0's backbones (which are missing and would be pretrained, how long), stage 2's
    task resources, and what `--gpus` chooses now."""
    notes = []
    sizes = sorted({c.split("-")[0] for t in plan["trials"] for c in t["cells"]
                    if "-pretrained-" in c})
    if sizes and profile.pretrain is not None:
        found = {s: _exists(profile.pretrain.checkpoint_for(s)) for s in sizes}
        missing = [s for s, there in found.items() if there is not True]
        unknown = [s for s, there in found.items() if isinstance(there, str)]
        if unknown:
            notes.append(f"stage 0: cannot check the backbones of {', '.join(unknown)} now "
                         f"({found[unknown[0]]}); counted as missing")
        if missing:
            notes.append(
                f"stage 0: would pretrain {len(missing)} backbone{'s' if len(missing) > 1 else ''} "
                f"({', '.join(missing)}) for {profile.pretrain.steps:,} SimMIM steps each, one Ray "
                f"task per size with that size's trial resources (missing: "
                f"{', '.join(profile.pretrain.checkpoint_for(s) for s in missing)})"
            )
        else:
            notes.append(f"stage 0: backbones for {', '.join(sizes)} exist (no pretraining)")
    if plan["n_quantization_runs"]:
        notes.append(
            f"stage 2: {plan['n_cells']} Ray tasks (one per trained model, "
            f"{len(plan['quantize_variants'])} variants each), {QUANT_TASK_CPUS:g} CPU and no "
            "GPU per task (INT8 inference runs on CPUs)"
        )
    gpu_count, why = gpus_now(gpus)
    if gpu_count is not None:
        sizes_all = sorted({t["trial"].split("-")[0] for t in plan["trials"]})
        asks = "; ".join(
            f"{size}: " + ", ".join(f"{k}={v:g}" for k, v in
                                    profile.resources_for(size).on_cluster(gpu_count).items())
            for size in sizes_all )
        why += f" (per trial {asks})"
    notes.append(why)
    return notes


def _exists(uri: str) -> bool | str:
    """Whether `uri` exists, or why that cannot be told now (an unreachable S3 endpoint)."""
    try:
        return exists(uri)
    except BpfmError as err:
        return str(err)
