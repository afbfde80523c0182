"""``cac-exp ui``: MLflow's UI on the run store, opened on the training runs; ``--sweep``: optuna-dashboard
on a sweep's storage. Loopback unless ``--host`` says otherwise; the store's URL reaches the server
through its environment (``MLFLOW_BACKEND_STORE_URI``) or in-process, never on a command line.

MLflow 3's UI opens an experiment on its GenAI overview until the browser has chosen "Model training"
once; the addresses printed here choose it (``?workflowType=machine_learning``).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable, Optional

from cac.errors import CacError
from cac.exp.credentials import public_url, scrub

__all__ = ["cmd_ui", "training_links", "serve_mlflow", "serve_dashboard"]

TRAINING_VIEW = "?workflowType=machine_learning"


def _base(host: str, port: int) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def training_links(uri: str, base: str) -> list[str]:
    """One line per experiment of the store that holds runs: its name, run count and the address of
    its training runs in the UI at ``base``."""
    from cac.exp.tracking import store_client

    client = store_client(uri)
    lines = []
    for exp in client.search_experiments():
        runs = len(client.search_runs([exp.experiment_id], max_results=1000))
        if runs:
            lines.append(f"  {exp.name} ({runs} run{'s' if runs != 1 else ''}): "
                         f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}{TRAINING_VIEW}")
    return lines


def _relay(stream, echo: Callable[[str], None]) -> None:
    """The server's own lines, scrubbed of the store's secrets."""
    for line in iter(stream.readline, ""):
        echo(scrub(line.rstrip("\n")))


def serve_mlflow(uri: str, host: str, port: int, echo: Callable[[str], None] = print,
                 ready: Optional[Callable[[str], None]] = None) -> int:
    """Start ``mlflow server`` on the store ``uri`` (an ``http(s)`` store is a server already: its
    addresses are printed) and wait until it ends (Ctrl-C)."""
    from cac.exp.tracking import check_tracking_uri, store_scheme

    check_tracking_uri(uri, create=False)
    if store_scheme(uri) in ("http", "https"):
        base = public_url(uri).rstrip("/")
        echo(f"the store is an MLflow server: open {base}/")
        for line in training_links(uri, base):
            echo(line)
        return 0
    # the store's URL through the environment (not on a command line); MLflow 3's GenAI job runner
    # (seven worker processes) is off unless the user turned it on: looking at runs does not use it
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stdout, said.append), daemon=True)
    relay.start()
    base = _base(host, port)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                last = [line for line in said if line.strip()][-1:] or ["no output"]
                raise CacError(f"mlflow server ended before it answered on {base} (port {port} taken? "
                               f"try --port): {last[0][:200]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health" if host in ("0.0.0.0", "::")
                                       else f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        else:
            raise CacError(f"mlflow server did not answer on {base} within 60 s")
        echo(f"MLflow UI on {base}/ (store {public_url(uri)}); the training runs of each experiment:")
        for line in training_links(uri, base) or ["  (no runs yet)"]:
            echo(line)
        echo("Ctrl-C stops it")
        if ready is not None:
            ready(base)
        proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve_dashboard(spec: str, storage: Optional[str], host: str, port: int, echo: Callable[[str], None] = print,
                    model: Optional[str] = None) -> int:
    """optuna-dashboard, in this process, on the storage of the sweep ``spec`` (its study's address
    printed first); ends with Ctrl-C."""
    import optuna

    from cac.exp.sweep import load_sweep, resolve_storage

    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise CacError("optuna-dashboard is not installed: pip install 'optuna-dashboard' "
                       "(requirements.txt pins it)") from None
    sweep = load_sweep(spec, model)
    store, url = resolve_storage(storage)
    try:
        study = optuna.load_study(study_name=sweep.study, storage=store)
        where = f"/dashboard/studies/{study._study_id}"
    except KeyError:
        where = "/dashboard"
        echo(f"study {sweep.study} is not in {public_url(url)} yet: the dashboard lists the studies there")
    echo(f"optuna-dashboard on {_base(host, port)}{where} (storage {public_url(url)}); Ctrl-C stops it")
    try:
        run_server(store, host=host, port=port)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_ui(args) -> int:
    from cac.exp.tracking import resolve_tracking_uri

    if args.sweep:
        return serve_dashboard(args.sweep, args.storage, args.host, args.port, model=args.model)
    return serve_mlflow(resolve_tracking_uri(args.tracking_uri), args.host, args.port)
