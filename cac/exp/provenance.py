"""What a run was made with: the versions of the stack (and whether mmcv's ops are compiled), the
device, and the source tree (commit, branch, uncommitted changes), recorded in MLflow's own fields
where it has them, so its UI shows them: the ``mlflow.source.*`` tags (the runs table's Source
column), the data as a run input (its Dataset column), and the experiment's kind (a training
experiment, not the GenAI overview). Everything else is an ``env.*`` tag; reports compare them.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Optional

__all__ = ["EXPERIMENT_TAGS", "PACKAGES", "versions", "device", "source_tree", "run_tags", "dataset_input",
           "version_spread"]

# MLflow 3 shows an experiment whose kind it cannot infer as a GenAI one; these are training runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
PACKAGES = {"torch": "torch", "mmcv": "mmcv", "mmseg": "mmsegmentation", "mmengine": "mmengine", "mlflow": "mlflow",
            "cac": "cac"}
_ROOT = Path(__file__).resolve().parents[2]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """``env.<name>`` of each package of the stack, Python's, and ``env.mmcv_ops``: whether mmcv was
    built with its compiled ops (mmseg needs them; mmcv-lite has none)."""
    out = {f"env.{name}": _version(package) for name, package in PACKAGES.items()}
    out["env.python"] = platform.python_version()
    try:
        compiled = importlib.util.find_spec("mmcv._ext") is not None
    except ImportError:
        compiled = False
    out["env.mmcv_ops"] = "compiled" if compiled else "missing"
    return out


def device() -> dict[str, str]:
    """The device a process trains on (the first GPU's name, or the CPU), CUDA's and cuDNN's versions."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        count = torch.cuda.device_count()
        return {"env.device": f"{name}" + (f" x{count}" if count > 1 else ""), "env.cuda": str(torch.version.cuda),
                "env.cudnn": str(torch.backends.cudnn.version())}
    cpu = platform.processor() or platform.machine()
    return {"env.device": f"cpu ({cpu}, {torch.get_num_threads()} threads)", "env.cuda": "none", "env.cudnn": "none"}


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tree() -> dict[str, str]:
    """The checkout cac runs from: commit, branch and whether its files differ from it (changed tracked
    files, or files it does not track and does not ignore; MLflow's ``mlflow.source.git.*`` tags);
    nothing when cac is not installed from a git checkout.

    Read once per process (the first run it tracks): a process keeps the code it imported, so a run
    it starts after a commit or an edit of the checkout still ran the code of the first reading."""
    return dict(_source_tree())


@functools.lru_cache(maxsize=None)
def _source_tree() -> tuple[tuple[str, str], ...]:
    return tuple(_read_source_tree().items())


def _read_source_tree() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    out = {"mlflow.source.git.commit": commit}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        out["mlflow.source.git.branch"] = branch
    # untracked files count: a new module the code imports (or a config beside it) is not in the commit;
    # what .gitignore names (data, work dirs, stores, reports) does not
    status = _git("status", "--porcelain", "--untracked-files=normal")
    out["mlflow.source.git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    remote = _git("remote", "get-url", "origin")
    if remote:  # a clone made with a token keeps it in its remote (https://user:TOKEN@host/...)
        from cac.exp.credentials import public_url

        out["mlflow.source.git.repoURL"] = public_url(remote)
    return out


def run_tags(entry_point: str = "cac-exp") -> dict[str, str]:
    """Every provenance tag of a run: MLflow's source tags, the versions and the device."""
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": entry_point, **source_tree(), **versions(),
            **device()}


def dataset_input(name: str, version: str, root: Optional[str], context: str = "training"):
    """The data a run trains on as an MLflow dataset input (the runs table's Dataset column): named
    by the dataset, digested by its version (a generator's, a subset's), sourced at its root."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = hashlib.sha256(version.encode()).hexdigest()[:8]
    data = Dataset(name=name, digest=digest, source_type="local", source=str(root or ""))
    return DatasetInput(dataset=data, tags=[InputTag(key="mlflow.data.context", value=context)])


def version_spread(tag_sets: Iterable[tuple[str, Mapping[str, str]]]) -> list[str]:
    """For ``(row label, run tags)`` pairs: one line per ``env.*`` tag (device included) or source
    commit on which the rows differ, naming which rows had which value; empty when they agree."""
    seen: dict[str, dict[str, list[str]]] = {}
    for label, tags in tag_sets:
        for key, value in tags.items():
            if key.startswith("env.") or key == "mlflow.source.git.commit":
                seen.setdefault(key, {}).setdefault(value, [])
                if label not in seen[key][value]:
                    seen[key][value].append(label)
    lines = []
    for key, values in sorted(seen.items()):
        if len(values) > 1:
            parts = "; ".join(f"{value[:12] if key.endswith('commit') else value} in {', '.join(rows)}"
                              for value, rows in sorted(values.items()))
            lines.append(f"{key.replace('env.', '').replace('mlflow.source.git.', 'git ')}: {parts}")
    return lines
