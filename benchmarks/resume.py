"""Time to the first resumed iteration: cac's train loop (moves the sampler) vs mmengine's
``IterBasedTrainLoop`` (replays the data: "Advance dataloader N steps").

    flock /tmp/cac-cpu.lock .venv/bin/python benchmarks/resume.py [--iters 10 2000] [--repeats 3] [--workers 0]

A quick-sized config (``fcn-slim-r18`` + CAC on the generated quick data, batch 8, 64 px) trains one
iteration and saves a checkpoint; its ``meta.iter`` is then rewritten to each k, and a Runner
resumes from it with each loop and trains one iteration. Printed per k and loop (median of the
repeats): seconds from ``before_train`` (the checkpoint is loaded) to the end of the first resumed
iteration, from ``runner.train()`` (model built, checkpoint loaded) to the same point, and the images
the datasets had loaded when that iteration began (a replay loads its k batches first). A
figure-printing script, not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOOPS = {"cac": "ResumableIterBasedTrainLoop", "mmengine": "IterBasedTrainLoop"}


@contextlib.contextmanager
def counted_loads(path: Path) -> Iterator[Path]:
    """Every image a dataset loads (mmengine's ``BaseDataset.prepare_data``, in this process or a
    dataloader worker forked from it) appends a line to ``path`` while inside."""
    from mmengine.dataset import BaseDataset

    real = BaseDataset.prepare_data

    def counted(self, idx):
        with open(path, "a") as fh:  # one short append per load: whole lines from any process
            fh.write(f"{os.getpid()}\n")
        return real(self, idx)

    path.write_text("")
    BaseDataset.prepare_data = counted
    try:
        yield path
    finally:
        BaseDataset.prepare_data = real


def first_iteration_clock(loads: Optional[Path] = None):
    """An mmengine hook that records when training starts and when its first iteration ends, then stops;
    with ``loads`` (a :func:`counted_loads` file), also how many images were loaded when the first
    iteration began: a replaying loop has loaded its k skipped batches by then, a seeking one has not."""
    from mmengine.hooks import Hook

    class FirstIteration(Hook):
        priority = "VERY_HIGH"
        loads_before_first: Optional[int] = None

        def before_train(self, runner) -> None:
            self.start_iter = runner.iter  # the checkpoint is loaded by now
            self.t_start = time.perf_counter()

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            if loads is not None and self.loads_before_first is None:
                self.loads_before_first = len(loads.read_text().splitlines())

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t_first = time.perf_counter()
            runner.train_loop.stop_training = True

    return FirstIteration()


def base_config(work: Path, workers: int) -> dict:
    from cac.mmseg.config import resolve_config

    cfg = resolve_config("fcn-slim-r18", "quick", cac=True, seed=0)
    cfg["train_dataloader"].update(num_workers=workers, persistent_workers=False)
    cfg["default_hooks"]["checkpoint"] = None  # nothing written while timing
    cfg["log_level"] = "WARNING"
    cfg["work_dir"] = str(work)
    return cfg


def make_checkpoint(cfg: dict, work: Path) -> Path:
    """One trained iteration, saved by mmengine's CheckpointHook."""
    from mmengine.runner import Runner

    from cac.mmseg.config import runner_config

    cfg = copy.deepcopy(cfg)
    cfg["train_cfg"].update(max_iters=1, val_interval=10**9)
    cfg["default_hooks"]["checkpoint"] = dict(type="CheckpointHook", by_epoch=False, interval=1)
    cfg["work_dir"] = str(work / "first")
    Runner.from_cfg(runner_config(cfg)).train()
    return work / "first" / "iter_1.pth"


def checkpoint_at(source: Path, k: int, out: Path) -> Path:
    """``source`` claiming to be iteration ``k`` (the loop reads its position from ``meta.iter``)."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=False)  # our own file, just written
    state["meta"]["iter"] = k
    torch.save(state, out)
    return out


def time_resume(cfg: dict, ckpt: Path, k: int, loop: str, work: Path) -> tuple[float, float, int]:
    """Seconds from before_train and from train() to the end of the first resumed iteration, and the
    images loaded when that iteration began."""
    from mmengine.runner import Runner

    from cac.mmseg.config import runner_config

    cfg = copy.deepcopy(cfg)
    cfg["train_cfg"].update(type=loop, max_iters=k + 2, val_interval=10**9)  # stopped after one iteration
    cfg.update(resume=True, load_from=str(ckpt), work_dir=str(work))
    work.mkdir(parents=True, exist_ok=True)
    with counted_loads(work / "loads.txt") as loads:
        runner = Runner.from_cfg(runner_config(cfg))
        clock = first_iteration_clock(loads)
        runner.register_hook(clock)
        t_train = time.perf_counter()
        runner.train()
    assert runner.iter == k + 1, (runner.iter, k)
    return clock.t_first - clock.t_start, clock.t_first - t_train, clock.loads_before_first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, nargs="+", default=[10, 2000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="train dataloader workers")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("CAC_DATA_ROOT", str(tmp / "data"))
        import cac  # noqa: F401  (registers the loop, CACHead, the dataset)
        from cac.data import context_scenes

        context_scenes.ensure("quick")
        cfg = base_config(tmp / "run", args.workers)
        source = make_checkpoint(cfg, tmp)
        print(f"resume benchmark: fcn-slim-r18 + CAC, quick data, batch {cfg['train_dataloader']['batch_size']}, "
              f"{args.workers} dataloader workers, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"median of {args.repeats}")
        print(f"{'k':>6}  {'loop':<30} {'before_train -> 1st iter':>25} {'train() -> 1st iter':>20} "
              f"{'images loaded before it':>24}")
        for k in args.iters:
            ckpt = checkpoint_at(source, k, tmp / f"iter_{k}.pth")
            for name, loop in LOOPS.items():
                runs = [time_resume(cfg, ckpt, k, loop, tmp / f"{name}-{k}-{r}") for r in range(args.repeats)]
                first = statistics.median(r[0] for r in runs)
                whole = statistics.median(r[1] for r in runs)
                loaded = statistics.median(r[2] for r in runs)
                print(f"{k:>6}  {loop:<30} {first:>23.3f} s {whole:>18.3f} s {loaded:>24.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
