"""Loading checkpoints without running code from them.

A ``.pth`` file is a pickle: unpickling it in full can run any code its author put in it. torch's
weights-only unpickler refuses everything but tensors and plain containers; an mmengine training
checkpoint also holds the message hub (``HistoryBuffer`` objects with numpy arrays and bound statistic
methods) and numpy scalars, and mmseg 0.x checkpoints hold their class names and palette. Those few
types are allowlisted here, with a ``getattr`` that only hands out ``HistoryBuffer``'s statistic
methods, so every checkpoint mmengine or mmseg writes loads weights-only.

A file that still needs full unpickling is refused with one line, unless it is trusted: a run
resuming from its own work dir (:func:`trusted_dir`), or the user's explicit ``--trust-checkpoint``
(:func:`trust_all`). cac registers this loader for local paths and http(s) URLs in mmengine's
``CheckpointLoader``, so ``load_from``, ``resume`` and ``load_checkpoint`` all go through it.
"""
from __future__ import annotations

import _codecs
import contextlib
import os.path as osp
import pickle
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from cac.errors import CacError

__all__ = ["UntrustedCheckpointError", "load_checkpoint_file", "load_url_checkpoint", "trusted_dir", "trust_all",
           "SAFE_GLOBALS"]

_HISTORY_STATISTICS = frozenset({"min", "max", "mean", "current"})
_trusted_dirs: list[Path] = []
_trust_everything = False


class UntrustedCheckpointError(CacError):
    """A checkpoint that cannot be loaded without running code from it."""


def _history_getattr(obj: Any, name: str) -> Any:
    """The one use of ``getattr`` in mmengine checkpoints: a HistoryBuffer's statistic methods."""
    if (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) and name in _HISTORY_STATISTICS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed")


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "bool")]
    return [np.dtype, np.ndarray, core.multiarray._reconstruct, core.multiarray.scalar, *dtypes]


SAFE_GLOBALS: list = [HistoryBuffer, _codecs.encode, (_history_getattr, "builtins.getattr"), *_numpy_globals()]


def _is_trusted(path: Path) -> bool:
    path = path.resolve()
    return _trust_everything or any(path.is_relative_to(d) for d in _trusted_dirs)


@contextlib.contextmanager
def trusted_dir(directory: Path | str) -> Iterator[None]:
    """Within the block, files under ``directory`` (a run's own work dir) may be unpickled in full."""
    entry = Path(directory).resolve()
    _trusted_dirs.append(entry)
    try:
        yield
    finally:
        _trusted_dirs.remove(entry)


@contextlib.contextmanager
def trust_all(enabled: bool = True) -> Iterator[None]:
    """``--trust-checkpoint``: the user vouches for the files loaded within the block."""
    global _trust_everything
    previous, _trust_everything = _trust_everything, _trust_everything or enabled
    try:
        yield
    finally:
        _trust_everything = previous


def load_checkpoint_file(filename: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` weights-only with :data:`SAFE_GLOBALS`; in full only when trusted."""
    path = Path(osp.expanduser(str(filename)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} can not be found.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_trusted(path):
            reason = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln
                           or "Unsupported global" in ln or "not allowed" in ln), "it holds objects beyond weights")
            raise UntrustedCheckpointError(
                f"{path}: refused, loading it would run code from the file ({reason[:160]}); "
                "pass --trust-checkpoint only if you trust where it came from") from None
    return torch.load(path, map_location=map_location, weights_only=False)


@CheckpointLoader.register_scheme(prefixes="", force=True)
def load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    return load_checkpoint_file(filename, map_location)


@CheckpointLoader.register_scheme(prefixes=("http://", "https://"), force=True)
def load_url_checkpoint(filename: str, map_location: Any = None, model_dir: str | None = None) -> Any:
    """Download once into torch hub's cache (as mmengine does), then load it as any untrusted file."""
    from torch.hub import download_url_to_file, get_dir

    cache = Path(model_dir or Path(get_dir()) / "checkpoints")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(filename.split("?")[0]).name
    if not target.is_file():
        try:
            download_url_to_file(filename, str(target), progress=False)
        except OSError as err:
            raise CacError(f"cannot download {filename} ({err}); with no network, download it elsewhere and "
                           "pass the local file, or use --no-pretrained") from None
    return load_checkpoint_file(target, map_location)
