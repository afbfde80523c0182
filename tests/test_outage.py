"""Training outlives its tracking store: a real ``mlflow server`` stopped while a run trains, for longer
than MLflow's own HTTP retries (one retry, no backoff: the outages here last seconds).

Every run of this module holds training once after iteration 4 (its checkpoint and evaluations done),
the test stops the server there, and lets training go on:
- the server comes back while the finishing process waits for its journal: the run ends FINISHED;
- the process ends while the server is still away: exit 0, the journal waits, ``cac-exp sync``
  delivers it once the server is back;
- the process is killed during the outage: the next ``cac-exp run`` delivers its journal first, then
  resumes the run from its checkpoint.
In each, every logged step reaches the store exactly once, with no gap."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from cac_probes import HELD_RUN_SPEC, assert_steps_logged_once, probe_env, probe_overrides
from cli_process import CacExp
from mlflow_server import MlflowServer

STEPS = [4, 8, 12]  # train/* every 4 iterations (the val interval), the three classifiers at each val pass
# MLflow's own retries, short (its default is minutes of backoff): the outages below outlast them
MLFLOW_FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "CAC_TRACKING_STALL": "2"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


def _spec(where: Path, probe: Path, **probe_args) -> Path:
    path = where / "outage.yaml"
    path.write_text(HELD_RUN_SPEC.format(title="outage test", extra=probe_overrides(probe, hold_at=4, **probe_args)))
    return path


def _env(where: Path, drain: float) -> dict:
    return probe_env({**os.environ, "CAC_WORK_DIR": str(where / "work_dirs"), "OMP_NUM_THREADS": "2",
                      "CAC_TRACKING_DRAIN": str(drain), **MLFLOW_FAST_FAIL})


def _start(where: Path, spec: Path, uri: str, drain: float) -> CacExp:
    return CacExp(["run", str(spec), "--tracking-uri", uri], where, _env(where, drain))


def _outage_at_hold(server: MlflowServer, probe: Path, proc: CacExp) -> None:
    """Stop the server while training is held after iteration 4, then let training go on."""
    proc.wait_for(probe / "held", timeout=240)
    server.stop()
    (probe / "release").touch()


def _the_run(uri: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                                filter_string="tags.work_dir != ''")
    return client, run


def _assert_complete(uri: str, run_id: str, journal: Path) -> None:
    """FINISHED, every step of every metric once, the val passes and the final artifacts all there,
    and the store's values are the journal's."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_steps_logged_once(client, run_id)
    for key in ("train/loss", "train/loss_kl", "val/mIoU_p", "val/mIoU_pp", "val/mIoU_py"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == STEPS, key
    assert [m.step for m in client.get_metric_history(run_id, "val/mIoU")] == [12]
    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert {"config.py", "per_class_iou.csv", "checkpoint/iter_12.pth"} <= names, names
    logged = {}
    for line in journal.read_text().splitlines()[1:]:
        record = json.loads(line)
        if record["op"] == "metrics":
            for key, value in record["values"].items():
                logged.setdefault(key, {})[record["step"]] = value
    for key, steps in logged.items():
        assert {m.step: m.value for m in client.get_metric_history(run_id, key)} == steps, key


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_outages_of_the_tracking_server(server, module_data_root, tmp_path):
    uri = server.url

    # 1. The server comes back while the run finishes: the run waits for nothing and ends FINISHED.
    probe = tmp_path / "probe-back"
    proc = _start(tmp_path, _spec(tmp_path, probe), uri, drain=120)
    _outage_at_hold(server, probe, proc)
    proc.wait_for(probe / "rank0.json", timeout=240)  # training ran to its end with the server away ...
    time.sleep(3)  # ... and the outage goes on for seconds more (MLflow's retries take well under a second)
    server.restart()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert err.count(f"the store {uri} is unreachable") == 1, err[-3000:]  # said once
    assert err.count(f"the store {uri} answers again") == 1, err[-3000:]
    assert "done  outage (f) seed=0 quick" in out and "Traceback" not in err
    client, run = _the_run(uri)
    journal = Path(run.data.tags["work_dir"]) / "tracking" / f"{run.info.run_id}.jsonl"
    _assert_complete(uri, run.info.run_id, journal)
    first = run

    # 2. The process ends while the server is away: exit 0, the journal waits, `cac-exp sync` delivers it.
    (tmp_path / "second").mkdir()
    where = tmp_path / "second"
    probe = where / "probe"
    proc = _start(where, _spec(where, probe), uri, drain=2)
    _outage_at_hold(server, probe, proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "done  outage (f) seed=0 quick" in out
    assert f"cac-exp sync --tracking-uri {uri}" in out, out[-2000:]  # how to deliver what is left
    again = subprocess.run([sys.executable, "-m", "cac.cli", "run", str(where / "outage.yaml"), "--tracking-uri", uri],
                           cwd=where, env=_env(where, 2), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr  # one line, no trace
    assert "is not reachable" in again.stderr
    server.restart()
    synced = subprocess.run([sys.executable, "-m", "cac.cli", "sync", "--tracking-uri", uri], cwd=where,
                            env=_env(where, 2), capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr[-3000:]
    runs = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != first.info.run_id]
    (second,) = runs
    assert f"sync  run {second.info.run_id}:" in synced.stdout and "records delivered" in synced.stdout
    _assert_complete(uri, second.info.run_id,
                     Path(second.data.tags["work_dir"]) / "tracking" / f"{second.info.run_id}.jsonl")

    # 3. The process is killed during the outage and its job is retried while the server is still away
    # (a Slurm requeue): the job resumes the run from its work dir and finishes it offline. The next
    # `cac-exp run` delivers the journal before it reads the store, and so skips the unit as FINISHED.
    (tmp_path / "third").mkdir()
    where = tmp_path / "third"
    probe = where / "probe"
    spec = _spec(where, probe, kill_at=10)
    proc = _start(where, spec, uri, drain=2)
    _outage_at_hold(server, probe, proc)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    retried = _retry_as_a_job(where, spec, uri)
    assert retried.get("state") == "done", retried
    server.restart()
    again = subprocess.run([sys.executable, "-m", "cac.cli", "run", str(spec), "--tracking-uri", uri], cwd=where,
                           env=_env(where, 2), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    delivered = next(i for i, line in enumerate(lines) if "records its journal kept delivered" in line)
    assert delivered < next(i for i, line in enumerate(lines) if line.startswith("skip  outage (f)")), lines
    (third,) = [r for r in client.search_runs([run.info.experiment_id])
                if r.info.run_id not in (first.info.run_id, second.info.run_id)]
    assert [int(v) for v in (probe / "starts-rank0.txt").read_text().split()] == [0, 8]  # resumed at iter_8.pth
    _assert_complete(uri, third.info.run_id,
                     Path(third.data.tags["work_dir"]) / "tracking" / f"{third.info.run_id}.jsonl")


def _retry_as_a_job(where: Path, spec: Path, uri: str) -> dict:
    """The unit as a retried job (submitit's local executor, as ``--executor local`` runs it), started
    while its store is unreachable."""
    from cac.exp.dispatch import DispatchOptions, UnitJob, make_executor
    from cac.exp.options import RunOptions

    executor = make_executor(DispatchOptions(executor="local"), where / "jobs")
    job = UnitJob(str(spec), "(f)", 0, "quick", RunOptions(), uri, str(where / "work_dirs"))
    with pytest.MonkeyPatch.context() as mp:  # what the job inherits from the submitting process
        for key, value in _env(where, 2).items():
            mp.setenv(key, value)
        submitted = executor.submit(job)
    return submitted.result()
