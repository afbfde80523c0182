"""A run's tracking journal: training never waits for its tracking store, and nothing it logs is lost.

What a training run logs (metrics, params, tags, inputs, artifacts, its status) is appended to a
journal in its work dir (``<work dir>/tracking/<run id>.jsonl``, one JSON record a line, flushed to
disk), and a background courier thread delivers the records to the MLflow store in order, counting
what the store has acknowledged in ``<run id>.sent``. While the store is unreachable the run trains
on and the records wait; the console says so once, and once more when they are delivered. A process
killed meanwhile leaves its journal: the next ``cac-exp run`` of the unit, or ``cac-exp sync``,
delivers it before anything else. Each metric reaches the store once: a batch whose delivery may have
landed before its answer was lost (a timeout, a kill) is checked against the store's history first.
The status record comes last, so a run is FINISHED in the store only once everything before it is.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from cac.exp.credentials import public_url, scrub

__all__ = ["Journal", "Courier", "courier_for", "drain_all", "waiting_journals", "deliver_journal", "metric_record", "sync",
           "unreachable", "retry_on_duplicate", "error_line",
           "JOURNAL_DIR", "DRAIN_ENV", "STALL_ENV"]

JOURNAL_DIR = "tracking"  # a unit's journals, in its work dir
DRAIN_ENV = "CAC_TRACKING_DRAIN"  # seconds without delivery before a finishing process stops waiting (default 30)
STALL_ENV = "CAC_TRACKING_STALL"  # seconds a delivery may hang before the store counts as unreachable (default 10)
LINGER_ENV = "CAC_TRACKING_LINGER"  # seconds metrics wait to travel with later ones, one request (default 2)
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits
# MLflow's answers that no retry will change: the record is skipped (and said), not retried forever
_PERMANENT = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED",
              "UNAUTHENTICATED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _seconds(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env, default))
    except ValueError:
        return default


class Journal:
    """The append-only record of one run's tracking calls. Thread-safe: the training thread appends,
    the courier takes and acknowledges."""

    def __init__(self, folder: Path, run_id: str, store: str) -> None:
        self.folder, self.run_id, self.store = Path(folder), run_id, public_url(store)
        self.path = self.folder / f"{run_id}.jsonl"
        self.sent_path = self.folder / f"{run_id}.sent"
        self.lock = threading.Lock()
        self.suspect = False  # the next delivery may have landed already (a batch sent before a failure or a kill)
        self._pending: list[dict] = []
        self._sent = 0
        self._steps: dict[str, int] = {}  # the last step logged of each metric, delivered or not
        self._latest: dict[str, tuple[int, int, float]] = {}  # metric -> (step, time, value): the store's "latest"
        self._status: Optional[str] = None
        self.loaded = 0  # records this journal held before this process opened it
        self._load()

    # -- the file ---------------------------------------------------------------------------------
    def _load(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        records: list[dict] = []
        if self.path.is_file():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a record torn by a kill mid-write was never acknowledged: dropped
                with open(self.path, "r+b") as fh:
                    fh.truncate(end)
            for line in data[:end].splitlines():
                with _suppress_bad_line():
                    records.append(json.loads(line))
        if not records:
            self._write([{"op": "run", "run_id": self.run_id, "store": self.store, "t": _now_ms()}])
        else:
            header = records[0]
            if header.get("op") == "run" and header.get("store") not in (None, self.store):
                self.store = header["store"]  # the journal's own store wins: it is whose records these are
            records = records[1:]
        try:
            self._sent = min(int(self.sent_path.read_text().split()[0]), len(records))
        except (OSError, ValueError, IndexError):
            self._sent = 0
        for record in records:
            self._note(record)
        self._pending = records[self._sent:]
        self.loaded = len(records)
        self.suspect = bool(self._pending)  # a killed process may have delivered its last batch unacknowledged

    def _write(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())

    def _note(self, record: dict) -> None:
        op = record.get("op")
        if op == "metrics":
            step, t = int(record["step"]), int(record["t"])
            for key, value in record["values"].items():
                self._steps[key] = max(self._steps.get(key, -1), step)
                if (step, t) >= self._latest.get(key, (-1, -1, 0.0))[:2]:
                    self._latest[key] = (step, t, value)
        elif op == "seen":  # steps the store held before the run had a journal (never delivered)
            for key, step in record["steps"].items():
                self._steps[key] = max(self._steps.get(key, -1), int(step))
        elif op == "status":
            self._status = record["status"]

    # -- the training side ------------------------------------------------------------------------
    def append(self, *records: dict) -> None:
        with self.lock:
            self._write(list(records))
            for record in records:
                self._note(record)
            self._pending.extend(records)

    def logged_steps(self) -> dict[str, int]:
        """The last step of each metric this run logged, delivered or not."""
        with self.lock:
            return dict(self._steps)

    def latest_metrics(self) -> dict[str, float]:
        """Each metric's latest value (largest step, then time), as the store reports a run's metrics."""
        with self.lock:
            return {k: v[2] for k, v in self._latest.items()}

    @property
    def status(self) -> Optional[str]:
        """The last status the run was given here (RUNNING, FINISHED, KILLED, FAILED), or None."""
        return self._status

    # -- the courier's side -----------------------------------------------------------------------
    def pending(self) -> int:
        with self.lock:
            return len(self._pending)

    def head(self) -> list[dict]:
        """The records the next delivery may take (a copy; they stay pending until acknowledged)."""
        with self.lock:
            return list(self._pending[:_MAX_METRICS])

    def acknowledge(self, count: int) -> None:
        """``count`` records from the head reached the store."""
        with self.lock:
            del self._pending[:count]
            self._sent += count
            tmp = self.sent_path.with_suffix(".sent.tmp")
            tmp.write_text(f"{self._sent}\n")
            os.replace(tmp, self.sent_path)
            self.suspect = False


class _suppress_bad_line:
    """A line that is not JSON (a torn write that did end in a newline) is skipped."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, ValueError)


