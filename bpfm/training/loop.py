"""Fine-tune (or train from scratch) one configuration: `fit(TrainConfig)`.

Plain PyTorch, no Ray: per-epoch callbacks receive an `EpochReport`, which is how
`bpfm.orchestration.ray_grid` reports to Ray Tune. Recipe defaults are the paper's (MSE, Adam lr
1e-4, no weight decay, seed 42, fixed epochs) except that targets are standardised with the train
view's mean/SD (the head predicts z-scores and starts at 0, i.e. the train mean);
`standardize_targets=False` replays the paper's raw-mmHg training. Inputs are z-scored per window
and channel by default (`normalize_inputs`): PulseDB's ECG_F / PPG_F are min-max scaled to [0, 1],
and on that scale a short run stays at the mean predictor (measured on synthetic data: MASE 0.99
after 3 epochs vs 0.65 with z-scored windows); `normalize_inputs=False` is the paper's input.

Every epoch ends with a full checkpoint (`out/checkpoints/epoch-NNNN/state.pt`: model,
optimiser, scheduler, torch/CUDA/numpy/python RNG states, epoch, history, best val; see
`bpfm.training.state`), and the loader's shuffle is seeded per (seed, epoch), so a resumed run
equals an uninterrupted one.
Epoch-prefix reporting: with a schedule that does not depend on the total epochs, the model at
epoch N of a longer run *is* the N-epoch model, so `report_epochs=(100, 200)` writes
`out/epoch-100/` on the way to 200. A total-dependent schedule (cosine) cannot do that, and asking
for it is an error rather than a quietly different model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bpfm.data.generations import check_same_generation, pinned_shards
from bpfm.data.loader import ShardDataset, view_target_stats
from bpfm.data.splits import Split
from bpfm.data.verify import require_intact
from bpfm.devices import resolve_device
from bpfm.errors import BpfmError
from bpfm.io.atomic import write_json
from bpfm.model import apply_freeze, create_model, load_pretrained_backbone
from bpfm.training.calibration import evaluate_calibration, write_calibrated_estimates
from bpfm.training.calibration import flat_metrics as calibration_flat_metrics
from bpfm.training.config import BACKBONE_INITS, TOTAL_DEPENDENT_SCHEDULES, TrainConfig
from bpfm.training.evaluate import (
    mean_mae,
    model_dir_payload,
    open_split,
    require_segments,
    split_summary,
)
from bpfm.training.model_dir import read_metrics, write_model_dir
from bpfm.training.predict import Predictions, check_batch, predict
from bpfm.training.state import (
    check_resumable,
    latest_checkpoint,
    load_train_state,
    remove_stale_temporaries,
    restore_train_state,
    save_train_state,
    seed_everything,
    train_state,
)

log = logging.getLogger(__name__)

@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_mae: float  # mmHg, mean of SBP and DBP MAE on the validation view
    checkpoint_dir: Path  # holds exactly this epoch's full checkpoint
    metrics: dict[str, Any]  # per-epoch numbers; at report/final epochs also `test_*`
    model_dir: Path | None = None  # set when this epoch wrote a model dir


@dataclass
class FitResult:
    out: Path
    epochs: int
    test: dict[str, Any]
    val: dict[str, Any]
    history: list[dict[str, Any]]
    split: dict[str, Any]
    report_dirs: dict[int, Path] = field(default_factory=dict)


Callback = Callable[[EpochReport], None]


def build_model(config: TrainConfig) -> nn.Module:
    model = create_model(
        config.size,
        head=config.head,
        head_hidden=config.head_hidden,
        head_dropout=config.head_dropout,
        drop_path=config.drop_path,
    )  # xavier-initialised (the paper's scheme)
    if config.init in BACKBONE_INITS:
        try:
            load_pretrained_backbone(model, config.checkpoint)
        except BpfmError:
            raise
        except Exception as err:  # e.g. an unexpected structure inside an otherwise valid file
            raise BpfmError(f"{config.checkpoint}: cannot load backbone ({err})") from None
    if config.standardize_targets:
        model.set_output_bias([0.0, 0.0])  # z-score of the train mean
    return apply_freeze(model, config.freeze)


def _target_meta(config: TrainConfig, mean: np.ndarray, std: np.ndarray) -> dict[str, Any]:
    scale = std if config.standardize_targets else np.ones(2)
    shift = mean if config.standardize_targets else np.zeros(2)
    return {
        "target_mean": [float(v) for v in mean],  # train view [SBP, DBP] mmHg (MASE baseline)
        "target_std": [float(v) for v in std],
        "target_scale": [float(v) for v in scale],  # mmHg = output * scale + shift
        "target_shift": [float(v) for v in shift],
        "standardize_targets": config.standardize_targets,
        "normalize_inputs": config.normalize_inputs,
    }


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per step instead of one per parameter, ~5 % of a small-model CPU step
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of the base lr before optimiser step `step` (0-based): linear warm-up over
    `warmup_epochs`, then constant or a cosine decay to 0 at `epochs`."""
    warmup_steps = config.warmup_epochs * steps_per_epoch
    if step < warmup_steps:  # the last step of a fractional warm-up would overshoot 1
        return min((step + 1) / warmup_steps, 1.0)
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        progress = (step - warmup_steps) / max(total - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def _loss_fn(config: TrainConfig) -> nn.Module:
    return nn.HuberLoss(delta=config.huber_delta) if config.loss == "huber" else nn.MSELoss()


def _train_loader(config: TrainConfig, view, epoch: int, device: torch.device):

    dataset = ShardDataset(
        view,
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        normalize=config.normalize_inputs,
    )
    dataset.set_epoch(epoch)  # the shuffle depends on (seed, epoch) only: resumable
    # Pinned host batches make the non-blocking copies asynchronous, so the host runs ahead.
    return DataLoader(dataset, batch_size=None, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda")


def _autocasts(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: on CUDA only, unless turned off."""
    return config.amp and device.type == "cuda"


# Steps between loss checks. Reading a device value back waits for every queued kernel, so a
# check each step keeps the host from running ahead of a GPU; every 50 steps bounds how far a
# divergence goes unnoticed, and the epoch's checkpoint is written only after the last check.
FINITE_CHECK_STEPS = 50


def _check_finite(loss_sum: torch.Tensor, epoch: int, first_step: int, last_step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise BpfmError(f"train: loss: not finite at epoch {epoch} in steps "
                        f"{first_step}-{last_step} (lr too high?)")


def _train_epoch(
    config, model, view, epoch, optimizer, scheduler, meta, device
) -> dict[str, float]:
    loss_fn = _loss_fn(config)
    scale = torch.tensor(meta["target_scale"], dtype=torch.float32, device=device)
    shift = torch.tensor(meta["target_shift"], dtype=torch.float32, device=device)
    use_amp = _autocasts(config, device)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # sample-weighted, on device
    samples, steps, checked = 0, 0, 0
    started = time.perf_counter()
    for batch in _train_loader(config, view, epoch, device):
        # Checked on the host copy, before the transfer: no device sync.
        check_batch(batch["x"], where=f"{config.data}: train batch")
        x = batch["x"].to(device, non_blocking=True)
        y = (batch["y"].to(device, non_blocking=True) - shift) / scale
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
        loss = loss_fn(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * x.shape[0]
        samples += x.shape[0]
        steps += 1
        if steps - checked == FINITE_CHECK_STEPS:
            _check_finite(loss_sum, epoch, checked + 1, steps)
            checked = steps
        if config.max_steps_per_epoch and steps >= config.max_steps_per_epoch:
            break
    if samples == 0:
        raise BpfmError(f"{config.data}: train view: no segments to train on")
    _check_finite(loss_sum, epoch, checked + 1, steps)  # waits for the device: time after it
    seconds = time.perf_counter() - started
    return {"train_loss": float(loss_sum) / samples, "samples_per_s": samples / seconds,
            "steps": steps, "lr": optimizer.param_groups[0]["lr"]}


def compile_for_training(model: nn.Module) -> nn.Module:
    """`torch.compile` for the training steps. Static shapes: an epoch's smaller last batch
    compiles a second graph once, where a dynamic batch dimension would make every compile
    slower (7 s against 54 s for small through aot_eager on CPU) and the kernels generic. On an
    H100 compiled training of large at batch 1024 runs 1.6x faster than eager
    (benchmarks/train_throughput.py --device cuda); on CPU the eager model is faster (its drop
    path skips the dropped samples, which a graph cannot). Evaluation stays eager, and
    checkpoints hold the eager model's keys."""
    return torch.compile(model, dynamic=False)


def _steps_per_epoch(config: TrainConfig, n_train: int) -> int:
    steps = math.ceil(n_train / config.batch_size)
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


def _write_report_dirs(
    model_dirs: list[Path],
    model: nn.Module,
    split: Split,
    meta: dict[str, Any],
    val_pred: Predictions,
    config: TrainConfig,
    summary: dict[str, Any],
    state: dict[str, Any],
    epoch: int,
    eval_kw: dict[str, Any],
) -> dict[str, Any]:
    """Write this epoch's model dirs (a report epoch's and/or the final one): test predictions
    and metrics, and per-subject calibration when asked for. Returns the `test_*` and
    calibration metrics the epoch's report carries."""
    payload, test_pred = model_dir_payload(model, split, meta, val_pred, **eval_kw)
    calibrated = None
    # per-subject calibration (bpfm.training.calibration), model unchanged
    if config.calibration:
        try:
            payload["calibration"] = evaluate_calibration(
                model, meta, split, config.calibration, config.calib_windows,
                keep_estimates=True, **eval_kw,
            )
            calibrated = payload["calibration"].pop("estimates")
        except BpfmError as err:  # e.g. too few windows per subject: keep the model
            log.warning("epoch %d: no calibrated results: %s", epoch, err)
            payload["calibration_error"] = str(err)
    payload.update(split=summary, **state)  # state: epoch, history, best val
    dir_config = {**config.to_dict(), "epochs": epoch, "trained_in_run_of": config.epochs}
    for model_dir in model_dirs:
        if calibrated is not None:  # before metrics.json, which completes the dir
            write_calibrated_estimates(model_dir, calibrated)
        write_model_dir(model_dir, model, {**meta, "epoch": epoch}, dir_config, payload,
                        test_pred)
    test = payload["test"]
    metrics = {f"test_{k}": v for k, v in test.items()}
    if "calibration" in payload:
        metrics.update(calibration_flat_metrics(payload["calibration"]))
    log.info("epoch %d test: MAE SBP %.2f / DBP %.2f mmHg, BHS %s/%s, AAMI %s", epoch,
             test["sbp_mae"], test["dbp_mae"], test["sbp_bhs_grade"],
             test["dbp_bhs_grade"], test["aami"])
    return metrics


# ---------------------------------------------------------------- the loop


def fit(
    config: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    resume: bool = True,
    resume_from: str | Path | None = None,
    allow_new_data: bool = False,
) -> FitResult:
    """Train `config`, writing the model dir `config.out` (layout in `bpfm.training.predict`).

    `resume`: continue from out/'s last checkpoint when there is one. `resume_from`: a checkpoint
    dir to continue from instead (what Ray Tune hands back after a failure). The run reads one
    shard generation throughout (`bpfm.data.generations`); resuming a checkpoint of another
    generation is refused unless `allow_new_data`."""
    config = TrainConfig.from_dict(config.to_dict()).validate()  # a private, normalised copy
    out = Path(config.out)
    remove_stale_temporaries(out)  # of killed runs: they hold disk space and nothing else
    device = resolve_device(config.device)
    split, summary, meta = _open_data(config)

    seed_everything(config.seed)
    model = build_model(config).to(device)
    optimizer = _make_optimizer(config, model)
    scheduler = _make_scheduler(config, optimizer, _steps_per_epoch(config, summary["n_train"]))
    checkpoint = Path(resume_from) if resume_from else (latest_checkpoint(out) if resume else None)
    state = _start_state(config, checkpoint, model, optimizer, scheduler, allow_new_data)
    if state["epoch"] == config.epochs and (out / "metrics.json").is_file():
        log.info("%s: already trained for %d epochs", out, config.epochs)
        return _result(out, config, summary)

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    log.info("%s: train %d / val %d / test %d segments; %s", config.data, summary["n_train"],
             summary["n_val"], summary["n_test"], split.label)
    log.info("training %s (%s, %s) on %s%s%s", config.size, config.freeze, config.init, device,
             " with bf16 autocast" if _autocasts(config, device) else "",
             ", compiled" if config.compile else "")
    step_model = compile_for_training(model) if config.compile else model
    eval_kw = {"batch_size": config.eval_batch_size}
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        stats = _train_epoch(config, step_model, split.train, epoch, optimizer, scheduler, meta,
                             device)
        val_pred = predict(model, split.val, meta, **eval_kw)
        metrics = _record_epoch(state, epoch, stats, val_pred, config.epochs)
        model_dirs = [out / f"epoch-{epoch}"] if epoch in config.report_epochs else []
        model_dirs += [out] if epoch == config.epochs else []
        if model_dirs:
            metrics.update(_write_report_dirs(model_dirs, model, split, meta, val_pred, config,
                                              summary, state, epoch, eval_kw))
        checkpoint_dir = save_train_state(
            out,
            epoch,
            train_state(model, optimizer, scheduler, config.to_dict(), state),
            keep=config.keep_checkpoints,
        )
        report = EpochReport(epoch, stats["train_loss"], metrics["val_mae"], checkpoint_dir,
                             metrics, model_dirs[-1] if model_dirs else None)
        for callback in callbacks:
            callback(report)
    return _result(out, config, summary)


def _open_data(config: TrainConfig) -> tuple[Split, dict[str, Any], dict[str, Any]]:
    """(split, its summary, the model's meta) of the shard generation the run pins: the one
    published now on a fresh run, recorded in `config.data_generation`."""
    shards = pinned_shards(config.data, config.data_generation, cache=config.cache)
    require_intact(shards)  # sizes and footers: a damaged set fails here, not mid-epoch
    config.data_generation = shards.generation
    split = open_split(shards, config.source, config.protocol, config.split_seed)
    summary = require_segments(split_summary(split), config.data)
    mean, std = (np.asarray(v, dtype=np.float64) for v in view_target_stats(split.train))
    meta = {**_target_meta(config, mean, std), "source": config.source,
            "protocol": config.protocol, "split": split.label}
    return split, summary, meta


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A closed form under LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): both
    # resume exactly, but torch's update the lr recursively (over 370 steps their lrs differ
    # from this closed form in all but 36-42 steps, by up to 1e-13 relative), take only whole
    # steps of warm-up (warmup_epochs is a float), keep the step counts they started with when a
    # run resumes on new data, and could not load the scheduler state of earlier checkpoints.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, config)
    )


def _start_state(config: TrainConfig, checkpoint: Path | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 allow_new_data: bool) -> dict[str, Any]:
    """The loop's state: fresh, or restored (model, optimiser, scheduler, RNGs) from
    `checkpoint` after checking it belongs to this run and its shard generation."""
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_mae": math.inf, "best_epoch": 0}
    if checkpoint is None:
        return state
    saved = load_train_state(checkpoint)
    check_same_generation(saved["config"].get("data_generation"), config.data_generation,
                          checkpoint, allow_new_data=allow_new_data)
    check_resumable(saved["config"], config.to_dict(), checkpoint,
                    total_dependent=config.schedule in TOTAL_DEPENDENT_SCHEDULES)
    state = restore_train_state(saved, model, optimizer, scheduler)
    log.info("resuming %s after epoch %d (%s)", config.out, state["epoch"], checkpoint)
    if state["epoch"] > config.epochs:
        raise BpfmError(f"{checkpoint}: epoch: checkpoint is at epoch {state['epoch']}, "
                        f"past the {config.epochs} epochs asked for")
    return state


def _record_epoch(state: dict[str, Any], epoch: int, stats: dict[str, float],
                  val_pred: Predictions, epochs: int) -> dict[str, Any]:
    """Adds the epoch to `state` (history, best validation MAE) and returns its metrics."""
    val_mae, val_sbp, val_dbp = mean_mae(val_pred)
    if val_mae < state["best_val_mae"]:
        state["best_val_mae"], state["best_epoch"] = val_mae, epoch
    record = {"epoch": epoch, **stats, "val_mae": val_mae, "val_sbp_mae": val_sbp,
              "val_dbp_mae": val_dbp, "best_val_mae": state["best_val_mae"]}
    state["history"].append(record)
    state["epoch"] = epoch
    log.info("epoch %d/%d  train_loss %.4f  val_mae %.2f mmHg (SBP %.2f, DBP %.2f)  "
             "%.0f samples/s", epoch, epochs, stats["train_loss"], val_mae, val_sbp, val_dbp,
             stats["samples_per_s"])
    return dict(record)


def _result(out: Path, config: TrainConfig, summary: dict[str, Any]) -> FitResult:
    payload = read_metrics(out)
    report_dirs = {e: out / f"epoch-{e}" for e in config.report_epochs}
    return FitResult(out, payload["epoch"], payload["test"], payload["val"], payload["history"],
                     summary, report_dirs)
