"""Fixtures of the report tests: an MLflow store (sqlite, real client) holding planted runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.planted import plant_study


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """(tracking URI, trial name -> run id) of a store with the planted study `planted` and an
    experiment `empty` that has no runs."""
    root: Path = tmp_path_factory.mktemp("planted-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, plant_study(uri, root / "artifacts")
