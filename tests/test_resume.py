"""Resume without replaying data, and still exact: cac's train loop moves mmengine's sampler to its
position, and augmentations and training steps draw from (seed, position) and (seed, iteration)."""
import itertools
import os
from typing import Optional
import random
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from cac_probes import LOADS_ENV, loaded_positions, probe_env, probe_overrides, start_iters

METRICS = ("val/mIoU", "val/mIoU_p", "val/mIoU_pp", "val/mIoU_py")

SPEC = """
title: resume test
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 8
  train_cfg.val_interval: 4
  default_hooks.checkpoint.interval: 4
  model.decode_head.head.dropout_ratio: 0.3
  train_dataloader.num_workers: {workers}
  train_dataloader.persistent_workers: {persistent}
  cac_curve.points: 2  # Fig. 4's curve is not what these tests check: at the val passes
{extra}rows:
  - {{label: "(f)", description: full CAC, cac: true}}
"""


class _Draws:
    """A dataset whose items are what the augmentations' RNGs give: python, numpy and torch draws."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> tuple:
        return index, random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_positioned_sampler_continues_mmengines_stream_from_any_position(rank, world, monkeypatch):
    import mmengine.dataset.sampler
    from mmengine.dataset import InfiniteSampler

    from cac.mmseg.loops import PositionedInfiniteSampler

    monkeypatch.setattr(mmengine.dataset.sampler, "get_dist_info", lambda: (rank, world))  # rank of a DDP run
    stream = list(itertools.islice(iter(InfiniteSampler(list(range(7)), seed=3)), 60))
    for consumed in (0, 5, 23):  # within the first epoch, and several epochs on
        ours = PositionedInfiniteSampler(list(range(7)), seed=3, start=None)
        assert list(itertools.islice(iter(ours), 3)) == []  # held until the loop seeks it
        ours.seek(consumed)
        keys = list(itertools.islice(iter(ours), 20))
        assert [k.index for k in keys] == stream[consumed:consumed + 20]
        assert [k.position for k in keys] == [rank + world * (consumed + j) for j in range(20)]
        assert {k.seed for k in keys} == {3}


def test_seeded_dataset_gives_a_position_the_same_draws_anywhere():
    from cac.mmseg.loops import PositionSeededDataset, StreamKey

    data = PositionSeededDataset(_Draws())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    first = data[StreamKey(0, 17, 2)]
    after = random.random(), float(np.random.rand()), float(torch.rand(()))
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    assert after == (random.random(), float(np.random.rand()), float(torch.rand(())))  # global RNGs untouched
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # another process, another history
    assert data[StreamKey(0, 17, 2)] == first
    assert data[StreamKey(0, 18, 2)][1:] != first[1:] and data[StreamKey(1, 17, 2)][1:] != first[1:]
    assert len(data) == 5 and data[3][0] == 3  # plain indices pass through


def test_every_resolved_config_trains_with_the_resumable_loop():
    from cac.mmseg.config import resolve_config
    from cac.mmseg.loops import LOOP_TYPE

    assert resolve_config("fcn-slim-r18", "quick", cac=True)["train_cfg"]["type"] == LOOP_TYPE
    assert resolve_config("upernet-swin-t", "paper", cac=True)["train_cfg"]["type"] == LOOP_TYPE
    kept = resolve_config("fcn-slim-r18", "quick", overrides={"train_cfg": {"type": "MyLoop", "max_iters": 2}})
    assert kept["train_cfg"]["type"] == "MyLoop"


def _spec(where: Path, workers: int = 0, persistent: bool = False, extra: str = "") -> Path:
    path = where / "rs.yaml"
    path.write_text(SPEC.format(workers=workers, persistent=str(persistent).lower(), extra=extra))
    return path


def _run(where: Path, spec: Path, uri: str, log_level: str = "ERROR", extra: tuple = (),
         env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = probe_env({**os.environ, "CAC_WORK_DIR": str(where / "work_dirs"), "CAC_LOG_LEVEL": log_level,
                     "OMP_NUM_THREADS": "2", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "cac.cli", "run", str(spec), "--tracking-uri", uri, *extra],
                          cwd=where, env=env, capture_output=True, text=True, timeout=600)


def _final(uri: str) -> tuple[str, dict]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rs").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    return runs[0].data.tags["work_dir"], {k: runs[0].data.metrics[k] for k in METRICS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, module_data_root):
    """The reference: the run trained straight through, no dataloader workers."""
    where = tmp_path_factory.mktemp("straight")
    uri = f"sqlite:///{where}/mlflow.db"
    out = _run(where, _spec(where), uri)
    assert out.returncode == 0, out.stderr[-3000:]
    return _final(uri)[1]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(uninterrupted, tmp_path):
    """SIGKILL at iteration 6 (after iter_4.pth): the rerun starts at 4 without replaying 4 batches,
    and ends with the uninterrupted run's metrics, dropout and augmentations included. Both processes
    load with 2 persistent workers (as the paper's configs do), the reference with none."""
    probe = tmp_path / "probe"
    spec = _spec(tmp_path, workers=2, persistent=True, extra=probe_overrides(probe, kill_at=6))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    loads = tmp_path / "loads.txt"
    killed = _run(tmp_path, spec, uri, env_extra={LOADS_ENV: str(loads)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(tmp_path, spec, uri, log_level="INFO", env_extra={LOADS_ENV: str(loads)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert start_iters(probe) == [0, 4]
    work_dir, metrics = _final(uri)
    logs = sorted(Path(work_dir).glob("*/*.log"), key=lambda p: p.stat().st_mtime)
    log = logs[-1].read_text()  # the resumed process's mmengine log, at INFO
    assert "Resumed the sample stream at iteration 4: 32 samples per rank skipped" in log
    assert "Advance dataloader" not in log
    # what the resumed process really read: nothing before position 32 (4 iterations x 8), every
    # position from there on (the killed process had read from 0)
    resumed_loads = loaded_positions(probe, loads, 4)
    assert resumed_loads and min(resumed_loads) == 32 and sorted(resumed_loads)[:8] == list(range(32, 40))
    assert min(loaded_positions(probe, loads, 0)) == 0
    assert metrics == pytest.approx(uninterrupted, abs=1e-9)


@pytest.mark.slow
def test_dataloader_workers_change_nothing(uninterrupted, tmp_path):
    """Two workers (started anew for the loop's one iterator) load what the main process loads alone."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = _run(tmp_path, _spec(tmp_path, workers=2), uri)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _final(uri)[1] == pytest.approx(uninterrupted, abs=1e-9)


@pytest.mark.slow
def test_resume_is_exact_with_diff_rank_seed(tmp_path_factory):
    """``randomness.diff_rank_seed=True`` (each rank its own seed; mmengine then draws the sampler's seed
    from the global RNG): a run killed at 6 and resumed at 4 ends as the uninterrupted one."""
    extra = ("--cfg-options", "randomness.diff_rank_seed=True")
    straight = tmp_path_factory.mktemp("drs-straight")
    out = _run(straight, _spec(straight), f"sqlite:///{straight}/mlflow.db", extra=extra)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = _final(f"sqlite:///{straight}/mlflow.db")[1]
    where = tmp_path_factory.mktemp("drs-killed")
    probe = where / "probe"
    spec = _spec(where, extra=probe_overrides(probe, kill_at=6))
    uri = f"sqlite:///{where}/mlflow.db"
    assert _run(where, spec, uri, extra=extra).returncode == -signal.SIGKILL
    resumed = _run(where, spec, uri, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert start_iters(probe) == [0, 4]
    assert _final(uri)[1] == pytest.approx(reference, abs=1e-9)


CLASSIFIERS_SPEC = """
title: resume classifiers
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 8
  train_cfg.val_interval: 4
  default_hooks.checkpoint.interval: 4
  cac_curve.points: 2
  model.decode_head.head.dropout_ratio: 0.3
rows:
  - {{label: GMMSeg, description: GMMSeg, classifier: {{type: gmmseg, mem_size: 40, update_interval: 2}}{gmm}}}
  - {{label: ProtoSeg, description: ProtoSeg, classifier: {{type: protoseg}}{proto}}}
"""


def _row_probe(out_dir: Path) -> str:
    """A row's own ProbeHook that SIGKILLs its process once at iteration 6 (after iter_4.pth)."""
    return (", overrides: {custom_imports: {imports: [cac_probes], allow_failed_imports: false}, "
            f"custom_hooks: [{{type: ProbeHook, out_dir: '{out_dir}', kill_at: 6}}]}}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gmmseg_and_protoseg_resume_as_if_never_interrupted(tmp_path_factory, module_data_root):
    """Each method's state (GMMSeg's mixtures, memory, pointers and step; ProtoSeg's prototypes and the
    Gumbel draws of its update) is in the checkpoint and its randomness is the step's own: each row,
    killed at iteration 6 and resumed from iteration 4, ends with the metrics of an uninterrupted run."""
    straight = tmp_path_factory.mktemp("cls-straight")
    spec = straight / "rc.yaml"
    spec.write_text(CLASSIFIERS_SPEC.format(gmm="", proto=""))
    out = _run(straight, spec, f"sqlite:///{straight}/mlflow.db")
    assert out.returncode == 0, out.stderr[-3000:]
    where = tmp_path_factory.mktemp("cls-killed")
    spec = where / "rc.yaml"
    spec.write_text(CLASSIFIERS_SPEC.format(gmm=_row_probe(where / "gmm"), proto=_row_probe(where / "proto")))
    uri = f"sqlite:///{where}/mlflow.db"
    assert _run(where, spec, uri).returncode == -signal.SIGKILL  # GMMSeg killed at 6
    assert _run(where, spec, uri).returncode == -signal.SIGKILL  # GMMSeg resumed and finished; ProtoSeg killed
    finished = _run(where, spec, uri)  # ProtoSeg resumed
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert start_iters(where / "gmm") == [0, 4] and start_iters(where / "proto") == [0, 4]

    def metrics(root: Path) -> dict:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("rc").experiment_id])
        assert {r.info.status for r in runs} == {"FINISHED"}
        return {r.data.tags["row"]: {k: r.data.metrics[k] for k in ("val/mIoU", "val/mIoU_p", "train/mIoU_p")}
                for r in runs}

    reference, resumed = metrics(straight), metrics(where)
    assert sorted(resumed) == ["GMMSeg", "ProtoSeg"]
    for row in resumed:
        assert resumed[row] == pytest.approx(reference[row], abs=1e-9), row
