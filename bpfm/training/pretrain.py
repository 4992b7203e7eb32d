"""SimMIM masked-patch pretraining of the CEReBrO encoder on multi-channel EEG-like windows.

Per sample, `mask_ratio` of the tokens are swapped for `mask_token` before the positional
encodings are added; the whole sequence is encoded and a `decoder_pred` Linear(D, patch) predicts
each patch's raw samples. Loss: smooth-L1 averaged over masked tokens + `visible_weight` x the
average over visible ones (the TimeFM `ReconstructionNorm` defaults). The result is a
Lightning-style `.ckpt` in the official key layout (`model.*`, `model_head.decoder_pred.*`), which
`load_pretrained_backbone` (and so `bpfm train --init pretrained`) loads.

Windows are z-scored per channel; inputs are EDF files, `.npz` or Parquet windows, or generated
EEG-like signals (`eeg=None`).

In-domain pretraining (`data=` a shard set, with `source` and `protocol`): SimMIM on the ECG + PPG
windows ([2, 1250], 19 patches) of that protocol's *train view* only: no labels are read into the
loss, and validation and test windows are never loaded, so a backbone built this way leaks nothing
of the subjects it is later tested on. Batches stream from the shards (memory stays bounded for
PulseDB's millions of windows), reshuffled per pass. `init_checkpoint` continues from an earlier
backbone (e.g. the EEG one): encoder weights load with shape checks (positional encodings cover
both layouts), the decoder when it fits.
"""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import edfio
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bpfm.data.loader import ShardDataset
from bpfm.data.splits import View
from bpfm.devices import resolve_device
from bpfm.errors import BpfmError, DataError
from bpfm.io import storage
from bpfm.model.bp_model import init_xavier
from bpfm.model.cerebro import CerebroEncoder, size_config
from bpfm.model.checkpoint import read_bytes, read_state, to_official_keys
from bpfm.training.evaluate import open_split
from bpfm.training.predict import WINDOW_SHAPE

log = logging.getLogger(__name__)

EEG_SUFFIXES = (".edf", ".npz", ".parquet")


@dataclass
class PretrainConfig:
    out: str
    size: str = "small"
    eeg: str | None = None  # file or folder of .edf/.npz/.parquet; None = synthetic EEG
    steps: int = 1000
    channels: int = 8
    window: int = 1280  # samples per window: 20 patches of 64
    sample_rate: float = 125.0  # EDF signals are resampled to this (the ECG/PPG rate)
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    visible_weight: float = 0.1
    seed: int = 42
    device: str = "auto"
    log_every: int = 50
    synthetic_windows: int = 1024
    data: str | None = None  # shard set URI: in-domain ECG+PPG pretraining on its train view
    source: str = "mimic"
    protocol: str = "paper"
    split_seed: int = 42
    init_checkpoint: str | None = None  # continue from this backbone instead of xavier


@dataclass
class PretrainResult:
    out: str
    steps: int
    windows: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(repr=False, default_factory=list)
    subjects: list[str] = field(repr=False, default_factory=list)  # subjects read (shards only)


class PretrainModel(nn.Module):
    """Encoder + per-token reconstruction head (`decoder_pred`, as in the official ckpt)."""

    def __init__(self, encoder: CerebroEncoder):
        super().__init__()
        self.encoder = encoder
        self.decoder_pred = nn.Linear(encoder.config.dim, encoder.config.patch_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, T] and mask [B, C, P] -> predicted patches [B, C, P, patch]."""
        b, c, p = mask.shape
        return self.decoder_pred(self.encoder(x, mask)).view(b, c, p, -1)


def random_mask(
    shape: tuple[int, int, int], ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Bool [B, C, P]: exactly round(ratio * C * P) tokens per sample hidden (at least one
    hidden and one visible when there are two tokens or more)."""
    b, c, p = shape
    n = c * p
    hidden = min(max(round(ratio * n), 1), max(n - 1, 1))
    ranks = torch.rand(b, n, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < hidden).view(b, c, p)


