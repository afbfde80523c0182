"""cac-exp sweep: real Optuna storage, real training through the runner, real MLflow."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from cac.cli import main
from cli_process import CacExp
from cac_probes import assert_steps_logged_once, probe_env, probe_overrides, start_iters, trainer_pids

BASE = """
title: sweep base
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 20
  train_cfg.val_interval: 10
  default_hooks.checkpoint.interval: 10
  cac_curve.points: 2  # the curve is not what these tests check: at the two val passes
{extra}rows:
  - {{label: "(a)", description: baseline, cac: false}}
  - {{label: "(f)", description: full CAC, cac: true}}
"""
SWEEP = """
title: tau and lambda
spec: base.yaml
row: "(f)"
objective: {metric: val/mIoU_pp, direction: maximize}
search_space:
  tau: {type: float, low: 1.0, high: 30.0, log: true}
  lambda_kl: {type: float, low: 0.01, high: 10.0, log: true}
sampler: {type: random, seed: 0}
pruner: {type: none}
"""


@pytest.fixture()
def sweep_spec(workspace):
    (workspace / "base.yaml").write_text(BASE.format(extra=""))
    (workspace / "sw.yaml").write_text(SWEEP)
    return workspace / "sw.yaml"


def _checkpoint_exists(root, name):
    """True once a checkpoint file appears (directories may change while the trainer writes)."""
    try:
        return any(root.rglob(name))
    except FileNotFoundError:
        return False


def _counted(storage):
    study = optuna.load_study(study_name="sw", storage=storage)
    ok = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study, [t for t in study.trials if t.state in ok]


def _overlapping(trials) -> bool:
    """Some two of ``trials`` ran at the same time (Optuna's start and completion times)."""
    return any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
               for i, a in enumerate(trials) for b in trials[i + 1:])


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_two_processes_share_a_study_then_continue_to_new_total(workspace, sweep_spec, saved_figures):
    # Each run waits until two processes train (the probe's rendezvous): the second process always
    # gets a trial, however fast the first one is.
    probe = workspace / "probe"
    (workspace / "base.yaml").write_text(BASE.format(extra=probe_overrides(probe, trainers=2)))
    storage = f"sqlite:///{workspace}/optuna.db"
    uri = f"sqlite:///{workspace}/mlflow.db"
    args = ["sweep", str(sweep_spec), "--trials", "2", "--storage", storage, "--tracking-uri", uri,
            "--out", str(workspace / "reports")]
    # Two processes share this machine's cores (as dispatched workers do, cac.exp.dispatch.cpu_threads):
    # with every core each, their torch threads oversubscribe the CPU and train several times slower.
    env = probe_env({**os.environ, "CAC_WORK_DIR": str(workspace / "work_dirs"),
                     "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))})
    # Create the study once so both processes find it (Optuna's own race on first creation is not ours).
    optuna.create_study(study_name="sw", storage=storage, direction="maximize")
    procs = [CacExp(args, workspace, env, merge=True)]
    # the second process joins once the first has a trial (its sampler then draws other points)
    deadline = time.monotonic() + 300
    while not optuna.load_study(study_name="sw", storage=storage).trials:
        assert procs[0].poll() is None and time.monotonic() < deadline, "the first process started no trial"
        time.sleep(0.2)
    procs.append(CacExp(args, workspace, env, merge=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study, done = _counted(storage)
    assert 2 <= len(done) <= 3  # each process stops once the shared total is reached (a race may add one)
    # Both processes ran trials: the storage says which process ran each, and each process printed
    # the start of exactly those trials.
    by_worker = {}
    for t in study.trials:
        by_worker.setdefault(int(t.user_attrs["worker"].rsplit(":", 1)[1]), []).append(t.number)
    assert sorted(by_worker) == sorted(p.pid for p in procs)
    for proc, out in zip(procs, outs):
        assert by_worker[proc.pid], f"worker {proc.pid} ran no trial"
        assert sorted(int(n) for n in re.findall(r"^trial (\d+): ", out, re.M)) == by_worker[proc.pid]
    assert trainer_pids(probe) == {p.pid for p in procs}
    assert _overlapping(done)
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("base").experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == len(done)
    assert {r.data.tags["study"] for r in finished} == {"sw"}
    assert {int(r.data.tags["trial"]) for r in finished} == {t.number for t in done}
    for r in finished:
        t = study.trials[int(r.data.tags["trial"])]
        assert float(r.data.params["setting.cac.tau"]) == pytest.approx(t.params["tau"])
        assert r.data.metrics["val/mIoU_pp"] == pytest.approx(t.value)

    n_before = len(done)
    assert main(["sweep", str(sweep_spec), "--trials", str(n_before + 1), "--storage", storage,
                 "--tracking-uri", uri, "--out", str(workspace / "reports")]) == 0
    study, done = _counted(storage)
    assert len(done) == n_before + 1
    # The report lists every completed trial, best first, with its parameters and objective value.
    rows = _report_rows(workspace / "reports" / "sweep_sw.md")
    expected = sorted(done, key=lambda t: -t.value)
    assert [int(r["trial"]) for r in rows] == [t.number for t in expected]
    for row, t in zip(rows, expected):
        assert float(row["tau"]) == pytest.approx(t.params["tau"], rel=1e-3)
        assert float(row["lambda_kl"]) == pytest.approx(t.params["lambda_kl"], rel=1e-3)
        assert float(row["val/mIoU_pp"]) == pytest.approx(t.value, abs=0.005)
    for name in ("sweep_sw_response.png", "sweep_sw_importance.png"):
        assert (workspace / "reports" / "figures" / name).stat().st_size > 0
    _assert_response_plot(study, saved_figures["sweep_sw_response.png"])


def _assert_response_plot(study, fig) -> None:
    """The response figure plots each completed trial once: objective over tau and over lambda_kl,
    and (tau, lambda_kl) coloured by the objective."""
    import numpy as np

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    tau_ax, lam_ax, both_ax = fig.axes[:3]

    def rows(table) -> np.ndarray:
        table = np.asarray(table, dtype=float)
        return table[np.lexsort(table.T[::-1])]

    def drawn(ax, coloured: bool = False) -> np.ndarray:
        points = ax.collections[0]
        table = np.asarray(points.get_offsets())
        return rows(np.column_stack([table, points.get_array()]) if coloured else table)

    np.testing.assert_allclose(drawn(tau_ax), rows([(t.params["tau"], t.value) for t in complete]))
    np.testing.assert_allclose(drawn(lam_ax), rows([(t.params["lambda_kl"], t.value) for t in complete]))
    np.testing.assert_allclose(drawn(both_ax, coloured=True),
                               rows([(t.params["tau"], t.params["lambda_kl"], t.value) for t in complete]))


def _report_rows(path: Path) -> list[dict]:
    """The rows of the report's "Completed trials" table, as {column: cell}."""
    text = path.read_text()
    assert "## Completed trials" in text
    table = [line for line in text.split("## Completed trials", 1)[1].splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    header, body = cells[0], cells[2:]
    return [dict(zip(header, row)) for row in body]


def test_bad_sweep_spec_is_one_line(workspace, sweep_spec, capsys):
    sweep_spec.write_text(SWEEP.replace("low: 1.0", "low: -1.0"))
    assert main(["sweep", str(sweep_spec), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tau" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_trial_is_retried_with_same_params_and_resumes(workspace, sweep_spec, monkeypatch):
    """The trial's process is SIGKILLed at iteration 12 (after 12's metrics were logged, before its
    checkpoint); the next worker retries it with the same parameters, resuming from iter_8.pth in
    the same MLflow run, and logs no step twice."""
    probe = workspace / "probe"
    base = BASE.replace("max_iters: 20", "max_iters: 16").replace("val_interval: 10", "val_interval: 4")
    (workspace / "base.yaml").write_text(base.replace("checkpoint.interval: 10", "checkpoint.interval: 4")
                                         .format(extra=probe_overrides(probe, kill_at=12)))
    storage = f"sqlite:///{workspace}/optuna.db"
    uri = f"sqlite:///{workspace}/mlflow.db"
    env = probe_env({**os.environ, "CAC_WORK_DIR": str(workspace / "work_dirs"), "CAC_SWEEP_HEARTBEAT": "1"})
    cmd = [sys.executable, "-m", "cac.cli", "sweep", str(sweep_spec), "--trials", "1", "--storage", storage,
           "--tracking-uri", uri, "--out", str(workspace / "reports")]
    out = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -9, out.stdout[-2000:] + out.stderr[-2000:]
    time.sleep(3)  # past the grace period (2 heartbeats): the trial is stale
    monkeypatch.setenv("CAC_SWEEP_HEARTBEAT", "1")
    assert main(["sweep", str(sweep_spec), "--trials", "1", "--storage", storage, "--tracking-uri", uri,
                 "--out", str(workspace / "reports")]) == 0
    study = optuna.load_study(study_name="sw", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 1
    failed, done = study.trials
    assert failed.params == done.params
    assert start_iters(probe) == [0, 8]  # the retry resumed from the checkpoint, not from iteration 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("base").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed trial's run was resumed, not duplicated
    assert runs[0].data.tags["trial"] == str(done.number)
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/mIoU_pp")]
    assert steps == [4, 8, 12, 16]
    assert_steps_logged_once(client, runs[0].info.run_id)


PRUNE = """
title: pruner
spec: base.yaml
row: "(f)"
objective: {metric: val/mIoU_pp, direction: maximize}
search_space:
  cfg.optim_wrapper.optimizer.lr: {type: float, low: 0.0, high: 0.05}
sampler: {type: random, seed: 0}
pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}
"""


@pytest.mark.slow
def test_median_pruner_stops_a_clearly_bad_trial(workspace, sweep_spec):
    """Trial 0 learns (lr 0.02); trial 1 cannot (lr 0): the median pruner stops it at its first
    evaluation. Optuna marks it PRUNED, its MLflow run is KILLED and tagged, training stopped there."""
    (workspace / "prune.yaml").write_text(PRUNE)
    storage = f"sqlite:///{workspace}/optuna.db"
    uri = f"sqlite:///{workspace}/mlflow.db"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    study.enqueue_trial({"cfg.optim_wrapper.optimizer.lr": 0.02})
    study.enqueue_trial({"cfg.optim_wrapper.optimizer.lr": 0.0})
    assert main(["sweep", str(workspace / "prune.yaml"), "--trials", "2", "--storage", storage,
                 "--tracking-uri", uri, "--out", str(workspace / "reports")]) == 0
    good, bad = optuna.load_study(study_name="prune", storage=storage).trials
    assert good.state == optuna.trial.TrialState.COMPLETE and sorted(good.intermediate_values) == [10, 20]
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert list(bad.intermediate_values) == [10] and bad.intermediate_values[10] < good.intermediate_values[10]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.data.tags["trial"]: r for r in client.search_runs([client.get_experiment_by_name("base").experiment_id])}
    assert runs[str(good.number)].info.status == "FINISHED"
    pruned = runs[str(bad.number)]
    assert pruned.info.status == "KILLED" and pruned.data.tags["optuna_state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val/mIoU_pp")] == [10]
    work_dir = Path(pruned.data.tags["work_dir"])
    assert not (work_dir / "iter_20.pth").exists()  # training stopped at the prune
    rows = _report_rows(workspace / "reports" / "sweep_prune.md")
    assert [int(r["trial"]) for r in rows] == [good.number]  # pruned trials are not in the table


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_sweep_workers_as_local_jobs(workspace, sweep_spec, capsys, monkeypatch):
    """--executor local --jobs 2: two worker jobs share the study until it holds the requested total,
    and train at the same time (each run waits at the probe's rendezvous until two processes train:
    one worker alone, or two one after the other, cannot pass it)."""
    probe = workspace / "probe"
    (workspace / "base.yaml").write_text(BASE.format(extra=probe_overrides(probe, trainers=2)))
    monkeypatch.setenv("PYTHONPATH", probe_env(dict(os.environ))["PYTHONPATH"])  # the jobs import cac_probes
    storage = f"sqlite:///{workspace}/optuna.db"
    uri = f"sqlite:///{workspace}/mlflow.db"
    assert main(["sweep", str(sweep_spec), "--trials", "2", "--storage", storage, "--tracking-uri", uri,
                 "--out", str(workspace / "reports"), "--executor", "local", "--jobs", "2",
                 "--submitit-folder", str(workspace / "jobs")]) == 0
    assert capsys.readouterr().out.count("local job") == 2
    study, done = _counted(storage)
    assert 2 <= len(done) <= 3
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    by_worker: dict[str, list] = {}
    for t in complete:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    assert len(by_worker) == 2, {w: [t.number for t in ts] for w, ts in by_worker.items()}  # each completed one
    assert trainer_pids(probe) == {int(w.rsplit(":", 1)[1]) for w in by_worker}
    (first, *_), (second, *_) = by_worker.values()
    assert any(_overlapping([a, b]) for a in by_worker[first.user_attrs["worker"]]
               for b in by_worker[second.user_attrs["worker"]]), "the two workers' trials did not overlap in time"
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("base").experiment_id])
    trained = {int(r.data.tags["trial"]) for r in runs if r.info.status == "FINISHED"}
    # workers starting together on one study draw from their own seed streams: no point twice, so every
    # completed trial trained its own run
    points = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(points)) == len(points), points
    assert trained == {t.number for t in complete} and all(t.value is not None for t in done)


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_dispatched_workers_starting_on_an_empty_study_draw_different_points(kind):
    """Workers dispatched together find the study empty: their samplers still differ (each its own seed
    stream), and each is deterministic (the same worker draws the same point again)."""
    from cac.exp.sweep import study_sampler

    def first_point(worker: int) -> tuple:
        study = optuna.create_study(sampler=study_sampler({"type": kind, "seed": 0}, 0, worker))
        trial = study.ask()
        return trial.suggest_float("tau", 1.0, 30.0, log=True), trial.suggest_float("lambda_kl", 0.01, 10.0, log=True)

    assert first_point(0) != first_point(1)
    assert first_point(1) == first_point(1)


def test_a_sweep_searches_a_classifiers_own_options(tmp_path):
    """A sweep over a GMMSeg row searches GMMSeg's options (its objective defaults to val/mIoU: there is
    no p_p); an option the row's classifier does not have, or a CAC-only metric, is one line."""
    from cac.exp.runner import make_unit
    from cac.exp.spec import SpecError
    from cac.exp.sweep import load_sweep

    (tmp_path / "base.yaml").write_text("title: b\nmodel: fcn-slim-r18\nrows:\n"
                                        "  - {label: g, description: g, classifier: {type: gmmseg, mem_size: 64}}\n")
    space = "search_space:\n  contrast_weight: {type: float, low: 0.001, high: 0.1, log: true}\n"
    (tmp_path / "sw.yaml").write_text(f"title: s\nspec: base.yaml\nrow: g\n{space}")
    sweep = load_sweep(tmp_path / "sw.yaml")
    assert sweep.metric == "val/mIoU" and set(sweep.space) == {"contrast_weight"}
    unit = make_unit(sweep.base, sweep.base.row("g"), 0, "quick", cac_extra={"contrast_weight": 0.05})
    assert unit.cfg["model"]["decode_head"]["classifier"] == {"type": "gmmseg", "mem_size": 64, "contrast_weight": 0.05}
    assert unit.settings()["gmmseg.contrast_weight"] == 0.05
    for text, words in [("search_space:\n  tau: {type: float, low: 1, high: 30}\n", "unknown gmmseg option 'tau'"),
                        (space + "objective: {metric: val/mIoU_pp}\n", "no CAC, so no val/mIoU_pp")]:
        (tmp_path / "bad.yaml").write_text(f"title: s\nspec: base.yaml\nrow: g\n{text}")
        with pytest.raises(SpecError, match=words):
            load_sweep(tmp_path / "bad.yaml")
