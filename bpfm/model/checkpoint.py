"""Model files: bpfm's own (safetensors + JSON meta, or torch with weights_only=True) and the
official CEReBrO Lightning `.ckpt` layout.

Official keys are `model.*` (encoder) and `model_head.mlp.0.fc.*` (head, rows [DBP, SBP]); bpfm's
are `encoder.*` and `head.fc.*` (rows [SBP, DBP]). `checkpoint_filter_fn` is the only place that
knows the difference.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.io import storage
from bpfm.model.bp_model import create_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"


@dataclass
class LoadReport:
    source: str
    format: str  # "safetensors" | "torch"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model parameters the file did not set
    unexpected: list[str] = field(default_factory=list)  # file keys the model has no place for
    skipped: list[str] = field(default_factory=list)  # file keys left out on purpose
    head_reordered: bool = False  # official [DBP, SBP] rows turned into [SBP, DBP]

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors ({self.format}), "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"skipped {len(self.skipped)}"
        ) + (", head reordered to [SBP, DBP]" if self.head_reordered else "")


# ---------------------------------------------------------------- official key mapping


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list[str], bool]:
    """Official CEReBrO keys -> bpfm keys: returns (state_dict, skipped keys, head reordered).

    `module.` (DataParallel) is stripped; the pretraining decoder is skipped; bpfm keys pass."""
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    reordered = False
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("model_head.decoder_pred."):
            skipped.append(key)
        elif key.startswith("model_head.mlp.0.fc."):
            if value.shape[0] == 2:  # [DBP, SBP] -> [SBP, DBP]
                value, reordered = value.flip(0), True
            out["head.fc." + key.removeprefix("model_head.mlp.0.fc.")] = value
        elif key.startswith("model."):
            out["encoder." + key.removeprefix("model.")] = value
        else:
            out[key] = value
    return out, skipped, reordered


def to_official_keys(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder state_dict -> official `model.*` keys (what `bpfm pretrain` writes)."""
    return {f"model.{k}": v for k, v in encoder_state.items()}


# ---------------------------------------------------------------- reading and writing bytes


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def read_bytes(uri: str | Path) -> bytes:
    """A local file, or any URI `bpfm.io.storage` understands (s3://)."""
    uri = str(uri)
    if _is_remote(uri):
        return storage.read_bytes(uri)
    try:
        return Path(uri.removeprefix("file://")).read_bytes()
    except OSError as err:
        raise BpfmError(f"{uri}: cannot read ({err.strerror or err})") from None


def safe_torch_load(file: str | Path | BinaryIO) -> object:
    """`torch.load(weights_only=True)` to CPU, without torch's warning about pickle protocols
    (the allow-listed unpickler reads the ones it supports and refuses the rest)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(file, map_location="cpu", weights_only=True)


def load_failure(file: str | Path, err: BaseException) -> BpfmError:
    """One short line for a file `safe_torch_load` or safetensors could not read. Never torch's
    own text: it advises `weights_only=False`, which would run whatever code the file holds."""
    blocked = re.search(r"GLOBAL (\S+)", str(err))  # torch names the global it refused
    if blocked:
        problem = (f"not a checkpoint: it holds Python code ({blocked.group(1)}) that a safe "
                   "load refuses to run")
    elif "central directory" in str(err) or isinstance(err, EOFError):
        problem = "corrupt checkpoint: truncated or damaged"
    else:
        problem = f"corrupt or not a checkpoint ({type(err).__name__})"
    return BpfmError(f"{file}: {problem}")


def _is_safetensors(data: bytes) -> bool:
    return len(data) > 9 and data[8:9] == b"{"


def _read_safetensors(uri: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, bpfm meta) through `safetensors.safe_open`, which opens files only: the bytes
    of a remote file go through a temporary one."""
    from safetensors import safe_open

    with ExitStack() as stack:
        path = uri.removeprefix("file://")
        if _is_remote(uri):
            temporary = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".safetensors"))
            temporary.write(data)
            temporary.flush()
            path = temporary.name
        with safe_open(path, framework="pt") as file:
            meta = json.loads((file.metadata() or {}).get("bpfm", "{}"))
            return {key: file.get_tensor(key) for key in file.keys()}, meta


