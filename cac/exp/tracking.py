"""MLflow bookkeeping: one experiment per spec, one run per row x seed x preset, found again by tags.

A run is identified by the tags ``spec``, ``row``, ``seed``, ``preset`` and ``config_hash`` (the
resolved config). FINISHED runs are never redone; an unfinished one is reopened and resumed, so each
row x seed ends with exactly one FINISHED run.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from cac.errors import CacError
from cac.exp.journal import retry_on_duplicate, unreachable

__all__ = ["resolve_tracking_uri", "check_tracking_uri", "check_db_driver", "prepare_store", "redacted_url",
           "StoreUnreachable", "unreachable", "store_client", "store_exists", "store_scheme", "retry_on_duplicate",
           "RunTracker", "find_runs", "flatten", "git_commit", "git_dirty"]

DEFAULT_DB = "mlflow.db"
TIMEOUT_ENV = "CAC_TRACKING_TIMEOUT"  # seconds a tracking server gets to answer the reachability check
CACHE_ENV = "CAC_CACHE_DIR"  # where cac keeps what it can rebuild (default: $XDG_CACHE_HOME/cac, ~/.cache/cac)
_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # MLflow's own


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the working directory.
    Its secrets are remembered, so no line cac writes quotes them."""
    from cac.exp.credentials import remember

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    remember(uri)
    return uri


_READY: set[str] = set()
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores
# the pip package of each database driver SQLAlchemy may import for a URL (module -> package)
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
                    "asyncpg": "asyncpg", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL",
                    "mysql": "mysql-connector-python", "pyodbc": "pyodbc", "pymssql": "pymssql"}


def redacted_url(url: str) -> str:
    """``url`` as cac shows it: without credentials (:func:`cac.exp.credentials.public_url`)."""
    from cac.exp.credentials import public_url

    return public_url(url)


class StoreUnreachable(CacError):
    """The tracking store did not answer (a server down, a network away), as opposed to refusing."""


def check_db_driver(url: str, what: str) -> None:
    """One ``CacError`` line naming the package to install when the database driver SQLAlchemy uses
    for ``url`` is missing (``postgresql://`` is psycopg 3 in SQLAlchemy 2.1, psycopg2 before;
    ``postgresql+psycopg2://`` names one). Nothing is connected to. ``what``: the option, for the
    message (``--storage``, ``tracking URI``)."""
    try:
        from sqlalchemy.engine import make_url

        dialect = make_url(url).get_dialect()
    except Exception:  # noqa: BLE001 - not a database URL or an unknown dialect: the caller says so
        return
    try:
        dialect.import_dbapi()
    except ImportError as err:
        module = (getattr(err, "name", None) or str(err)).split(".")[0]
        package = _DRIVER_PACKAGES.get(module, module)
        raise CacError(f"{what} {redacted_url(url)!r}: the database driver {module!r} is not installed; "
                       f"install it with: pip install '{package}'") from None


def _fix_hint() -> str:
    return (f"pass a working --tracking-uri or set MLFLOW_TRACKING_URI (unset, runs go to "
            f"sqlite:///<cwd>/{DEFAULT_DB})")


def store_scheme(uri: str) -> str:
    """``http`` of ``http://host``, ``postgresql`` of ``postgresql+psycopg2://...``; ``file`` of a path."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.lower()
    if len(scheme) <= 1:  # a plain path (or a Windows drive letter)
        return "file"
    return scheme.split("+", 1)[0]


def _known_schemes() -> set[str]:
    """The schemes MLflow has tracking stores for (plug-ins included), else its built-in ones."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return {s for s in _tracking_store_registry._registry if s} | {"file"}
    except (ImportError, AttributeError):  # a private registry: fall back if it ever moves
        return set(_SCHEMES)


def _probe_http(uri: str, timeout: float) -> None:
    """One short GET of the server's ``/health``: any HTTP answer will do; no answer is a CacError."""
    import socket
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:  # it answered (401, 404, ...): reachable; MLflow reports the rest
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):  # it answered; its certificate is MLflow's business
            return  # (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            reason = f"no answer within {timeout:g} s"
        raise StoreUnreachable(f"tracking server {redacted_url(uri)} is not reachable ({reason}): start it (e.g. "
                               f"`mlflow server --port 5000`) or {_fix_hint()}") from None


def check_tracking_uri(uri: str, timeout: Optional[float] = None, create: bool = True) -> None:
    """Fail fast and in one line (``CacError``) on a tracking store that cannot work, before anything
    is tracked: an HTTP(S) server that does not answer within ``timeout`` s (default
    ``$CAC_TRACKING_TIMEOUT`` or 5; MLflow itself retries for minutes, then prints a long traceback),
    an unknown scheme, or (``create``) a SQLite file that cannot be created or opened. With
    ``create=False`` nothing is written: a SQLite store is left to its first use. A usable store is
    remembered for the process."""
    if uri in _READY:
        return
    scheme = store_scheme(uri)
    if scheme not in _known_schemes():
        raise CacError(f"tracking URI {redacted_url(uri)!r}: unknown scheme {scheme!r} (known: {', '.join(_SCHEMES)}); "
                       + _fix_hint())
    if scheme in ("http", "https"):
        try:
            seconds = float(timeout if timeout is not None else os.environ.get(TIMEOUT_ENV, "5"))
        except ValueError:
            raise CacError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r} is not a number of seconds") from None
        _probe_http(uri, seconds)
    elif scheme in _DB_SCHEMES:
        check_db_driver(uri, "tracking URI")
        if not create:
            return
        _init_sql_store(uri)
    _READY.add(uri)


def store_client(uri: str):
    """An MLflow client of the store ``uri``, checked first (one CacError line if it cannot work)."""
    import mlflow

    check_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def _init_sql_store(uri: str) -> None:
    """Create/migrate a database store's schema (MLflow does it on first use). A SQLite file is made
    under a file lock: two processes (parallel sweeps) racing on a new database's schema would
    otherwise fail with 'duplicate column'; processes on several machines sharing a server database
    cannot lock, so the process that starts jobs creates it first (:func:`prepare_store`). A store
    that cannot be made or opened (unwritable folder, not a database, a newer schema, no server) is
    one CacError line."""
    import contextlib
    import fcntl
    import logging

    import mlflow

    for name in ("mlflow", "alembic"):  # schema-creation chatter is not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    shown = redacted_url(uri)
    try:
        with contextlib.ExitStack() as stack:
            if uri.startswith("sqlite:///"):
                db = Path(uri[len("sqlite:///"):])
                db.parent.mkdir(parents=True, exist_ok=True)
                fh = stack.enter_context(open(f"{db}.lock", "w"))
                fcntl.flock(fh, fcntl.LOCK_EX)
                stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
                if not db.exists() or db.stat().st_size == 0:
                    _new_sqlite_store(db)
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except OSError as err:
        raise CacError(f"tracking store {shown}: cannot create it ({err.strerror or err}): {_fix_hint()}") from None
    except Exception as err:  # noqa: BLE001 - MLflow / SQLAlchemy errors: say what failed, in one line
        from cac.exp.credentials import scrub

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = StoreUnreachable if unreachable(err) else CacError
        raise kind(f"tracking store {shown}: cannot open it ({scrub(first[:300])}): {_fix_hint()}") from None


def cache_dir() -> Path:
    """cac's cache folder: ``$CAC_CACHE_DIR``, else ``$XDG_CACHE_HOME/cac``, else ``~/.cache/cac``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cac"


def _new_sqlite_store(db: Path) -> None:
    """Make the new SQLite store ``db`` a copy of an empty store at this MLflow's schema, when one can
    be had: MLflow builds a new database by replaying its ~100 schema migrations (about 1 s each time);
    the result, made once per MLflow version by those very migrations, is kept in :func:`cache_dir`.
    The copy holds no experiment: MLflow adds its Default experiment (its artifact location, its time)
    on first use, as it does after its migrations. Without a usable template (an unwritable cache, a
    damaged file), MLflow creates the store itself."""
    import shutil
    import sqlite3

    try:
        template = _schema_template()
    except Exception:  # noqa: BLE001 - no template (an unwritable cache, MLflow failing): MLflow's way
        return
    try:
        con = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
        try:  # MLflow's schema version, and no experiment in it
            usable = (len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
                      and con.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0)
        finally:
            con.close()
    except sqlite3.Error:
        usable = False
    if not usable:
        with contextlib.suppress(OSError):
            template.unlink()  # made again next time
        return
    shutil.copyfile(template, db)


def _schema_template() -> Path:
    """An empty SQLite store at this MLflow's schema, made by MLflow's migrations (once per version)."""
    import fcntl
    import sqlite3
    import tempfile

    import mlflow

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"mlflow-{mlflow.__version__}-empty.db"
    if path.exists():
        return path
    with open(folder / f"{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if path.exists():  # another process made it while this one waited
            return path
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            made = Path(tmp) / path.name
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments(max_results=1)
            with sqlite3.connect(made) as con:  # the Default experiment belongs to the store it is made in
                con.execute("DELETE FROM experiment_tags")
                con.execute("DELETE FROM experiments")
            con.close()
            os.replace(made, path)
    return path


def prepare_store(uri: str, experiments: Iterable[str] = ()) -> None:
    """Create the tracking store's schema and ``experiments`` in this process, before it starts jobs
    that track there: jobs starting together on a fresh database would race on MLflow's schema
    creation (one fails on ``CREATE TABLE alembic_version``) and on the experiment's."""
    check_tracking_uri(uri)
    for name in experiments:
        experiment_id(uri, name)


def git_commit() -> str:
    """The commit of the checkout cac runs from, as this process first read it (see
    :func:`cac.exp.provenance.source_tree`), or ``unknown``."""
    from cac.exp.provenance import source_tree

    return source_tree().get("mlflow.source.git.commit") or "unknown"


def git_dirty() -> str:
    """Whether the checkout cac runs from differs from its commit (``true``/``false``/``unknown``): MLflow's
    UI hides its own ``mlflow.source.git.dirty``, so runs carry it as the visible tag ``git_dirty`` too."""
    from cac.exp.provenance import source_tree

    return source_tree().get("mlflow.source.git.dirty") or "unknown"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists to ``a.b.0.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(obj)[:6000]
    return out


def experiment_id(uri: str, name: str) -> str:
    """The experiment ``name``, created (or restored) if needed, marked as a training experiment
    (:data:`cac.exp.provenance.EXPERIMENT_TAGS`). MLflow 3.17's UI still opens it on its GenAI overview
    unless the browser chose "Model training" (``?workflowType=machine_learning``)."""
    from cac.exp.provenance import EXPERIMENT_TAGS

    client = store_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for key, value in EXPERIMENT_TAGS.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags=EXPERIMENT_TAGS)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is not there yet but could be made (it holds no run, and
    reading it must not create it: a dry run writes nothing); True for every other store (a path under
    a file then fails as a store that cannot be made)."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return True
    path = Path(uri[len("sqlite:///"):])
    return path.exists() or any(parent.is_file() for parent in path.parents)


def find_runs(uri: str, experiment: str, tags: Mapping[str, Any], statuses: Optional[list[str]] = None) -> list:
    """Runs of ``experiment`` whose tags equal ``tags`` (optionally with one of ``statuses``)."""
    if not store_exists(uri):
        return []
    client = store_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)
    return [r for r in runs if statuses is None or r.info.status in statuses]


