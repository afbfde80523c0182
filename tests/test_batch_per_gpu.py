"""--batch-per-gpu: the paper's total batch of 16 on any GPU, by gradient accumulation."""
from pathlib import Path

import pytest

from cac.cli import main
from test_paper_scale import SMOKE, TABLE1, tiny_ade  # noqa: F401  (tiny_ade: the tiny ADE20K fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_batch_per_gpu_keeps_the_papers_total_batch(tmp_path, capsys):
    """`cac-exp config --preset paper --batch-per-gpu 4` on one GPU: batch 4, 4 micro-batches per
    iteration, the schedule unchanged (iterations are optimizer steps); another identity; a batch that
    does not divide is one line."""
    from mmengine.config import Config

    table1 = str(TABLE1)
    args = ["config", table1, "--row", "upernet-swin-t+cac", "--preset", "paper"]
    assert main([*args, "--out", str(tmp_path / "plain.py")]) == 0
    assert main([*args, "--batch-per-gpu", "4", "--out", str(tmp_path / "b4.py")]) == 0
    plain, b4 = (Config.fromfile(str(tmp_path / f"{n}.py")) for n in ("plain", "b4"))
    assert plain.train_dataloader.batch_size == 16 and "accumulative_counts" not in plain.optim_wrapper
    assert b4.train_dataloader.batch_size == 4 and b4.optim_wrapper.accumulative_counts == 4
    assert b4.train_cfg.micro_batches == 4 and "micro_batches" not in plain.train_cfg
    assert b4.train_cfg.max_iters == plain.train_cfg.max_iters  # optimizer steps either way
    assert b4.train_cfg.val_interval == plain.train_cfg.val_interval
    assert b4.default_hooks.checkpoint.interval == plain.default_hooks.checkpoint.interval
    assert b4.param_scheduler == plain.param_scheduler

    from cac.exp.options import RunOptions
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec

    spec = load_spec(table1)
    row = spec.row("upernet-swin-t+cac")
    unit = lambda **kw: make_unit(spec, row, 0, "paper", options=RunOptions(**kw))  # noqa: E731
    assert unit(batch_per_gpu=4).cfg_hash != unit().cfg_hash
    assert unit(batch_per_gpu=16).cfg_hash == unit().cfg_hash  # the same training: the same run
    assert unit(batch_per_gpu=2, world_size=4).cfg["optim_wrapper"]["accumulative_counts"] == 2

    capsys.readouterr()
    assert main([*args, "--batch-per-gpu", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cac-exp: error:") and "\n" not in err
    assert "--batch-per-gpu 3 x 1 process(es) does not divide the total batch 16; use one of 1, 2, 4, 8, 16" in err
    for key in ("optim_wrapper.accumulative_counts=2", "train_cfg.micro_batches=2"):  # one way to say it
        assert main([*args, "--batch-per-gpu", "4", "--cfg-options", key]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--batch-per-gpu and --cfg-options {key.split('=')[0]}" in err


def test_total_batch_is_read_from_the_config_file_name_only():
    from cac.exp.options import shipped_total_batch

    assert shipped_total_batch("/home/u/runs_2xb8-old/fcn_mv2_4xb4-160k_ade20k-512x512.py") == 16
    assert shipped_total_batch("/home/u/runs_2xb8-old/my_config.py") is None
    assert shipped_total_batch("mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py") == 8


PROBE_SPEC = """
title: batch per gpu probe
dataset: ade20k
model: fcn-mv2
seeds: 1
overrides:
{probe}rows:
  - {{label: fcn-mv2+cac, description: FCN-MV2 + CAC, cac: true}}
"""


@pytest.mark.slow
def test_paper_run_at_batch_per_gpu_2_on_tiny_ade20k(tiny_ade, capsys):
    """FCN-MV2 + CAC at preset paper, 2 images per micro-batch: `train_cfg.max_iters=2` is 2 optimizer
    steps of 8 micro-batches of 2 (counted by a probe on the real train_step and optimizer step), and
    the run logs steps 1 and 2, as the same schedule at batch 16 does."""
    from mlflow.tracking import MlflowClient

    from cac_probes import probe_overrides, rank_reports

    probe = tiny_ade / "probe"
    spec = tiny_ade / "probe.yaml"
    spec.write_text(PROBE_SPEC.format(probe=probe_overrides(probe)))
    uri = f"sqlite:///{tiny_ade}/mlflow.db"
    code = main(["run", str(spec), "--preset", "paper", *SMOKE, "--tracking-uri", uri, "--batch-per-gpu", "2",
                 "--cfg-options", "train_cfg.max_iters=2"])
    assert code == 0, capsys.readouterr().err
    report = rank_reports(probe)[0]
    assert report["optimizer_steps"] == 2 and report["micro_batches"] == [2] * 16 and report["iter"] == 2
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
    params = run.data.params
    assert (params["batch_per_gpu"], params["accumulation"], params["total_batch"]) == ("2", "8", "16")
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert max(steps) == 2  # optimizer steps, not micro-batches (16)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU_pp")} == {2}