def read_state(uri: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Any supported file -> (state_dict, meta, format). Corrupt files raise one-line errors."""
    data = read_bytes(uri)
    try:
        if _is_safetensors(data):
            return (*_read_safetensors(str(uri), data), "safetensors")
        obj = safe_torch_load(io.BytesIO(data))
    except Exception as err:  # safetensors, zip and unpickling errors have no common base
        raise load_failure(uri, err) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], obj.get("meta") or {}, "torch"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}, "torch"
    raise BpfmError(
        f"{uri}: state_dict: no tensors found (expected a state_dict or Lightning ckpt)"
    )


# ---------------------------------------------------------------- bpfm model files


def _jsonable(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def save_model(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Weights + meta (incl. the `create_model` spec) in one file, written atomically.

    `.safetensors` (default; a folder gets `model.safetensors`) or `.pt`/`.pth` (torch)."""
    path = str(path)
    if not path.endswith((".safetensors", ".pt", ".pth")):
        path = str(Path(path) / MODEL_FILE) if not _is_remote(path) else f"{path}/{MODEL_FILE}"
    meta = {"format": FORMAT_VERSION, "model": getattr(model, "spec", None), **(meta or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"bpfm": json.dumps(meta, default=_jsonable)})
    else:
        buffer = io.BytesIO()
        torch.save(
            {"state_dict": state, "meta": json.loads(json.dumps(meta, default=_jsonable))}, buffer
        )
        data = buffer.getvalue()
    storage.publish_bytes(str(path), data)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A model saved by `save_model` (a file, or a folder holding `model.safetensors`)."""
    path = str(path)
    if not _is_remote(path) and Path(path).is_dir():
        path = str(Path(path) / MODEL_FILE)
    state, meta, _ = read_state(path)
    spec = meta.get("model")
    if not isinstance(spec, dict):
        raise BpfmError(f"{path}: meta.model: not a bpfm model file (no model spec)")
    model = create_model(**spec, device="meta")
    _check_shapes(path, model.state_dict(), state)
    model = model.to_empty(device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BpfmError(f"{path}: state_dict: {str(err).splitlines()[-1].strip()}") from None
    return model, meta


def _check_shapes(source: str, target: Mapping[str, torch.Tensor], state: Mapping) -> None:
    for key, value in state.items():
        if key in target and tuple(target[key].shape) != tuple(value.shape):
            raise BpfmError(
                f"{source}: {key}: checkpoint shape {list(value.shape)} != model shape "
                f"{list(target[key].shape)} (a checkpoint of another model size?)"
            )


def load_pretrained_backbone(model: nn.Module, uri: str | Path) -> LoadReport:
    """Load encoder (and, when it fits, head) weights into a `BPModel` from an official
    Lightning `.ckpt`, a safetensors file or a bpfm file. Any encoder shape mismatch fails before
    a single tensor is copied; head tensors of another head kind are skipped and reported."""
    source = str(uri)
    if not _is_remote(source) and Path(source).is_dir():
        source = str(Path(source) / MODEL_FILE)
    raw, _, fmt = read_state(source)
    state, skipped, reordered = checkpoint_filter_fn(raw)
    target = model.state_dict()
    head_keys = [k for k in state if k.startswith("head.")]
    head_fits = all(k in target and target[k].shape == state[k].shape for k in head_keys)
    if not head_fits:
        skipped += head_keys
        reordered = False
        state = {k: v for k, v in state.items() if k not in head_keys}
    unexpected = [k for k in state if k not in target]
    state = {k: v for k, v in state.items() if k in target}
    _check_shapes(source, target, state)
    if not any(k.startswith("encoder.") for k in state):
        raise BpfmError(f"{source}: state_dict: no CEReBrO encoder weights (model.* keys) found")
    model.load_state_dict(state, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    report = LoadReport(
        source=source,
        format=fmt,
        loaded=sorted(state),
        missing=sorted(parameters - set(state)),
        unexpected=unexpected,
        skipped=skipped,
        head_reordered=reordered,
    )
    log.info(report.summary())
    if report.missing or report.unexpected:
        log.warning("%s: missing %s; unexpected %s", source, report.missing, report.unexpected)
    return report


# ---------------------------------------------------------------- sizes


def saved_size(obj: object) -> int:
    """Bytes `torch.save(obj)` writes, counted without keeping them."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.size


class _ByteCounter(io.RawIOBase):
    def __init__(self):
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.size += len(data)
        return len(data)
