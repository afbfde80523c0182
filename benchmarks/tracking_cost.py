"""What tracking on a server costs a run: a quick Table 3 (e) run tracked on a local ``mlflow server``
(SQLite backend, one worker, on loopback) against the same run tracked on a SQLite file, interleaved,
each a fresh ``cac-exp run`` process with its own work dir. Prints each pair, the medians and the
ratios (the ask: the server costs the run at most 10%).

    python benchmarks/tracking_cost.py --repeats 3

Two figures: the run's own ``time/train_seconds`` (training and its evaluations, what the journal
keeps off the store's path) and the process's wall time (start-up, planning against the store and the
final delivery included). The server runs on the same cores as the training (a lab's server would not), with MLflow 3's GenAI
job runner off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: seven worker processes that tracking
does not use, off in ``cac-exp ui`` too); its CPU time during each run is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mlflow_server import MlflowServer  # noqa: E402


def one_run(uri: str, where: Path, spec: str, rows: str, repeat: int) -> dict:
    """One fresh ``cac-exp run``. Each repeat is its own unit (mmengine's logger interval, which the
    run does not use, differs), so a store that holds an earlier repeat does not skip it as done."""
    env = {**os.environ, "CAC_WORK_DIR": str(where / "work_dirs")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cac.cli", "run", spec, "--rows", rows, "--preset", "quick",
                          "--seeds", "1", "--tracking-uri", uri, "--cfg-options",
                          f"default_hooks.logger.interval={1000 + repeat}"],
                         cwd=where, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"run failed ({uri}): {out.stderr[-2000:]}")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(Path(spec).stem)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.work_dir LIKE '{where}%'")
    (run,) = runs
    assert run.info.status == "FINISHED", run.info.status
    return {"wall_s": wall, "train_s": run.data.metrics["time/train_seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--spec", default=str(ROOT / "ablations" / "table3.yaml"))
    p.add_argument("--rows", default="(e)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="cac-tracking-cost-"))
    server = MlflowServer(tmp / "server").start()
    time.sleep(5)  # the server settles (its start-up imports) before anything is timed
    pairs = []
    try:
        for i in range(args.repeats):
            order = ("sqlite", "server") if i % 2 == 0 else ("server", "sqlite")
            pair = {}
            for kind in order:
                where = tmp / f"{kind}-{i}"
                where.mkdir()
                uri = server.url if kind == "server" else f"sqlite:///{where / 'mlflow.db'}"
                cpu = server.cpu_seconds()
                pair[kind] = one_run(uri, where, args.spec, args.rows, i)
                pair[kind]["server_cpu_s"] = server.cpu_seconds() - cpu
            pairs.append(pair)
            print(f"repeat {i}: sqlite train {pair['sqlite']['train_s']:.2f} s, wall {pair['sqlite']['wall_s']:.2f} s | "
                  f"server train {pair['server']['train_s']:.2f} s, wall {pair['server']['wall_s']:.2f} s, "
                  f"server CPU {pair['server']['server_cpu_s']:.2f} s (idle during the sqlite run: "
                  f"{pair['sqlite']['server_cpu_s']:.2f} s)", flush=True)
    finally:
        server.stop()
    result = {"spec": args.spec, "rows": args.rows, "repeats": args.repeats, "pairs": pairs}
    for figure in ("train_s", "wall_s"):
        sqlite = statistics.median(p["sqlite"][figure] for p in pairs)
        served = statistics.median(p["server"][figure] for p in pairs)
        ratio = statistics.median(p["server"][figure] / p["sqlite"][figure] for p in pairs)
        result[figure] = {"sqlite": sqlite, "server": served, "ratio": ratio}
        print(f"{figure}: median sqlite {sqlite:.2f} s, server {served:.2f} s; server/sqlite ratio "
              f"(median of pairs) {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
