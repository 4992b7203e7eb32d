"""Full training-state checkpoints (model, optimiser, scheduler, RNGs, progress) for resuming."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.io.disk import reporting_full_disk
from bpfm.io.scratch import left_by_dead_process, owner
from bpfm.model.checkpoint import load_failure, safe_torch_load, saved_size

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# Fields that may change between a checkpoint and the run resuming it (epochs only when the
# schedule does not depend on it); any other difference means another experiment.
RESUMABLE_CHANGES = {"data", "cache", "epochs", "report_epochs", "out", "device", "num_workers",
                     "calibration", "calib_windows",  # evaluation only, not training
                     "eval_batch_size", "keep_checkpoints", "amp", "compile",
                     "data_generation"}
PROGRESS_KEYS = ("epoch", "history", "best_val_mae", "best_epoch")


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python RNGs (init, dropout and anything else drawing from them)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, in types `weights_only` loading takes."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def train_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    progress: dict[str, Any],
) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly where this one is now."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "config": config,
        **progress,
    }


def restore_train_state(
    saved: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Load `saved` into model, optimiser, scheduler and the RNGs; returns its progress."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return {k: saved[k] for k in PROGRESS_KEYS}


def check_resumable(
    saved: dict[str, Any], current: dict[str, Any], source: Path, *, total_dependent: bool
) -> None:
    """Refuse to resume a checkpoint whose config differs in more than RESUMABLE_CHANGES
    (`total_dependent`: the schedule depends on the total epochs, so those may not change)."""
    allowed = set(RESUMABLE_CHANGES)
    if total_dependent:
        allowed.discard("epochs")
    for key, value in saved.items():
        if key not in allowed and current.get(key) != value:
            raise BpfmError(
                f"{source}: config.{key}: the checkpoint was trained with {value!r}, this run asks "
                f"for {current.get(key)!r}; use another --out or turn resume off"
            )


def _epoch_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [(int(p.name.removeprefix("epoch-")), p) for p in root.glob("epoch-[0-9]*")]
    return sorted((e, p) for e, p in dirs if (p / STATE_FILE).is_file())


def latest_checkpoint(out: str | Path) -> Path | None:
    """out/checkpoints/epoch-NNNN of the last completed epoch, or None."""
    dirs = _epoch_dirs(Path(out))
    return dirs[-1][1] if dirs else None


TEMP_PREFIX = ".tmp-epoch-"
# .tmp-epoch-NNNN-<host>-<pid>; names from before hosts were recorded lack the host
_TEMP_NAME = re.compile(rf"{re.escape(TEMP_PREFIX)}\d+-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the half-written checkpoints that killed runs left in out/checkpoints (a process
    killed while saving never reaches its cleanup); those of processes still running, or of
    other hosts sharing the folder, stay. Returns what was removed."""
    root = Path(out) / "checkpoints"
    removed = []
    for path in root.glob(f"{TEMP_PREFIX}*") if root.is_dir() else ():
        match = _TEMP_NAME.fullmatch(path.name)
        if match and left_by_dead_process(match["host"], int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("%s: removed %d checkpoint(s) half-written by killed runs", root, len(removed))
    return removed


def save_train_state(out: Path, epoch: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write out/checkpoints/epoch-NNNN/state.pt atomically (temp dir + rename) and keep the
    last `keep` epochs; later epochs of an abandoned trajectory are removed too. A full disk is
    one line naming the file and the bytes it needs, and leaves no temporary behind."""
    root = out / "checkpoints"
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f"{TEMP_PREFIX}{epoch:04d}-{owner()}"
    with reporting_full_disk(final / STATE_FILE, lambda: saved_size(state)):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            # through a Python file: torch's own file writer hides ENOSPC behind a RuntimeError
            with open(tmp / STATE_FILE, "wb") as handle:
                torch.save(state, handle)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    earlier = [p for e, p in _epoch_dirs(out) if e < epoch]
    stale = earlier[: max(len(earlier) - (keep - 1), 0)]
    stale += [p for e, p in _epoch_dirs(out) if e > epoch]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return final


# What a resumed run reads from a checkpoint.
STATE_KEYS = ("model", "optimizer", "scheduler", "rng", "config", *PROGRESS_KEYS)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint dir (or its state.pt) -> the saved state; one-line errors if unreadable."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    try:
        saved = safe_torch_load(file)
    except FileNotFoundError:
        raise BpfmError(f"{file}: checkpoint not found") from None
    except Exception as err:  # zip, unpickling and truncation errors share no base class
        raise load_failure(file, err) from None
    if not isinstance(saved, dict):
        raise BpfmError(f"{file}: not a bpfm training checkpoint (holds a {type(saved).__name__})")
    missing = [key for key in STATE_KEYS if key not in saved]
    if missing:
        raise BpfmError(f"{file}: {missing[0]}: missing (not a complete bpfm training checkpoint)")
    if not isinstance(saved["config"], dict):
        raise BpfmError(f"{file}: config: not a mapping (not a bpfm training checkpoint)")
    return saved