def find_runs_anywhere(uri: str, tags: Mapping[str, Any], statuses: Optional[list[str]] = None,
                       exclude_tags: Optional[Mapping[str, Any]] = None) -> list:
    """Runs of any active experiment whose tags equal ``tags``, minus those with any of ``exclude_tags``:
    how one spec finds a run of identical identity that another spec trained."""
    if not store_exists(uri):
        return []
    client = store_client(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs(ids, filter_string=query, max_results=1000)
    drop = dict(exclude_tags or {})
    return [r for r in runs if (statuses is None or r.info.status in statuses)
            and not any(r.data.tags.get(k) == str(v) for k, v in drop.items())]


class RunTracker:
    """A handle on one MLflow run (the client API, so nested processes cannot collide).

    With ``journal_dir`` (every training run: ``<work dir>/tracking``) each call is appended to the
    run's journal and delivered by a background courier (:mod:`cac.exp.journal`): training never waits
    for the store, and nothing is lost while it is away. Without one (evaluations, benchmarks, a
    metric added to a FINISHED run) calls go to the store directly. ``offline``: the store did not
    answer when the run was reopened; nothing here may wait for it (the courier delivers later)."""

    def __init__(self, uri: str, run_id: str, journal_dir: Optional[Path] = None, offline: bool = False) -> None:
        self.uri, self.run_id, self.offline = uri, run_id, offline
        self._client = None
        self.journal = self.courier = None
        if journal_dir is not None:
            from cac.exp.journal import Journal, courier_for

            self.journal = Journal(journal_dir, run_id, uri)
            self.courier = courier_for(uri)
            self.courier.add(self.journal)

    @property
    def client(self):
        if self._client is None:
            self._client = store_client(self.uri)
        return self._client

    @classmethod
    def open(cls, uri: str, experiment: str, tags: Mapping[str, Any], name: str,
             journal_dir: Optional[Path] = None) -> "RunTracker":
        from cac.exp.credentials import scrub

        client = store_client(uri)
        run = client.create_run(experiment_id(uri, experiment), tags={k: scrub(str(v)) for k, v in tags.items()},
                                run_name=name)
        return cls(uri, run.info.run_id, journal_dir)

    def _append(self, record: Optional[dict]) -> None:
        if record is not None:
            self.journal.append(record)
            self.courier.poke()

    def reopen(self) -> None:
        """Mark the run RUNNING again; a journaled run also records the steps its store history holds
        from before it had a journal, so a resumed run never logs one of them again."""
        if self.journal is None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        if self.journal.loaded == 0 and not self.offline:
            self._append({"op": "seen", "steps": _store_steps(self.client, self.run_id)})
        self._append({"op": "status", "status": "RUNNING", "t": _now_ms()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow: a key the run has already keeps its first value."""
        from cac.exp.credentials import scrub

        values = {k[:250]: scrub(str(v))[:6000] for k, v in params.items()}
        if self.journal is not None:
            self._append({"op": "params", "values": values})
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """NaN values are skipped (MLflow cannot plot them)."""
        from cac.exp.journal import metric_record

        record = metric_record(metrics, step)
        if self.journal is not None or record is None:
            return self._append(record) if self.journal is not None else None
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, v, record["t"], record["step"])
                                                    for k, v in record["values"].items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from cac.exp.credentials import scrub

        values = {k: scrub(str(v)) for k, v in tags.items()}
        if self.journal is not None:
            return self._append({"op": "tags", "values": values})
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, v)

    def log_inputs(self, datasets: list) -> None:
        """MLflow dataset inputs (the runs table's Dataset column). Runs starting together on a shared
        store (sweep workers, jobs) may both insert the same dataset: the later insert breaks its
        unique key, the dataset then exists, and the retry only links it to this run."""
        if self.journal is not None:
            from cac.exp.credentials import public_url

            return self._append({"op": "inputs", "datasets": [
                {"name": d.dataset.name, "digest": d.dataset.digest, "source_type": d.dataset.source_type,
                 "source": public_url(d.dataset.source), "tags": {t.key: t.value for t in d.tags}} for d in datasets]})
        retry_on_duplicate(lambda: self.client.log_inputs(self.run_id, datasets=datasets))

    def log_artifact(self, path: Path, subdir: Optional[str] = None) -> None:
        """A journaled artifact is read when it is delivered: the file must stay where it is."""
        if self.journal is not None:
            return self._append({"op": "artifact", "path": str(Path(path).resolve()), "dir": subdir})
        self.client.log_artifact(self.run_id, str(path), subdir)

    def finish(self, status: str = "FINISHED") -> None:
        """The run's end: journaled last, so the store shows it only once everything before it arrived."""
        if self.journal is not None:
            return self._append({"op": "status", "status": status, "t": _now_ms()})
        self.client.set_terminated(self.run_id, status=status)

    def settle(self) -> int:
        """Let the courier deliver this run's journal, unless the store is away; returns what waits."""
        return self.courier.settle(self.journal) if self.journal is not None else 0

    def logged_steps(self) -> dict[str, int]:
        """The last step logged of each metric (a resumed run does not log a step again)."""
        if self.journal is not None:
            return self.journal.logged_steps()
        return _store_steps(self.client, self.run_id)

    def latest_metrics(self) -> dict[str, float]:
        """Each metric's latest value as the store shows it once the journal is delivered."""
        if self.journal is not None:
            return self.journal.latest_metrics()
        return dict(self.client.get_run(self.run_id).data.metrics)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _store_steps(client, run_id: str) -> dict[str, int]:
    """The last step the store holds of each metric of ``run_id``."""
    keys = client.get_run(run_id).data.metrics
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}
