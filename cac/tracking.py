"""MLflow bookkeeping: one experiment per spec, one run per row x seed x preset, found again by tags.

A run is identified by the tags ``spec``, ``row``, ``seed``, ``preset`` and ``config_hash`` (the
resolved config). FINISHED runs are never redone; an unfinished one is reopened and resumed, so each
row x seed ends with exactly one FINISHED run.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["resolve_tracking_uri", "RunTracker", "find_runs", "flatten", "git_commit"]

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    return uri


_READY: set[str] = set()


def _client(uri: str):
    import mlflow

    if uri.startswith("sqlite:///") and uri not in _READY:
        _init_sqlite_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def _init_sqlite_store(uri: str) -> None:
    """Create/migrate a SQLite store under a file lock: two processes (parallel sweeps) racing on a
    new database's schema would otherwise fail with 'duplicate column'."""
    import fcntl
    import logging

    import mlflow

    for name in ("mlflow", "alembic"):  # schema-creation chatter is not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    _READY.add(uri)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists to ``a.b.0.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(obj)[:6000]
    return out


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def find_runs(uri: str, experiment: str, tags: Mapping[str, Any], statuses: Optional[list[str]] = None) -> list:
    """Runs of ``experiment`` whose tags equal ``tags`` (optionally with one of ``statuses``)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)
    return [r for r in runs if statuses is None or r.info.status in statuses]


class RunTracker:
    """A thin handle on one MLflow run (the client API, so nested processes cannot collide)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    @classmethod
    def open(cls, uri: str, experiment: str, tags: Mapping[str, Any], name: str) -> "RunTracker":
        client = _client(uri)
        run = client.create_run(experiment_id(uri, experiment), tags={k: str(v) for k, v in tags.items()},
                                run_name=name)
        return cls(uri, run.info.run_id)

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v == v]  # NaN skipped
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path, subdir: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
