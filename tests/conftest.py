"""Shared fixtures: an isolated data root with the quick context-scenes data, generated once."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """``CAC_DATA_ROOT`` for the whole session, holding the quick data (generated once)."""
    from cac.data import context_scenes

    root = tmp_path_factory.mktemp("cac-data")
    os.environ["CAC_DATA_ROOT"] = str(root)
    context_scenes.ensure("quick", seed=0)
    return root


@pytest.fixture()
def workspace(tmp_path, data_root, monkeypatch):
    """A clean working directory with its own work_dirs and MLflow SQLite store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work_dirs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import cac.exp.runner

    monkeypatch.setattr(cac.exp.runner, "WORK_ROOT", tmp_path / "work_dirs")
    return tmp_path
