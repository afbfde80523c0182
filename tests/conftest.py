"""Shared fixtures: an isolated data root with the quick context-scenes data, generated once."""
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs two test processes (-n 2): each takes its share of the cores, as dispatched workers
# do (cac.exp.dispatch), and so do the runs it starts unless a test sets their threads itself. With
# torch's default, every core each, 2 cores carry 4 busy threads and both processes train slower.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_share)


@pytest.fixture(autouse=True)
def _sys_path_restored() -> Iterator[None]:
    """A test (or a benchmark script it imports) may put folders on ``sys.path``: undone after it."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory) -> Iterator[Path]:
    """cac's cache (the empty MLflow store new stores are copied from) in the session's folder, not
    the user's ~/.cache; jobs the tests start inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cac-cache")
        mp.setenv("CAC_CACHE_DIR", str(folder))
        yield folder


@contextlib.contextmanager
def data_env(root: Path) -> Iterator[Path]:
    """``CAC_DATA_ROOT`` is ``root`` inside, restored (or removed) after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAC_DATA_ROOT", str(root))
        yield root


@pytest.fixture(scope="session")
def quick_data(tmp_path_factory) -> Path:
    """A data root holding the quick context-scenes data, generated once for the session."""
    from cac.data import context_scenes

    root = tmp_path_factory.mktemp("cac-data")
    with data_env(root):
        context_scenes.ensure("quick", seed=0)
    return root


@pytest.fixture()
def data_root(quick_data: Path) -> Iterator[Path]:
    """``CAC_DATA_ROOT`` = the quick data, for this test only."""
    with data_env(quick_data):
        yield quick_data


@pytest.fixture(scope="module")
def module_data_root(quick_data: Path) -> Iterator[Path]:
    """``CAC_DATA_ROOT`` = the quick data while a module's tests (and its module fixtures) run."""
    with data_env(quick_data):
        yield quick_data


def enter_work(monkeypatch: pytest.MonkeyPatch, root: Path, work: Path) -> None:
    """Run in ``root`` with ``work`` as the runner's work dirs (``CAC_WORK_DIR`` and the runner's own
    ``WORK_ROOT``), as a user's later commands would find the runs the runner placed there."""
    import cac.exp.runner

    monkeypatch.chdir(root)
    monkeypatch.setenv("CAC_WORK_DIR", str(work))
    monkeypatch.setattr(cac.exp.runner, "WORK_ROOT", work)


@pytest.fixture()
def workspace(tmp_path, data_root, monkeypatch):
    """A clean working directory with its own work_dirs and MLflow SQLite store."""
    enter_work(monkeypatch, tmp_path, tmp_path / "work_dirs")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture()
def saved_figures(monkeypatch) -> dict:
    """``{file name: matplotlib Figure}`` of every figure saved during the test (still written as
    usual), so a test can check what was drawn, not only that a file exists."""
    from matplotlib.figure import Figure

    saved: dict = {}
    real = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[Path(str(fname)).name] = self
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved
