"""Bad input on the command line: one line on stderr naming the problem and what to do, a non-zero
exit, no traceback, and an existing MLflow store left exactly as it was.

Two cases run the installed ``cac-exp`` (what a user types); the rest call ``cac.cli.main`` in-process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ports import refused_port

ROOT = Path(__file__).resolve().parents[1]
CAC_EXP = Path(sys.executable).with_name("cac-exp")
TABLE3 = str(ROOT / "ablations" / "table3.yaml")
SWEEP = str(ROOT / "experiments" / "sweep_tau_lambda.yaml")


def _snapshot(uri: str) -> list:
    """Everything a report reads from the store: every run's identity, status, times, data."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            out.append((exp.name, run.info.run_id, run.info.status, run.info.start_time, run.info.end_time,
                        sorted(run.data.metrics.items()), sorted(run.data.params.items()),
                        sorted(run.data.tags.items())))
    return sorted(out)


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    """A working directory whose default store (./mlflow.db) holds one FINISHED Table 3 run."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work_dirs"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("table3"),
                            tags={"spec": "table3", "row": "(a)", "seed": "0", "preset": "quick"})
    client.log_metric(run.info.run_id, "val/mIoU", 42.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _cli(args: list[str], limit: float = 120) -> subprocess.CompletedProcess:
    """The installed command; one that has not returned after ``limit`` s (e.g. MLflow retrying an
    unreachable server for minutes) fails the test with what it printed so far."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    try:
        return subprocess.run([str(CAC_EXP), *args], capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"cac-exp {' '.join(args)} did not return within {err.timeout} s")


# -- the installed command ---------------------------------------------------------------------------
def test_unreachable_tracking_server_fails_fast(store):
    before = _snapshot(store)
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"  # nothing listens there
        # MLflow alone retries for minutes; our check answers first ("not reachable" is its message)
        proc = _cli(["run", TABLE3, "--preset", "quick", "--tracking-uri", url])
    _one_line_error(proc.returncode, proc.stderr, url, "not reachable", "--tracking-uri")
    assert _snapshot(store) == before and not (Path.cwd() / "work_dirs").exists()


def test_bogus_sweep_storage(store):
    before = _snapshot(store)
    proc = _cli(["sweep", SWEEP, "--trials", "1", "--storage", "bogus://x", "--tracking-uri", store])
    _one_line_error(proc.returncode, proc.stderr, "--storage 'bogus://x'", "sqlite:///")
    assert _snapshot(store) == before and not (Path.cwd() / "optuna.db").exists()


# -- in-process --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["run", TABLE3, "--seeds", "0"], ["--seeds must be >= 1, got 0"]),
    (["run", TABLE3, "--seeds", "-2", "--dry-run"], ["--seeds must be >= 1, got -2"]),
    (["run", TABLE3, "--tracking-uri", "bogus://x"], ["unknown scheme 'bogus'", "--tracking-uri"]),
    (["run", TABLE3, "--preset", "nosuch"], ["unknown preset 'nosuch'"]),
    (["results", TABLE3, "--preset", "nosuch"], ["unknown preset 'nosuch'"]),
    (["results", TABLE3, "--tracking-uri", "http://127.0.0.1:{port}"], ["not reachable"]),
    (["results", "no-such-spec.yaml"], ["no-such-spec.yaml"]),
    (["sweep", SWEEP, "--trials", "0"], ["--trials must be >= 1, got 0"]),
    (["sweep", SWEEP, "--trials", "1", "--tracking-uri", "http://127.0.0.1:{port}"], ["not reachable"]),
    (["sweep", SWEEP, "--trials", "1", "--storage", "optuna.db"], ["is not a URL"]),
    (["sweep", SWEEP, "--trials", "1", "--storage", "sqlite:///{tmp}/a-file/optuna.db"], ["cannot open it"]),
    (["results", TABLE3, "--tracking-uri", "sqlite:///{tmp}/a-file/mlflow.db"], ["cannot create it"]),
])
def test_bad_input_is_one_line(store, tmp_path, capsys, args, words):
    from cac.cli import main

    (tmp_path / "a-file").write_text("a file, not a folder")
    before = _snapshot(store)
    with refused_port() as port:
        args = [a.format(port=port, tmp=tmp_path) for a in args]
        capsys.readouterr()  # the fixture's store-creation chatter
        code = main(args)
    _one_line_error(code, capsys.readouterr().err, *words)
    assert _snapshot(store) == before
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "work_dirs").exists()


