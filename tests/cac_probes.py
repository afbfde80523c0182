"""A probe hook the end-to-end tests put into real training runs through a spec's ``overrides``::

    overrides:
      custom_imports: {imports: [cac_probes], allow_failed_imports: false}
      custom_hooks: [{type: ProbeHook, out_dir: /tmp/x, kill_at: 30}]

It records what only the training process can see (the iteration a run starts from, each DDP rank's
parameters, world size and the TrackingHook's final confusion matrix) into ``out_dir``, and can
SIGKILL its own process once at a chosen iteration, hold training until ``trainers`` processes have
started a run (so concurrent workers overlap for certain), or hold it once before a chosen iteration
(after the previous one's checkpoint) until the test has done what it must do to the process. ``tests/`` must be importable (pytest puts it on
``sys.path``; subprocesses get it through ``PYTHONPATH``, see :func:`probe_env`).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

TESTS_DIR = Path(__file__).resolve().parent

__all__ = ["ProbeHook", "probe_overrides", "probe_env", "start_iters", "rank_reports", "assert_steps_logged_once",
           "trainer_pids", "loaded_positions"]


def _param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes (not buffers: BN running stats are per rank under DDP)."""
    model = getattr(model, "module", model)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@HOOKS.register_module()
class ProbeHook(Hook):
    """Between the TrackingHook (LOW = 70) and the CheckpointHook (VERY_LOW = 90), so a kill at
    iteration N lands after N's metrics were logged and before N's checkpoint is written."""

    priority = 80

    def __init__(self, out_dir: str, kill_at: int = 0, kill_at_end: bool = False, trainers: int = 0,
                 wait_s: float = 300.0, hold_at: int = 0) -> None:
        self.out_dir, self.kill_at, self.kill_at_end = Path(out_dir), kill_at, kill_at_end
        self.hold_at = hold_at
        self.trainers, self.wait_s = trainers, wait_s
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._initial: Optional[str] = None

    @staticmethod
    def _rank() -> int:
        from mmengine.dist import get_rank

        return get_rank()

    def before_train(self, runner) -> None:
        # runner.iter here is where training really starts (after mmengine loaded any checkpoint)
        with open(self.out_dir / f"starts-rank{self._rank()}.txt", "a") as fh:
            fh.write(f"{runner.iter}\n")
        with open(self.out_dir / f"pids-rank{self._rank()}.txt", "a") as fh:
            fh.write(f"{runner.iter} {os.getpid()}\n")
        self._initial = _param_digest(runner.model)
        self._count_steps(runner)
        if self.trainers:
            self._rendezvous()

    def _count_steps(self, runner) -> None:
        """Count what really runs: each ``train_step`` call with its batch size (a micro-batch under
        gradient accumulation) and each optimizer step, by wrapping the real methods."""
        self.micro_batches: list[int] = []
        self.optimizer_steps = 0
        model, wrapper = runner.model, runner.optim_wrapper
        train_step, step = model.train_step, wrapper.step

        def counted_train_step(data, *args, **kwargs):
            self.micro_batches.append(len(data["inputs"]))
            return train_step(data, *args, **kwargs)

        def counted_step(*args, **kwargs):
            self.optimizer_steps += 1
            return step(*args, **kwargs)

        model.train_step, wrapper.step = counted_train_step, counted_step

    def _rendezvous(self) -> None:
        """Train only once ``trainers`` processes have each started a run (a file per process id):
        concurrent workers then overlap for certain, whatever the machine's speed. A process still
        alone after ``wait_s`` raises, so its trial fails with this message instead of hanging."""
        (self.out_dir / f"trainer-{os.getpid()}").touch()
        deadline = time.monotonic() + self.wait_s
        while len(trainer_pids(self.out_dir)) < self.trainers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ProbeHook: {len(trainer_pids(self.out_dir))} of {self.trainers} trainers "
                                   f"started within {self.wait_s} s")
            time.sleep(0.2)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        """``hold_at``: once, before iteration ``hold_at`` + 1 (iteration ``hold_at``'s checkpoint and
        evaluations are done), write ``held`` and wait for a ``release`` file, at most ``wait_s``: a
        test signals or cancels the process there, however fast it trains."""
        held = self.out_dir / "held"
        if self.hold_at and runner.iter == self.hold_at and not held.exists():
            held.touch()
            deadline = time.monotonic() + self.wait_s
            while not (self.out_dir / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        marker = self.out_dir / "killed"
        if self.kill_at and runner.iter + 1 == self.kill_at and not marker.exists():
            marker.touch()  # once: the resumed run passes this iteration again
            os.kill(os.getpid(), signal.SIGKILL)

    def after_train(self, runner) -> None:
        marker = self.out_dir / "killed"
        if self.kill_at_end and not marker.exists():
            # the final checkpoint is written (at the last iteration), the run not yet marked FINISHED
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        from mmengine.dist import get_world_size

        from cac.mmseg.hooks import TrackingHook

        tracking = [h for h in runner.hooks if isinstance(h, TrackingHook)]
        conf = tracking[0].final_confusion if tracking else None
        report = {"rank": self._rank(), "world_size": get_world_size(), "runner_world_size": runner.world_size,
                  "iter": runner.iter, "initial_params": self._initial, "params": _param_digest(runner.model),
                  "final_confusion": None if conf is None else conf.tolist(),
                  "micro_batches": self.micro_batches, "optimizer_steps": self.optimizer_steps}
        (self.out_dir / f"rank{self._rank()}.json").write_text(json.dumps(report))


def probe_overrides(out_dir: Path, kill_at: int = 0, kill_at_end: bool = False, trainers: int = 0,
                    wait_s: float = 300.0, hold_at: int = 0) -> str:
    """The spec ``overrides`` lines (YAML, two-space indented) that put a ProbeHook into a run."""
    return ("  custom_imports: {imports: [cac_probes], allow_failed_imports: false}\n"
            f"  custom_hooks: [{{type: ProbeHook, out_dir: '{out_dir}', kill_at: {kill_at}, "
            f"kill_at_end: {str(kill_at_end).lower()}, trainers: {trainers}, wait_s: {wait_s}, "
            f"hold_at: {hold_at}}}]\n")


# A one-row spec of 12 iterations (val and checkpoint every 4): the outage tests' run, held at
# iteration 4 by a ProbeHook (``{extra}``: the probe_overrides lines) while the test stops a server.
HELD_RUN_SPEC = """
title: {title}
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 12
  train_cfg.val_interval: 4
  default_hooks.checkpoint.interval: 4
  cac_curve.points: 3
{extra}rows:
  - {{label: "(f)", description: full CAC, cac: true}}
"""


# Every sample a training process (or its dataloader workers) reads, by its position in the sample
# stream, appended to $CAC_PROBE_LOADS as "pid parent-pid position": what a resumed process loaded,
# replayed or not, whatever it logs. Patched when the runner imports this module (custom_imports),
# before any dataloader worker forks.
LOADS_ENV = "CAC_PROBE_LOADS"


def _record_loads(path: str) -> None:
    from cac.mmseg.loops import PositionSeededDataset, StreamKey

    real = PositionSeededDataset.__getitem__

    def recorded(self, key):
        if isinstance(key, StreamKey):
            with open(path, "a") as fh:
                fh.write(f"{os.getpid()} {os.getppid()} {key.position}\n")
        return real(self, key)

    PositionSeededDataset.__getitem__ = recorded


if os.environ.get(LOADS_ENV):
    _record_loads(os.environ[LOADS_ENV])


def loaded_positions(out_dir: Path, loads: Path, start_iter: int, rank: int = 0) -> list[int]:
    """Sample-stream positions read by the training process that started at ``start_iter`` (its own
    reads and its dataloader workers'), from the ``$CAC_PROBE_LOADS`` file ``loads``."""
    pids = [int(pid) for it, pid in (line.split() for line in (Path(out_dir) / f"pids-rank{rank}.txt").read_text()
                                      .splitlines()) if int(it) == start_iter]
    rows = [line.split() for line in Path(loads).read_text().splitlines()] if Path(loads).is_file() else []
    return [int(pos) for pid, ppid, pos in rows if int(pid) in pids or int(ppid) in pids]


def trainer_pids(out_dir: Path) -> set[int]:
    """Process ids of the runs that reached the ProbeHook's rendezvous (``trainers``)."""
    return {int(p.name.split("-", 1)[1]) for p in Path(out_dir).glob("trainer-*")}


def probe_env(env: dict) -> dict:
    """``env`` with ``tests/`` on PYTHONPATH, so a subprocess's runner can import this module."""
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)}


def start_iters(out_dir: Path, rank: int = 0) -> list[int]:
    """The iteration each training process of the run started from, in order."""
    return [int(line) for line in (out_dir / f"starts-rank{rank}.txt").read_text().split()]


def rank_reports(out_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))}


def assert_steps_logged_once(client, run_id: str) -> None:
    """Every metric of an MLflow run has each step at most once (a resumed run must not log a step again)."""
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
