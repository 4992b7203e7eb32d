"""Where the embedded default keeps its state: everything lives under one folder, `.bpfm/`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The embedded default's root folder (`BPFM_HOME`, else `./.bpfm`)."""
    return Path(os.environ.get("BPFM_HOME", ".bpfm")).absolute()


def tracking_uri() -> str:
    """MLflow tracking URI: `MLFLOW_TRACKING_URI`, else a sqlite store under the home folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"
