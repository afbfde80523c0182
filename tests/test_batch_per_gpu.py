"""--batch-per-gpu: the paper's total batch of 16 on any GPU, by gradient accumulation."""
from pathlib import Path

import pytest

from cac.cli import main
from test_paper_scale import SMALL_CROPS, TABLE1, tiny_ade  # noqa: F401  (tiny_ade: the tiny ADE20K fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_batch_per_gpu_keeps_the_papers_total_batch(tmp_path, capsys):
    """`cac-exp config --preset paper --batch-per-gpu 4` on one GPU: batch 4, 4 accumulation steps, the
    schedule counted in micro-batches; another identity; a batch that does not divide is one line."""
    from mmengine.config import Config

    table1 = str(TABLE1)
    args = ["config", table1, "--row", "upernet-swin-t+cac", "--preset", "paper"]
    assert main([*args, "--out", str(tmp_path / "plain.py")]) == 0
    assert main([*args, "--batch-per-gpu", "4", "--out", str(tmp_path / "b4.py")]) == 0
    plain, b4 = (Config.fromfile(str(tmp_path / f"{n}.py")) for n in ("plain", "b4"))
    assert plain.train_dataloader.batch_size == 16 and "accumulative_counts" not in plain.optim_wrapper
    assert b4.train_dataloader.batch_size == 4 and b4.optim_wrapper.accumulative_counts == 4
    assert b4.train_cfg.max_iters == 4 * plain.train_cfg.max_iters
    assert b4.train_cfg.val_interval == 4 * plain.train_cfg.val_interval
    assert b4.default_hooks.checkpoint.interval == 4 * plain.default_hooks.checkpoint.interval
    assert [s.get("end") for s in b4.param_scheduler] == [4 * s.get("end") for s in plain.param_scheduler]

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


@pytest.mark.slow
def test_paper_run_at_batch_per_gpu_2_on_tiny_ade20k(tiny_ade, capsys):
    """Two iterations of FCN-MV2 + CAC at preset paper, 2 images per step and 8 accumulation steps."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tiny_ade}/mlflow.db"
    code = main(["run", str(TABLE1), "--preset", "paper", "--rows", "fcn-mv2+cac", "--no-pretrained",
                 "--expected-train", "6", "--expected-val", "2", "--tracking-uri", uri, "--batch-per-gpu", "2",
                 "--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=2",
                 "default_hooks.checkpoint.interval=2", *SMALL_CROPS])
    assert code == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("table1_ade20k").experiment_id])
    assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
    params = run.data.params
    assert (params["batch_per_gpu"], params["accumulation"], params["total_batch"]) == ("2", "8", "16")
