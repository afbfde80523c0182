"""Slow check (not in ``make test``): every Table 1 row of each dataset trains at preset ``paper``.

    .venv/bin/python benchmarks/paper_smoke.py [--datasets ade20k cocostuff cityscapes pascal-context]
                                               [--rows ROW,...] [--out DIR]

A tiny ADE20K, COCO-Stuff 164K, Cityscapes and Pascal-Context 59 in the official layouts
(``cac-exp data tiny``; the last two are the supplementary's), then for each
dataset ``cac-exp run experiments/table1_<dataset>.yaml --preset paper`` with ``--no-pretrained``,
``--expected-train/--expected-val`` and ``--cfg-options`` for 2 iterations + validation at 64 px
crops (2 CPU cores): no spec is edited. Prints each row's status and time, and a summary line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["train_cfg.max_iters=2", "train_cfg.val_interval=2", "train_dataloader.batch_size=2",
         "default_hooks.checkpoint.interval=2", "train_dataloader.dataset.pipeline.2.scale=(128,64)",
         "train_dataloader.dataset.pipeline.3.crop_size=(64,64)", "model.data_preprocessor.size=(64,64)",
         "val_dataloader.dataset.pipeline.1.scale=(128,64)", "test_pipeline.1.scale=(128,64)",
         "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
         "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False"]
SPECS = {"ade20k": "experiments/table1_ade20k.yaml", "cocostuff": "experiments/table1_cocostuff.yaml",
         "cityscapes": "experiments/table1_cityscapes.yaml", "pascal-context": "experiments/table1_pascal_context.yaml"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--rows", help="comma-separated row labels (default: all 22 of each table)")
    ap.add_argument("--out", help="where data, work dirs and the MLflow store go (default: a temp dir)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="cac-paper-smoke-"))
    os.environ["CAC_DATA_ROOT"] = str(out / "data")
    os.environ["CAC_WORK_DIR"] = str(out / "work")
    from mlflow.tracking import MlflowClient

    from cac.cli import main as cac_exp
    from cac.data.tiny import make_tiny
    from cac.exp.spec import load_spec, select_rows

    uri = f"sqlite:///{out / 'mlflow.db'}"
    t_all, failed, total = time.time(), 0, 0
    for dataset in args.datasets:
        make_tiny(dataset, out / "data", train=6, val=2, size=64)
        t0 = time.time()
        cmd = ["run", str(ROOT / SPECS[dataset]), "--preset", "paper", "--no-pretrained", "--expected-train", "6",
               "--expected-val", "2", "--tracking-uri", uri, "--cfg-options", *SMALL]
        code = cac_exp(cmd + (["--rows", args.rows] if args.rows else []))
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(Path(SPECS[dataset]).stem)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        # a row that failed before its MLflow run opened has no run at all: count the plan, not the store
        planned = len(select_rows(load_spec(ROOT / SPECS[dataset]), args.rows))
        missing = max(planned - len(runs), 0)
        failed += missing
        total += missing
        for run in sorted(runs, key=lambda r: r.data.tags.get("row", "")):
            ok = run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
            failed += not ok
            total += 1
            seconds = run.data.metrics.get("time/train_seconds", float("nan"))
            print(f"{dataset:<14} {run.data.tags.get('row'):<24} {run.info.status:<9} "
                  f"val/mIoU {run.data.metrics.get('val/mIoU', float('nan')):6.2f}  {seconds:6.1f} s")
        print(f"{dataset}: exit {code}, {len(runs)} of {planned} rows have a run, in {time.time() - t0:.0f} s")
    print(f"paper smoke: {total - failed} of {total} rows FINISHED with val/mIoU in {time.time() - t_all:.0f} s ({out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
