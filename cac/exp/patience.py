"""An Optuna storage that outlives an outage of its server.

A sweep's workers share one study on a database server; a worker that dies with the server loses the
trial it trained for hours. :class:`PatientStorage` wraps the study's storage: a call that finds the
server unreachable is retried with backoff (up to ``$CAC_STORAGE_PATIENCE`` seconds, default 1800) and
the console says once that the storage is away and once that it is back, so a trial's result is told
when the server returns. Calls made while a trial trains never wait: the heartbeat is skipped, and a
report for the pruner is dropped (:meth:`PatientStorage.should_prune` says False), so training goes on
at full speed. A server that is not refused but silent (its host gone from the network: a connection
then hangs for many minutes) costs a trial at most ``$CAC_PRUNER_WAIT`` seconds (default 10) once.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat

from cac.errors import CacError
from cac.exp.credentials import public_url, scrub
from cac.exp.journal import error_line, unreachable

__all__ = ["PatientStorage", "PATIENCE_ENV", "PRUNER_WAIT_ENV"]

PATIENCE_ENV = "CAC_STORAGE_PATIENCE"
PRUNER_WAIT_ENV = "CAC_PRUNER_WAIT"

# Every storage call a study makes (BaseStorage's and BaseHeartbeat's), delegated with patience.
_DELEGATED = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial",
              "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "remove_session",
              "check_trial_is_updatable", "_get_stale_trial_ids", "get_heartbeat_interval",
              "get_heartbeat_stale_trial_callback")


def _delegate(name: str) -> Callable:
    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    call.__name__ = name
    return call


class PatientStorage(BaseStorage, BaseHeartbeat):
    """``inner`` (an Optuna storage) with the patience described in the module's docstring."""

    def __init__(self, inner: BaseStorage, url: str, echo: Callable[[str], None] = print,
                 patience: float | None = None, report_wait: float | None = None) -> None:
        self._inner, self._shown, self._echo = inner, public_url(url), echo
        self._patience = float(os.environ.get(PATIENCE_ENV, 1800)) if patience is None else patience
        self._report_wait = float(os.environ.get(PRUNER_WAIT_ENV, 10)) if report_wait is None else report_wait
        self._report: threading.Thread | None = None  # a report still waiting for the server
        self._local = threading.local()  # calls of one thread that must not wait (see should_prune)
        self._away = False
        self._lock = threading.Lock()

    vars().update({name: _delegate(name) for name in _DELEGATED})

    def _say_away(self, err: BaseException) -> None:
        with self._lock:
            if not self._away:
                self._away = True
                self._echo(scrub(f"optuna: the storage {self._shown} is unreachable ({error_line(err)}); "
                                 f"waiting for it up to {self._patience:g} s, training goes on"))

    def _say_back(self) -> None:
        with self._lock:
            if self._away:
                self._away = False
                self._echo(f"optuna: the storage {self._shown} answers again")

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._inner, name)
        if getattr(self._local, "impatient", False):
            return method(*args, **kwargs)
        deadline, backoff = None, 0.5
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - only an unreachable server is waited for
                if not unreachable(err):
                    raise
                self._say_away(err)
                deadline = deadline or time.monotonic() + self._patience
                if time.monotonic() > deadline:
                    raise CacError(f"the Optuna storage {self._shown} did not answer for {self._patience:g} s "
                                   f"(${PATIENCE_ENV}); the trial's run is kept and resumes next time") from None
                time.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            self._say_back()
            return result

    def record_heartbeat(self, trial_id: int) -> None:
        """A heartbeat the server cannot take is skipped (the next one, after the outage, counts)."""
        try:
            self._inner.record_heartbeat(trial_id)
        except Exception as err:  # noqa: BLE001 - never end the heartbeat thread over an outage
            if not unreachable(err):
                raise
            self._say_away(err)

    def should_prune(self, trial, value: float, step: int) -> bool:
        """Report ``value`` at ``step`` and ask the pruner, without waiting: while the storage is away
        the step is not reported and the trial trains on (False). The report runs in its own thread:
        one the server leaves unanswered for ``report_wait`` seconds finishes in the background, and
        the reports after it are dropped until it has."""
        if self._report is not None and self._report.is_alive():
            return False
        answer: dict[str, Any] = {}

        def report() -> None:
            self._local.impatient = True  # this thread's storage calls fail at once, never retried
            try:
                trial.report(value, step)
                answer["prune"] = trial.should_prune()
            except Exception as err:  # noqa: BLE001 - judged by the training thread, or dropped if late
                answer["error"] = err

        self._report = threading.Thread(target=report, name="cac-pruner-report", daemon=True)
        self._report.start()
        self._report.join(self._report_wait)
        if self._report.is_alive():
            self._say_away(TimeoutError(f"no answer within {self._report_wait:g} s (${PRUNER_WAIT_ENV})"))
            return False
        err = answer.get("error")
        if err is not None:
            if not unreachable(err):
                raise err
            self._say_away(err)
            return False
        return bool(answer["prune"])