def simmim_loss(
    pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, visible_weight: float
) -> torch.Tensor:
    """Smooth-L1 per token, mean over hidden tokens + `visible_weight` x mean over visible."""
    b, c, p, patch = pred.shape
    target = x[..., : p * patch].reshape(b, c, p, patch)
    per_token = F.smooth_l1_loss(pred.float(), target, reduction="none").mean(dim=-1)
    hidden = mask.float()
    masked = (per_token * hidden).sum() / hidden.sum().clamp(min=1.0)
    visible = (per_token * (1 - hidden)).sum() / (1 - hidden).sum().clamp(min=1.0)
    return masked + visible_weight * visible


# ---------------------------------------------------------------- data


def synthetic_eeg(n: int, channels: int, samples: int, sample_rate: float, seed: int) -> np.ndarray:
    """EEG-like windows [n, C, T]: theta/alpha/beta oscillators with slowly varying amplitude,
    mixed into correlated channels, plus 1/f background per channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    bands = [(4.0, 7.0), (8.0, 12.0), (13.0, 30.0)]
    sources = []
    for low, high in bands:
        freq = rng.uniform(low, high, (n, 1))
        envelope = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5, (n, 1)) * t)
        sources.append(envelope * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (n, 1))))
    mixing = rng.normal(0.0, 1.0, (n, channels, len(bands)))  # shared sources -> correlation
    signal = np.einsum("ncs,nst->nct", mixing, np.stack(sources, axis=1))
    spectrum = np.fft.rfft(rng.normal(size=(n, channels, samples)), axis=-1)
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(samples, 1 / sample_rate), 0.5))
    signal += 2.0 * np.fft.irfft(spectrum, n=samples, axis=-1) / np.sqrt(samples / 64)
    return signal.astype(np.float32)


def read_edf(data: bytes, name: str) -> list[tuple[str, float, np.ndarray]]:
    """EDF/EDF+ (read by edfio): [(label, sample rate, physical values)] for every ordinary
    signal (annotation channels left out)."""
    try:
        # latin-1: headers written by clinical software carry non-ASCII labels and names
        edf = edfio.read_edf(data, lazy_load_data=False, header_encoding="latin-1")
        return [(s.label, float(s.sampling_frequency), s.data) for s in edf.signals]
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise DataError(name, "header", f"not an EDF file ({err})") from None


def _resample(signal: np.ndarray, rate: float, target: float) -> np.ndarray:
    if abs(rate - target) < 1e-6:
        return signal
    times = np.arange(int(len(signal) * target / rate)) / target
    return np.interp(times, np.arange(len(signal)) / rate, signal)


def _cut(continuous: np.ndarray, window: int) -> np.ndarray:
    """[C, T] -> non-overlapping windows [N, C, window]."""
    n = continuous.shape[1] // window
    return continuous[:, : n * window].reshape(continuous.shape[0], n, window).transpose(1, 0, 2)


def _windows_from_file(path: str, config: PretrainConfig) -> np.ndarray:
    data = read_bytes(path)
    if path.endswith(".edf"):
        signals = read_edf(data, path)
        rates = [rate for _, rate, _ in signals]
        common = max(set(rates), key=rates.count) if rates else 0.0
        chosen = [s for _, rate, s in signals if rate == common][: config.channels]
        if len(chosen) < config.channels:
            raise DataError(
                path, "signals", f"{len(chosen)} signals at one rate, need {config.channels}"
            )
        return _cut(
            np.stack([_resample(s, common, config.sample_rate) for s in chosen]), config.window
        )
    if path.endswith(".npz"):
        arrays = np.load(io.BytesIO(data))
        array = arrays["x"] if "x" in arrays.files else arrays[arrays.files[0]]
    else:
        import pyarrow.parquet as pq

        column = pq.read_table(io.BytesIO(data), columns=["x"]).column("x")
        array = np.array(column.to_pylist(), dtype=np.float32)  # rows of [C][T]
    if array.ndim == 2:
        array = _cut(array, config.window)
    if array.ndim != 3 or array.shape[1] < config.channels or array.shape[2] < config.window:
        raise DataError(
            path,
            "x",
            f"shape {list(array.shape)}: need [N, >={config.channels}, "
            f">={config.window}] windows or [C, T] continuous",
        )
    return array[:, : config.channels, : config.window]


def load_windows(config: PretrainConfig) -> np.ndarray:
    """All pretraining windows [N, C, window], z-scored per window and channel."""
    if config.eeg is None:
        windows = synthetic_eeg(
            config.synthetic_windows,
            config.channels,
            config.window,
            config.sample_rate,
            config.seed,
        )
    else:
        root = Path(config.eeg)
        paths = (
            [str(p) for p in sorted(root.rglob("*")) if p.suffix in EEG_SUFFIXES]
            if root.is_dir()
            else [config.eeg]
        )
        if not paths:
            raise DataError(config.eeg, "files", f"no {'/'.join(EEG_SUFFIXES)} files found")
        windows = np.concatenate([_windows_from_file(p, config) for p in paths]).astype(np.float32)
        if not len(windows):
            raise DataError(config.eeg, "signals", f"shorter than one window of {config.window}")
        if not np.isfinite(windows).all():
            raise DataError(config.eeg, "signals", "contain NaN or infinite samples")
    mean = windows.mean(axis=-1, keepdims=True)
    std = windows.std(axis=-1, keepdims=True)
    return (windows - mean) / np.maximum(std, 1e-6)


# ---------------------------------------------------------------- training


def _check(config: PretrainConfig, patches: int) -> None:
    if config.steps < 1 or config.batch_size < 1:
        raise BpfmError("pretrain: --steps and --batch-size must be at least 1")
    if not 0.0 < config.mask_ratio < 1.0:
        raise BpfmError(f"pretrain: mask ratio {config.mask_ratio} not in (0, 1)")
    if not 1 <= config.channels <= 64 or not 1 <= patches <= 100:
        raise BpfmError(
            f"pretrain: {config.channels} channels x {patches} patches; the model "
            "takes 1..64 channels and 1..100 patches of 64 samples"
        )


def shard_view(config: PretrainConfig) -> View:
    """The train view of `config.data` for `source` and `protocol`: the only windows in-domain
    pretraining reads."""
    return open_split(config.data, config.source, config.protocol, config.split_seed).train


def _shard_batches(config: PretrainConfig, view: View, subjects: set[str]):
    """Endless [B, 2, 1250] z-scored batches of the view, reshuffled per pass (seeded by pass);
    the subjects read are added to `subjects`."""
    dataset = ShardDataset(view, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                           normalize=True, with_meta=True)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        empty = True
        for batch in dataset:
            empty = False
            subjects.update(batch["subject"])
            yield batch["x"]
        if empty:
            raise DataError(config.data, "train view", f"{view.describe()}: no windows")


def _array_batches(config: PretrainConfig, windows: np.ndarray, generator: torch.Generator):
    while True:
        index = torch.randint(len(windows), (config.batch_size,), generator=generator).numpy()
        yield torch.from_numpy(windows[index])


def load_init_checkpoint(model: PretrainModel, uri: str) -> None:
    """Encoder (and decoder, when its shape fits) of an earlier backbone into `model`."""
    raw, _, _ = read_state(uri)
    target = model.state_dict()
    state = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key.startswith("model."):
            state["encoder." + key.removeprefix("model.")] = value
        elif key.startswith("model_head.decoder_pred."):
            name = "decoder_pred." + key.removeprefix("model_head.decoder_pred.")
            if name in target and target[name].shape == value.shape:
                state[name] = value
        elif key.startswith("encoder."):
            state[key] = value
    if not any(k.startswith("encoder.") for k in state):
        raise BpfmError(f"{uri}: state_dict: no CEReBrO encoder weights (model.* keys) found")
    for key, value in state.items():
        if key not in target or target[key].shape != value.shape:
            shape = list(target[key].shape) if key in target else "absent"
            raise BpfmError(f"{uri}: {key}: shape {list(value.shape)} does not fit {shape} "
                            f"(another model size?)")
    model.load_state_dict(state, strict=False)
    log.info("continuing from %s (%d tensors)", uri, len(state))


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run SimMIM pretraining and write the checkpoint to `config.out` (atomically)."""
    if config.data is not None:  # ECG + PPG windows as the shards hold them
        config = replace(config, channels=WINDOW_SHAPE[0], window=WINDOW_SHAPE[1])
    encoder_config = size_config(config.size)
    patches = config.window // encoder_config.patch_size
    _check(config, patches)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    subjects: set[str] = set()
    batches, n_windows, what = _window_batches(config, generator, subjects)
    device = resolve_device(config.device)
    model = init_xavier(PretrainModel(CerebroEncoder(encoder_config)))
    if config.init_checkpoint:
        load_init_checkpoint(model, config.init_checkpoint)
    model = model.to(device)
    log.info("pretraining %s on %s [%d x %d] for %d steps on %s", config.size, what,
             config.channels, config.window, config.steps, device)
    started = time.perf_counter()
    losses = _simmim_steps(model, batches, config, patches, generator, device, started)
    save_pretrain_checkpoint(config.out, model, config, losses)
    return PretrainResult(
        out=config.out,
        steps=config.steps,
        windows=n_windows,
        first_loss=losses[0],
        last_loss=float(np.mean(losses[-max(1, min(10, len(losses) // 5)) :])),
        seconds=time.perf_counter() - started,
        losses=losses,
        subjects=sorted(subjects),
    )


def _window_batches(config: PretrainConfig, generator: torch.Generator,
                    subjects: set[str]) -> tuple[Iterator[torch.Tensor], int, str]:
    """(endless batches, windows they draw from, those windows described for the log): the
    shard set's train view, or EEG-like windows from files or generated."""
    if config.data is not None:
        from bpfm.data.loader import view_size

        view = shard_view(config)
        n_windows = view_size(view)
        batches = _shard_batches(config, view, subjects)
        return batches, n_windows, f"{n_windows} ECG+PPG windows of {view.describe()}"
    windows = load_windows(config)
    return _array_batches(config, windows, generator), len(windows), f"{len(windows)} windows"


def _simmim_steps(model: PretrainModel, batches: Iterator[torch.Tensor], config: PretrainConfig,
                  patches: int, generator: torch.Generator, device: torch.device,
                  started: float) -> list[float]:
    """`config.steps` AdamW steps (linear warmup over the first 10 %, at most 100 steps) of the
    SimMIM loss; the loss of every step. `started` is when the run began, for the logged rate."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, min(100, config.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        x = next(batches).to(device)
        mask = random_mask((x.shape[0], config.channels, patches), config.mask_ratio, generator)
        mask = mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x, mask)
        loss = simmim_loss(pred, x, mask, config.visible_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            rate = step * config.batch_size / (time.perf_counter() - started)
            log.info(
                "step %d/%d loss %.4f (%.0f windows/s)",
                step,
                config.steps,
                float(np.mean(losses[-config.log_every :])),
                rate,
            )
    return losses


def save_pretrain_checkpoint(
    out: str, model: PretrainModel, config: PretrainConfig, losses: list[float]
) -> None:
    """Lightning-style `.ckpt` (plain tensors and builtins, so weights_only loading works)."""
    state = to_official_keys(model.encoder.state_dict())
    state.update(
        {f"model_head.decoder_pred.{k}": v for k, v in model.decoder_pred.state_dict().items()}
    )
    checkpoint = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "epoch": 0,
        "global_step": config.steps,
        "hyper_parameters": asdict(config),
        "bpfm": {
            "kind": "simmim_pretrain",
            "size": asdict(size_config(config.size)),
            "final_loss": losses[-1],
        },
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    storage.publish_bytes(str(out), buffer.getvalue())
    log.info("wrote %s", out)