# -- delivery -------------------------------------------------------------------------------------
def _batch(records: list[dict]) -> tuple[str, list[dict]]:
    """The op and the leading records one store call delivers: consecutive metrics records up to
    MLflow's 1000 metrics a batch, else the first record alone."""
    op = records[0]["op"]
    if op != "metrics":
        return op, records[:1]
    taken, size = [], 0
    for record in records:
        if record["op"] != "metrics" or (taken and size + len(record["values"]) > _MAX_METRICS):
            break
        taken.append(record)
        size += len(record["values"])
    return op, taken


def _send(client, run_id: str, op: str, records: list[dict], suspect: bool) -> Optional[str]:
    """Deliver ``records`` (one :func:`_batch`) to run ``run_id``; returns a note when something was
    skipped. ``suspect``: the batch may have landed before (check the store, never deliver twice)."""
    from mlflow.entities import Metric, Param, RunTag

    if op == "metrics":
        metrics = [Metric(k, float(v), int(r["t"]), int(r["step"])) for r in records for k, v in r["values"].items()]
        if suspect:
            have = {}
            for key in {m.key for m in metrics}:
                have[key] = {(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)}
            metrics = [m for m in metrics if (m.step, m.timestamp, m.value) not in have[m.key]]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
    elif op == "params":
        existing = client.get_run(run_id).data.params  # params are immutable: the first value logged stays
        items = [Param(k, v) for k, v in records[0]["values"].items() if k not in existing]
        for i in range(0, len(items), _MAX_PARAMS):
            client.log_batch(run_id, params=items[i:i + _MAX_PARAMS])
    elif op == "tags":
        items = [RunTag(k, v) for k, v in records[0]["values"].items()]
        for i in range(0, len(items), _MAX_TAGS):
            client.log_batch(run_id, tags=items[i:i + _MAX_TAGS])
    elif op == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                                       source=d["source"]), [InputTag(k, v) for k, v in d["tags"].items()])
                  for d in records[0]["datasets"] if (d["name"], d["digest"]) not in have]
        if inputs:
            retry_on_duplicate(lambda: client.log_inputs(run_id, datasets=inputs))
    elif op == "artifact":
        path = Path(records[0]["path"])
        if not path.exists():
            return f"artifact {path} of run {run_id} is gone; not delivered"
        client.log_artifact(run_id, str(path), records[0].get("dir"))
    elif op == "seen":
        pass  # a note for the journal's reader, not for the store
    elif op == "status":
        status = records[0]["status"]
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status, end_time=int(records[0]["t"]))
    return None


