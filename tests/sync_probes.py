"""A barrier hook for tests of concurrent workers: each training process waits in ``before_train``
until ``parties`` training processes have reached it (one file each under ``out_dir``), so a test
knows every worker trains a trial at the same time, whatever the machine's speed::

    overrides:
      custom_imports: {imports: [sync_probes], allow_failed_imports: false}
      custom_hooks: [{type: BarrierHook, out_dir: /tmp/x, parties: 2}]

Jobs import it through ``PYTHONPATH`` (``tests/``), as for ``cac_probes``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ["BarrierHook", "barrier_overrides"]


@HOOKS.register_module()
class BarrierHook(Hook):
    def __init__(self, out_dir: str, parties: int = 2, timeout_s: float = 300.0) -> None:
        self.out_dir, self.parties, self.timeout_s = Path(out_dir), parties, timeout_s

    def before_train(self, runner) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / str(os.getpid())).touch()
        deadline = time.time() + self.timeout_s
        while len(list(self.out_dir.iterdir())) < self.parties:
            if time.time() > deadline:
                raise RuntimeError(f"BarrierHook: {self.parties} training processes never met in {self.out_dir}")
            time.sleep(0.1)


def barrier_overrides(out_dir: Path, parties: int = 2) -> str:
    """The spec ``overrides`` lines (YAML, two-space indented) that put a BarrierHook into a run."""
    return ("  custom_imports: {imports: [sync_probes], allow_failed_imports: false}\n"
            f"  custom_hooks: [{{type: BarrierHook, out_dir: '{out_dir}', parties: {parties}}}]\n")