@pytest.mark.timeout(120)  # a check that waited for an answer forever would hang here: fail instead
def test_server_that_never_answers_times_out(store, capsys, monkeypatch):
    """A port that accepts connections but never replies: the check gives up after the timeout (the
    message names the 1 s it waited)."""
    from cac.cli import main

    monkeypatch.setenv("CAC_TRACKING_TIMEOUT", "1")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        capsys.readouterr()
        code = main(["results", TABLE3, "--tracking-uri", url])
    _one_line_error(code, capsys.readouterr().err, url, "no answer within 1 s")


def test_report_scripts_say_one_line_too(store, capsys):
    from analysis.make_tables import main as make_tables
    from tsne.make_tsne import main as make_tsne

    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        capsys.readouterr()
        _one_line_error(make_tables(["--tracking-uri", url]), capsys.readouterr().err, "not reachable")
        _one_line_error(make_tables(["--preset", "nosuch"]), capsys.readouterr().err, "unknown preset")
        _one_line_error(make_tsne(["--spec", "table3", "--tracking-uri", url]), capsys.readouterr().err,
                        "not reachable")
    _one_line_error(make_tsne(["--run-id", "0123456789abcdef", "--tracking-uri", store]),
                    capsys.readouterr().err, "run '0123456789abcdef' not found")


def test_a_server_that_answers_passes_the_check(monkeypatch):
    """Any HTTP answer (here 404 from a plain server) means reachable: MLflow takes it from there. The
    process-wide cache of checked stores is this test's own (restored after it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import cac.exp.tracking as tracking
    from cac.exp.tracking import check_tracking_uri

    monkeypatch.setattr(tracking, "_READY", set())

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        check_tracking_uri(url, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert tracking._READY == {url}  # remembered for the process (here: until the test ends)


def test_a_bad_argument_creates_no_store(tmp_path, monkeypatch, capsys):
    """The default store (./mlflow.db) is not made just to report a typo."""
    from analysis.make_tables import main as make_tables
    from cac.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _one_line_error(main(["results", "no-such-spec.yaml"]), capsys.readouterr().err, "no-such-spec.yaml")
    _one_line_error(main(["run", TABLE3, "--rows", "(zz)", "--dry-run"]), capsys.readouterr().err, "(zz)")
    _one_line_error(make_tables(["--spec", "no-such-table"]), capsys.readouterr().err, "no spec 'no-such-table'")
    assert not list(tmp_path.iterdir())


def test_a_new_sqlite_store_is_mlflows_own_schema_copied_with_its_own_default_experiment(tmp_path, monkeypatch):
    """A new SQLite store is a copy of an empty store MLflow's migrations made once (in cac's cache):
    the same tables, indexes and schema version as MLflow makes in place, and MLflow's Default
    experiment made for this store. A template MLflow cannot open is not used: MLflow makes the store."""
    import sqlite3

    import mlflow

    from cac.exp import tracking

    monkeypatch.setenv("CAC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    ours, theirs = tmp_path / "a" / "ours.db", tmp_path / "a" / "theirs.db"
    tracking._init_sql_store(f"sqlite:///{ours}")
    template = tmp_path / "cache" / f"mlflow-{mlflow.__version__}-empty.db"
    assert template.exists()
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{theirs}").search_experiments()

    def clauses(sql):  # MLflow's own migrations order a table's constraints differently from run to run
        return None if sql is None else tuple(sorted(line.strip().rstrip(",").strip() for line in sql.splitlines()))

    def content(db):
        con = sqlite3.connect(db)
        try:
            return (sorted((t, n, clauses(sql)) for t, n, sql in con.execute("SELECT type, name, sql FROM sqlite_master")),
                    con.execute("SELECT * FROM alembic_version").fetchall(),
                    con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments").fetchall())
        finally:
            con.close()

    assert content(ours) == content(theirs)
    assert content(template)[2] == []  # the template holds no experiment of its own
    # a store in use is never replaced by the template
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{ours}").create_experiment("kept")
    tracking._READY.discard(f"sqlite:///{ours}")
    tracking._init_sql_store(f"sqlite:///{ours}")
    assert "kept" in [e.name for e in mlflow.MlflowClient(tracking_uri=f"sqlite:///{ours}").search_experiments()]
    # a broken template: MLflow builds the store itself
    template.write_bytes(b"not a database")
    broken = tmp_path / "b" / "new.db"
    tracking._init_sql_store(f"sqlite:///{broken}")
    assert content(broken)[:2] == content(theirs)[:2]


def test_a_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    """`cac-exp run --dry-run` ("print the plan only") in an empty folder, with the default store:
    the plan is printed and the folder stays empty (no mlflow.db, no work dir)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work_dirs"))
    from cac.cli import main

    assert main(["run", TABLE3, "--preset", "quick", "--dry-run"]) == 0
    assert "plan: 7 to train" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