def _permanent(err: BaseException) -> bool:
    """An answer of the store that a retry cannot change (a refused value, a deleted run)."""
    code = getattr(err, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT


def deliver_journal(journal: Journal, client, say: Callable[[str], None]) -> int:
    """Deliver ``journal``'s next batch; returns the number of records acknowledged. Raises what the
    store raised when it did not answer (the records stay pending, the journal suspect)."""
    records = journal.head()
    if not records:
        return 0
    op, batch = _batch(records)
    try:
        note = _send(client, journal.run_id, op, batch, journal.suspect)
    except Exception as err:  # noqa: BLE001 - the store's answer decides: skip a refusal, retry the rest
        if not _permanent(err):
            journal.suspect = True
            raise
        note = f"the store refused {op} of run {journal.run_id} ({error_line(err)}); skipped"
    if note:
        say(note)
    journal.acknowledge(len(batch))
    return len(batch)


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says a server could not be reached or dropped the connection
    (a database's OperationalError, a refused or timed-out connection), not that it refused a request."""
    names = {"StoreUnreachable", "OperationalError", "InterfaceError", "DisconnectionError", "ConnectionError",
             "TimeoutError"}
    for _ in range(10):
        if err is None:
            return False
        if names & {c.__name__ for c in type(err).__mro__} or isinstance(err, OSError):
            return True
        err = err.__cause__ or err.__context__
    return False


_DUPLICATE = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry", "IntegrityError")


def retry_on_duplicate(call, tries: int = 3):
    """``call()``, again (up to ``tries`` times) when the store refused a row another process inserted
    first (a unique-key violation on PostgreSQL, SQLite or MySQL); any other error is raised at once."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            return call()
        except MlflowException as err:
            if attempt == tries - 1 or not any(word in str(err) for word in _DUPLICATE):
                raise
            time.sleep(0.05 * (attempt + 1))


def error_line(err: BaseException) -> str:
    """What went wrong, in one short line: the deepest error of the chain that names it (a refused
    connection: an OSError, or the database layer's error), not a client's generic wrapping of it
    (Optuna's "An exception is raised during the commit"); ``Type: first line``, credentials scrubbed."""
    chain, seen = [err], {id(err)}
    while len(chain) < 10:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    named = [e for e in chain if isinstance(e, OSError) or type(e).__module__.split(".")[0] == "sqlalchemy"]
    root = named[-1] if named else err
    text = str(root).strip()
    return scrub(f"{type(root).__name__}: {text.splitlines()[0][:160]}" if text else type(root).__name__)


_COURIER_THREAD = "cac-tracking "  # the courier threads' names begin so


class _QuietInCourier(logging.Filter):
    """MLflow's database store logs each failed call with its traceback (``mlflow.store.db.utils``, at
    ERROR): through an outage, one traceback per delivery attempt, hours of them in a job's log. From a
    courier's thread they are dropped: the courier says once that the store is away (with the error's
    first line) and once that it answers again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(_COURIER_THREAD)


_QUIET_IN_COURIER = _QuietInCourier()


def _say(line: str) -> None:
    print(f"tracking: {scrub(line)}", file=sys.stderr, flush=True)


class Courier:
    """One background thread delivering the journals of one store, in order within each run. Training
    threads only append (:meth:`add` a journal once, then :meth:`poke` after appending)."""

    def __init__(self, uri: str, say: Callable[[str], None] = _say) -> None:
        self.uri, self.store, self.say = uri, public_url(uri), say
        self.journals: list[Journal] = []
        self.cond = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.client = None
        self.attempt_since: Optional[float] = None  # when the delivery now in flight began
        self.failed: Optional[str] = None  # the last failure of this outage, if one is going on
        self.announced = False  # the outage was said
        self.delivered = 0  # records delivered since the outage was said
        self.hurry = 0  # callers waiting for delivery (settle, drain): nothing lingers meanwhile

    # -- the training side ------------------------------------------------------------------------
    def add(self, journal: Journal) -> None:
        with self.cond:
            if journal not in self.journals:
                self.journals.append(journal)
            self._start()
            self.cond.notify_all()

    def poke(self) -> None:
        """New records: wake the courier; say once if the store stopped answering."""
        with self.cond:
            self.cond.notify_all()
        self._announce()

    def pending(self) -> int:
        return sum(j.pending() for j in list(self.journals))

    def away(self) -> bool:
        """Whether the store is failing now (a delivery failed, or hangs longer than the stall time)."""
        stalled = self.attempt_since is not None and time.monotonic() - self.attempt_since > _seconds(STALL_ENV, 10.0)
        return bool(self.failed) or stalled

    def settle(self, journal: Journal) -> int:
        """Wait for ``journal``'s records while the store takes them; not at all while it is away (the
        end of a unit never waits for an outage: :meth:`drain` at the end of the command does).
        Returns the records still waiting."""
        with self._hurried():
            while journal.pending() and not self.away():
                with self.cond:
                    self.cond.wait(0.05)
        self._announce()
        return journal.pending()

    @contextlib.contextmanager
    def _hurried(self) -> Iterator[None]:
        with self.cond:
            self.hurry += 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.hurry -= 1

    def drain(self, patience: Optional[float] = None) -> int:
        """Wait while records are delivered; stop after ``patience`` seconds (``$CAC_TRACKING_DRAIN``,
        default 30) without a delivery. Returns the records still waiting."""
        patience = _seconds(DRAIN_ENV, 30.0) if patience is None else patience
        left = self.pending()
        deadline = time.monotonic() + patience
        with self._hurried():
            while left and time.monotonic() < deadline:
                with self.cond:
                    self.cond.wait(0.1)
                now = self.pending()
                if now < left:
                    left, deadline = now, time.monotonic() + patience
                self._announce()
        return self.pending()

    # -- the thread -------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            logging.getLogger("mlflow.store.db.utils").addFilter(_QUIET_IN_COURIER)  # once: a filter is added once
            self.thread = threading.Thread(target=self._loop, name=f"{_COURIER_THREAD}{self.store}", daemon=True)
            self.thread.start()

    def _announce(self) -> None:
        if not self.announced and self.away():
            self.announced = True
            self.delivered = 0
            waiting = [j for j in list(self.journals) if j.pending()]
            where = ", ".join(str(j.path) for j in waiting[:3]) + (" ..." if len(waiting) > 3 else "")
            why = self.failed or f"no answer within {_seconds(STALL_ENV, 10.0):g} s"
            self.say(f"the store {self.store} is unreachable ({why}); training goes on, "
                     f"{self.pending()} records wait in {where}")

    def _next(self) -> Optional[Journal]:
        for journal in self.journals:
            if journal.pending():
                return journal
        return None

    def _lingering(self, journal: Journal) -> float:
        """Seconds to wait before delivering ``journal``'s head: metrics travel together, so a store
        server handles a request every few seconds, not one per logging interval (it shares the
        machine's cores with training). Nothing lingers when a caller waits for delivery."""
        head = journal.head()
        if self.hurry or not head or head[0]["op"] != "metrics" or len(head) >= 100:
            return 0.0
        return max(0.0, _seconds(LINGER_ENV, 2.0) - (time.time() * 1000 - head[0]["t"]) / 1000)

    def _loop(self) -> None:
        backoff = 0.5
        while True:
            with self.cond:
                journal = self._next()
                while journal is None or self._lingering(journal):
                    self.cond.wait(self._lingering(journal) if journal is not None else None)
                    journal = self._next()
            try:
                if self.client is None:
                    import mlflow

                    self.client = mlflow.MlflowClient(tracking_uri=self.uri)
                self.attempt_since = time.monotonic()
                count = deliver_journal(journal, self.client, self.say)
            except Exception as err:  # noqa: BLE001 - unreachable or failing: the records wait, retried later
                self.attempt_since = None
                self.failed = error_line(err)
                self._announce()
                time.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            self.attempt_since, self.failed, backoff = None, None, 0.5
            with self.cond:
                self.delivered += count
                if self.announced and not self.pending():
                    self.say(f"the store {self.store} answers again: {self.delivered} waiting records delivered")
                    self.announced = False
                self.cond.notify_all()


_COURIERS: dict[str, Courier] = {}
_COURIERS_LOCK = threading.Lock()


def courier_for(uri: str) -> Courier:
    """This process's courier for the store ``uri`` (one thread per store)."""
    # MLflow's client prints a "View run" line per finished run of a server store: from the courier's
    # thread that would land in the middle of a progress bar (cac's own lines name each run)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with _COURIERS_LOCK:
        if uri not in _COURIERS:
            _COURIERS[uri] = Courier(uri)
        return _COURIERS[uri]


def drain_all(patience: Optional[float] = None, echo: Callable[[str], None] = print) -> int:
    """Let every courier of this process deliver what waits (see :meth:`Courier.drain`); say what is
    left and how to deliver it. Returns the records still waiting."""
    left = 0
    for courier in list(_COURIERS.values()):
        waiting = courier.drain(patience)
        if waiting:
            runs = sum(1 for j in courier.journals if j.pending())
            echo(f"tracking: the store {courier.store} is still unreachable: {waiting} records of {runs} run(s) "
                 f"wait in their journals (<work dir>/{JOURNAL_DIR}/); they are delivered by "
                 f"`cac-exp sync --tracking-uri {courier.store}` or by the next cac-exp run of the same units")
        left += waiting
    return left


def waiting_journals(roots: Iterable[Path], store: Optional[str] = None) -> list[Journal]:
    """The journals under ``roots`` with records still to deliver (of ``store`` only, when given)."""
    out = []
    for root in roots:
        for path in sorted(Path(root).glob(f"**/{JOURNAL_DIR}/*.jsonl")):
            sent = path.with_suffix(".sent")
            lines = _count_records(path)
            try:
                done = int(sent.read_text().split()[0]) if sent.is_file() else 0
            except (ValueError, IndexError):
                done = 0
            if lines > done:
                journal = Journal(path.parent, path.stem, "")
                if journal.pending() and (store is None or journal.store == public_url(store)):
                    out.append(journal)
    return out


def sync(roots: Iterable[Path], uri: str, connect: Callable[[str], Any], echo: Callable[[str], None] = print) -> int:
    """``cac-exp sync``: deliver what the journals under ``roots`` hold for the store ``uri`` (a process
    that ended while its store was away), through the client ``connect(uri)`` makes. Returns 0 when
    nothing of this store waits any more, 1 when the store stopped answering (the rest waits)."""
    from cac.exp.workdirs import work_dir_lock

    store = public_url(uri)
    waiting = waiting_journals(roots)
    mine = [j for j in waiting if j.store == store]
    others = sorted({j.store for j in waiting if j.store != store})
    if others:
        echo(f"sync: journals under {', '.join(map(str, roots))} also wait for {', '.join(others)}; "
             "pass that store as --tracking-uri to deliver them")
    if not mine:
        echo(f"sync: nothing waits for {store} under {', '.join(map(str, roots))}")
        return 0
    client = connect(uri)  # an unreachable server: one CacError line here
    for journal in mine:
        unit = journal.folder.parent  # the unit's work dir: whoever trains it delivers its journal itself
        with work_dir_lock(unit) as locked:
            if not locked:
                echo(f"busy  {unit}: a process is training it; it delivers its own journal")
                continue
            count = journal.pending()
            try:
                while journal.pending():
                    deliver_journal(journal, client, lambda line: echo(f"note  {line}"))
            except Exception as err:  # noqa: BLE001 - the store went away again: the rest waits
                if not unreachable(err):
                    raise
                echo(f"sync: {store} stopped answering ({error_line(err)}); "
                     f"{sum(j.pending() for j in mine)} records still wait")
                return 1
            echo(f"sync  run {journal.run_id}: {count} records delivered to {store} ({unit})")
    return 0


def _count_records(path: Path) -> int:
    """Records in a journal file (its header line excluded)."""
    with open(path, "rb") as fh:
        return max(0, sum(1 for _ in fh) - 1)


def metric_record(metrics: Mapping[str, Any], step: int) -> Optional[dict]:
    """A metrics record (NaN values are not logged, as MLflow cannot plot them), or None if empty."""
    values = {k: float(v) for k, v in metrics.items() if float(v) == float(v)}
    return {"op": "metrics", "step": int(step), "t": _now_ms(), "values": values} if values else None
