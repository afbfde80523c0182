"""``cac-exp sweep``: Optuna over CAC options (tau, lambda_kl, ...), every trial one tracked run.

A sweep spec names a base spec and row, the search space, the objective, sampler and pruner::

    title: "tau and lambda_kl"
    spec: ../ablations/table2.yaml      # relative to this file
    row: "(f)"
    seed: 0
    objective: {metric: val/mIoU_pp, direction: maximize}
    search_space:
      tau: {type: float, low: 1.0, high: 30.0, log: true}
      lambda_kl: {type: float, low: 0.01, high: 10.0, log: true}
      design_p: {type: categorical, choices: [proj_concat, proj_sum]}
    sampler: {type: tpe, seed: 0}
    pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 1}

Trials run through the same runner as ``cac-exp run`` (same skip/resume rules: a trial whose
config already has a FINISHED run reuses it). Storage: a SQLite file by default, or any Optuna
storage URL (``postgresql://``, ``mysql://``, ``journal:///path/to/file``) so several processes work
on one study; a trial whose process died is retried by the next process with the same parameters,
and its training resumes from the last checkpoint.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cac.core.classifier import CACOptions
from cac.errors import CacError
from cac.exp.options import run_options
from cac.exp.spec import Spec, SpecError, load_spec, read_yaml, slug

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "cmd_sweep", "study_sampler"]

_TOP = {"title", "description", "spec", "row", "seed", "study", "objective", "search_space", "sampler", "pruner"}
_PARAM = {"type", "low", "high", "log", "choices", "step"}
_SAMPLERS = ("tpe", "random")
_PRUNERS = ("median", "none")


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    title: str
    base: Spec
    row: str
    seed: int
    study: str
    metric: str
    direction: str
    space: dict
    sampler: dict
    pruner: dict


def _fail(path: Path, where: str, msg: str) -> None:
    raise SpecError(f"{path}: {where}: {msg}")


def _check_param(path: Path, name: str, cfg: Any, options: type = CACOptions, owner: str = "CAC") -> dict:
    where = f"search_space.{name}"
    if not isinstance(cfg, dict):
        _fail(path, where, "must be a mapping with type and range")
    unknown = sorted(set(cfg) - _PARAM)
    if unknown:
        _fail(path, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_PARAM))})")
    kind = cfg.get("type")
    if kind in ("float", "int"):
        lo, hi = cfg.get("low"), cfg.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
            _fail(path, where, f"needs numbers low < high, got low={lo!r} high={hi!r}")
        if cfg.get("log") and lo <= 0:
            _fail(path, where, f"a log range needs low > 0, got {lo}")
        if name == "tau" and lo <= 0:
            _fail(path, where, f"tau must be > 0, got low={lo}")
        if name == "lambda_kl" and lo < 0:
            _fail(path, where, f"lambda_kl must be >= 0, got low={lo}")
    elif kind == "categorical":
        if not isinstance(cfg.get("choices"), list) or not cfg["choices"]:
            _fail(path, where, "needs a non-empty list `choices`")
    else:
        _fail(path, where, f"type must be float, int or categorical, got {kind!r}")
    if not name.startswith("cfg.") and name not in options.__dataclass_fields__:
        _fail(path, where, f"unknown {owner} option {name!r} (or use cfg.<dotted config key>)")
    return dict(cfg)


def load_sweep(path: str | Path, model: Optional[str] = None) -> SweepSpec:
    """A sweep spec; ``model`` (``--model``) is the base spec's model for every row, and the study is
    that model's own (``<study>-<model>``), so trials of two base models never share one study."""
    path = Path(path)
    data = read_yaml(path, "sweep spec")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: must be a mapping")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP))})")
    for key in ("title", "spec", "row", "search_space"):
        if key not in data:
            raise SpecError(f"{path}: missing required key {key!r}")
    base = load_spec((path.parent / data["spec"]).resolve()).with_model(model)
    row = base.row(data["row"])
    if row.classifier is not None:  # the row's own classifier's options are what a point sets
        from cac.core.classifiers import classifier_kind

        options_cls, kind = classifier_kind(row.kind).options, row.kind
    else:
        options_cls, kind = CACOptions, "CAC"
    objective = data.get("objective") or {}
    default_metric = "val/mIoU_pp" if row.cac is not None else "val/mIoU"  # a row without CAC has no p_p
    metric, direction = objective.get("metric", default_metric), objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        _fail(path, "objective.direction", f"must be maximize or minimize, got {direction!r}")
    space = data["search_space"]
    if not isinstance(space, dict) or not space:
        _fail(path, "search_space", "must be a non-empty mapping")
    space = {k: _check_param(path, k, v, options_cls, kind) for k, v in space.items()}
    if row.cac is None and metric.endswith(("_pp", "_py")):
        _fail(path, "objective.metric", f"row {row.label} has no CAC, so no {metric}; use val/mIoU or val/mIoU_p")
    sampler = dict(data.get("sampler") or {"type": "tpe"})
    if sampler.get("type", "tpe") not in _SAMPLERS:
        _fail(path, "sampler.type", f"must be one of {', '.join(_SAMPLERS)}")
    pruner = dict(data.get("pruner") or {"type": "median"})
    if pruner.get("type", "median") not in _PRUNERS:
        _fail(path, "pruner.type", f"must be one of {', '.join(_PRUNERS)}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        _fail(path, "seed", f"must be a non-negative integer, got {seed!r}")
    study = str(data.get("study", path.stem))
    if model:
        from cac.mmseg.zoo import resolve_model

        study = f"{study}-{slug(resolve_model(model).name)}"
    return SweepSpec(path, data["title"], base, data["row"], seed, study, metric, direction, space, sampler, pruner)


# -- Optuna -----------------------------------------------------------------------------------------
_STORAGE_HINT = ("use sqlite:///path/optuna.db (the default: sqlite:///<cwd>/optuna.db), journal:///path/file, "
                 "or a reachable postgresql:// or mysql:// database")


def resolve_storage(url: Optional[str]):
    """``(storage, url)`` for ``--storage``: SQLite file by default, ``journal:///file`` for a journal
    file, else an RDB URL. A URL that cannot give a storage (unknown scheme, missing driver, unreachable
    or unopenable database, unwritable file) is one ``CacError`` line, raised before anything runs."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from cac.exp.credentials import public_url, remember

    url = url or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    remember(url)
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal://"):]
        if not path:
            raise CacError(f"--storage {public_url(url)!r}: no journal file; {_STORAGE_HINT}")
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(path)), url
        except OSError as err:
            raise CacError(f"--storage {public_url(url)!r}: cannot use the journal file ({err.strerror or err}); "
                           f"{_STORAGE_HINT}") from None
    if "://" not in url:
        raise CacError(f"--storage {public_url(url)!r} is not a URL; {_STORAGE_HINT}")
    from cac.exp.journal import error_line
    from cac.exp.tracking import check_db_driver, redacted_url

    check_db_driver(url, "--storage")  # a missing driver names the package to install
    # A heartbeat lets another process notice a dead trial and retry it with the same parameters.
    beat = int(os.environ.get("CAC_SWEEP_HEARTBEAT", "10"))  # seconds; a dead trial is retried after 2 beats
    try:
        return RDBStorage(url, heartbeat_interval=beat, grace_period=2 * beat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3)), url
    except Exception as err:  # noqa: BLE001 - SQLAlchemy / driver / Optuna errors: one line, then stop
        raise CacError(f"--storage {redacted_url(url)!r}: cannot open it ({error_line(err)}); {_STORAGE_HINT}") from None


_WORKER_STRIDE = 100_003  # seed distance between dispatched workers: more trials than any study holds


def study_sampler(cfg: dict, trials: int = 0, worker: int = 0):
    """The spec's sampler. The seed is offset by the ``trials`` the study already holds, so a process
    that joins or continues a study does not replay the points the first one drew, and by the
    ``worker``'s index for dispatched workers, which start together on the same study (deterministic
    for one process; undispatched processes started on an empty study at the same instant coincide)."""
    import optuna

    kind, seed = cfg.get("type", "tpe"), cfg.get("seed")
    seed = None if seed is None else int(seed) + trials + _WORKER_STRIDE * worker
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(cfg.get("n_startup_trials", 5)))


def _pruner(cfg: dict):
    import optuna

    if cfg.get("type", "median") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=int(cfg.get("n_startup_trials", 3)),
                                       n_warmup_steps=int(cfg.get("n_warmup_steps", 0)))


def suggest(trial, space: dict) -> dict:
    """Sample one point of the search space from an Optuna trial."""
    out = {}
    for name, cfg in space.items():
        if cfg["type"] == "float":
            out[name] = trial.suggest_float(name, cfg["low"], cfg["high"], log=bool(cfg.get("log")))
        elif cfg["type"] == "int":
            out[name] = trial.suggest_int(name, int(cfg["low"]), int(cfg["high"]), log=bool(cfg.get("log")))
        else:
            out[name] = trial.suggest_categorical(name, cfg["choices"])
    return out


def _worker() -> str:
    """Which process ran a trial (kept as the trial's user attribute ``worker``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _counted(study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def run_sweep(path: str, trials: int, preset: str = "quick", storage: Optional[str] = None,
              tracking_uri: Optional[str] = None, echo: Callable[[str], None] = print,
              report_dir: str = "reports", options=None, worker: int = 0, report: bool = True) -> int:
    """Train trials until the study holds ``trials`` (complete or pruned), then report it.
    ``worker``: the index of a dispatched worker (its sampler's own seed stream); ``report=False``:
    a worker leaves the report to the process that dispatched it."""
    import optuna

    from cac.exp.credentials import public_url
    from cac.exp.journal import drain_all
    from cac.exp.patience import PatientStorage
    from cac.exp.runner import deliver_waiting, execute_unit, make_unit, unit_state
    from cac.exp.tracking import RunTracker, resolve_tracking_uri

    if trials < 1:
        raise CacError(f"--trials must be >= 1, got {trials}")
    sweep = load_sweep(path, getattr(options, "model", None))
    uri = resolve_tracking_uri(tracking_uri)
    store, url = resolve_storage(storage)
    patient = PatientStorage(optuna.storages.get_storage(store), url, echo)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=sweep.study, storage=patient, load_if_exists=True,
                                direction=sweep.direction, pruner=_pruner(sweep.pruner))
    study.sampler = study_sampler(sweep.sampler, len(study.get_trials(deepcopy=False)), worker)
    row = sweep.base.row(sweep.row)

    def objective(trial) -> float:
        trial.set_user_attr("worker", _worker())
        params = suggest(trial, sweep.space)
        cac_extra = {k: v for k, v in params.items() if not k.startswith("cfg.")}
        cfg_extra = {k[4:]: v for k, v in params.items() if k.startswith("cfg.")}
        if row.cac is None and row.classifier is None and cac_extra:
            raise CacError(f"{sweep.path}: row {sweep.row} has no CAC; cannot sweep {sorted(cac_extra)}")
        unit = make_unit(sweep.base, row, sweep.seed, preset, cac_extra=cac_extra, overrides_extra=cfg_extra,
                         extra_tags={"study": sweep.study}, options=options)
        deliver_waiting(unit, uri, echo)  # a killed worker's journal first: its run may have finished
        state, run_id = unit_state(unit, uri)
        if state in ("finished", "shared"):  # the same configuration was trained before: reuse its result
            run = RunTracker(uri, run_id).client.get_run(run_id)
            echo(f"trial {trial.number}: reusing FINISHED run {run_id}")
            return _objective_value(run.data.metrics, sweep.metric)

        def report(step: int, metrics: dict) -> None:
            if sweep.metric in metrics and math.isfinite(metrics[sweep.metric]):
                if patient.should_prune(trial, metrics[sweep.metric], step):  # never waits for the storage
                    stop = optuna.TrialPruned(f"pruned at step {step}")
                    stop.run_tags = {"optuna_state": "PRUNED"}  # execute_unit tags the KILLED run with it
                    raise stop

        echo(f"trial {trial.number}: {', '.join(f'{k}={_fmt(v)}' for k, v in params.items())}")
        metrics = execute_unit(unit, state, run_id, uri, echo=echo, on_eval=report,
                               tags={"trial": trial.number, "study_storage": public_url(url)})
        if metrics is None:  # the same point is being trained by another worker right now
            raise optuna.TrialPruned("another process is training this configuration")
        if metrics is False:
            raise CacError(f"trial {trial.number} failed (non-finite loss)")
        return _objective_value(metrics["tracked"], sweep.metric)

    done = _counted(study)
    if done >= trials:
        echo(f"study {sweep.study} already has {done} trials (>= {trials})")
    else:
        stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                              optuna.trial.TrialState.PRUNED))
        _optimize(study, objective, trials, stop, echo)
    drain_all(echo=echo)
    if report:
        _report(study, sweep, Path(report_dir), echo)
    return 0


def _optimize(study, objective, trials: int, stop, echo: Callable[[str], None]) -> None:
    """``study.optimize`` until the study holds ``trials``. A trial that another worker failed as stale
    while the storage was away (its heartbeats could not be recorded) cannot be told its value: its
    retry, with the same parameters, finds this trial's FINISHED run and reuses it."""
    while _counted(study) < trials:
        try:
            study.optimize(objective, n_trials=trials - _counted(study), callbacks=[stop], catch=())
            return
        except ValueError as err:
            if not str(err).startswith("Cannot tell a"):
                raise
            echo(f"note  {err}: another worker failed it while the storage was away; its retry reuses this run")


def _objective_value(metrics: dict, metric: str) -> float:
    if metric not in metrics:
        raise CacError(f"objective metric {metric!r} was not logged by the run (available: {sorted(metrics)})")
    return float(metrics[metric])


def _totals(study) -> str:
    """``4 trials (3 complete, 1 pruned, 0 failed) by 2 workers``: the study's trials by state and the
    processes that ran them."""
    import optuna

    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(1 for t in trials if t.state == s) for s in state}
    running = f", {count[state.RUNNING]} running" if count[state.RUNNING] else ""
    workers = {t.user_attrs.get("worker") for t in trials if t.user_attrs.get("worker")}
    return (f"{len(trials)} trials ({count[state.COMPLETE]} complete, {count[state.PRUNED]} pruned, "
            f"{count[state.FAIL]} failed{running}) by {len(workers)} worker{'s' if len(workers) != 1 else ''}")


def _report(study, sweep: SweepSpec, out: Path, echo: Callable[[str], None]) -> None:
    """The study's totals, best parameters, every completed trial (best first), a parameter-importance
    figure and the parameter response plot."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    echo(f"study {sweep.study}: {_totals(study)}")
    if not complete:
        echo(f"study {sweep.study}: no completed trials yet")
        return
    best = study.best_trial
    echo(f"best trial {best.number}: {sweep.metric} = {best.value:.2f} with "
         + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sweep `{sweep.study}`: {sweep.title}", "",
             f"Objective: {sweep.direction} `{sweep.metric}`; {len(complete)} completed trials.", "",
             f"Best trial {best.number}: **{best.value:.2f}**", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in best.params.items()]
    names = list(sweep.space)
    ranked = sorted(complete, key=lambda t: t.value, reverse=sweep.direction == "maximize")
    lines += ["", "## Completed trials", "", "| trial | " + " | ".join(names) + f" | {sweep.metric} |",
              "|---" * (len(names) + 2) + "|"]
    lines += [f"| {t.number} | " + " | ".join(_fmt(t.params.get(n, "")) for n in names) + f" | {t.value:.2f} |"
              for t in ranked]
    if pruned:
        lines += ["", f"Pruned trials: {', '.join(str(t.number) for t in pruned)}."]
    (out / f"sweep_{sweep.study}.md").write_text("\n".join(lines) + "\n")
    _plot_sweep(study, sweep, figures, complete)
    echo(f"report: {out / f'sweep_{sweep.study}.md'} (figures in {figures})")


def _plot_sweep(study, sweep: SweepSpec, figures: Path, complete: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    names = list(sweep.space)
    if len(complete) >= 2 and len(names) >= 2:
        try:
            imp = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):  # too few distinct trials to fit the evaluator
            imp = {}
        if imp:
            fig, ax = plt.subplots(figsize=(5, 2 + 0.4 * len(imp)))
            ax.barh(list(imp)[::-1], list(imp.values())[::-1], color="#4c72b0")
            ax.set_xlabel("importance (fANOVA)")
            ax.set_title(f"{sweep.study}: parameter importance")
            fig.tight_layout()
            for ext in ("png", "pdf"):
                fig.savefig(figures / f"sweep_{sweep.study}_importance.{ext}")
            plt.close(fig)
    numeric = [n for n in names if sweep.space[n]["type"] != "categorical"]
    values = [t.value for t in complete]
    fig, axes = plt.subplots(1, max(1, len(numeric[:2])) + (1 if len(numeric) >= 2 else 0),
                             figsize=(4.5 * (len(numeric[:2]) + (1 if len(numeric) >= 2 else 0)), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, name in zip(axes, numeric[:2]):
        ax.scatter([t.params[name] for t in complete], values, c="#4c72b0")
        ax.set_xscale("log" if sweep.space[name].get("log") else "linear")
        ax.set_xlabel(name)
        ax.set_ylabel(sweep.metric)
    if len(numeric) >= 2:
        ax = axes[-1]
        a, b = numeric[:2]
        sc = ax.scatter([t.params[a] for t in complete], [t.params[b] for t in complete], c=values, cmap="viridis")
        ax.set_xscale("log" if sweep.space[a].get("log") else "linear")
        ax.set_yscale("log" if sweep.space[b].get("log") else "linear")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        fig.colorbar(sc, ax=ax, label=sweep.metric)
    fig.suptitle(f"{sweep.study}: response")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(figures / f"sweep_{sweep.study}_response.{ext}")
    plt.close(fig)


def cmd_sweep(args) -> int:
    from cac.exp.dispatch import dispatch_options

    d = dispatch_options(args)
    if d.executor == "inline":
        return run_sweep(args.spec, args.trials, args.preset, args.storage, args.tracking_uri, report_dir=args.out,
                         options=run_options(args))
    return 1 if dispatch_sweep(args.spec, args.trials, args.preset, args.storage, args.tracking_uri, args.out,
                               run_options(args), d) else 0


class SweepJob:
    """One Optuna worker as a submitit job: workers share the study's storage and each trains trials
    until the study holds the requested total. Checkpointable like ``cac.exp.dispatch.UnitJob`` (an
    interrupted trial is retried with its parameters and resumes its run)."""

    def __init__(self, path: str, trials: int, preset: str, storage: Optional[str], uri: Optional[str],
                 report_dir: str, options, env: Optional[dict] = None, threads: Optional[int] = None,
                 worker: int = 0) -> None:
        self.args = (path, trials, preset, storage, uri)
        self.report_dir, self.options, self.env, self.threads = report_dir, options, dict(env or {}), threads
        self.worker = worker

    def __call__(self) -> int:
        from cac.exp.dispatch import STORAGE_ENV, limit_threads, take_over

        os.environ.update(self.env)
        limit_threads(self.threads)
        path, trials, preset, storage, uri = self.args
        return run_sweep(path, trials, preset, take_over(storage, STORAGE_ENV), take_over(uri),
                         report_dir=self.report_dir, options=self.options, worker=self.worker, report=False)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def dispatch_sweep(path: str, trials: int, preset: str, storage: Optional[str], uri: Optional[str], report_dir: str,
                   options, d, echo: Callable[[str], None] = print) -> int:
    """``d.jobs`` sweep workers as submitit jobs on one shared Optuna storage; returns how many failed."""
    import optuna

    from cac.exp.dispatch import cpu_threads, hand_over, job_env, run_jobs
    from cac.exp.runner import WORK_ROOT
    from cac.exp.tracking import prepare_store, resolve_tracking_uri

    if trials < 1:
        raise CacError(f"--trials must be >= 1, got {trials}")
    if storage is None or storage.startswith("sqlite:///:memory:"):
        storage = f"sqlite:///{Path('optuna.db').resolve()}"  # workers in other processes must share it
    sweep = load_sweep(path, getattr(options, "model", None))
    store, storage = resolve_storage(storage)
    uri = resolve_tracking_uri(uri)  # here, so every worker tracks where this process would
    # Created once here, before any worker starts: the study (Optuna's own first-creation race), the
    # tracking store's schema and the experiment the trials' runs go to (MLflow's races on a fresh
    # database: one worker's CREATE TABLE fails and its trial with it).
    optuna.create_study(study_name=sweep.study, storage=store, direction=sweep.direction, load_if_exists=True)
    prepare_store(uri, [sweep.base.name])
    folder = Path(d.folder) if d.folder else WORK_ROOT / "submitit"
    env, threads = job_env(), cpu_threads(d)
    public_uri, public_storage = hand_over(uri, storage)  # jobs inherit the full URLs; their pickles hold these
    results = run_jobs(lambda i: SweepJob(path, trials, preset, public_storage, public_uri, report_dir, options, env,
                                          threads, i),
                       list(range(max(1, d.jobs))), lambda i: f"sweep worker {i}", d, folder, echo)
    study = optuna.load_study(study_name=sweep.study, storage=store)
    _report(study, sweep, Path(report_dir), echo)  # what every worker added, as an inline sweep reports it
    return sum(1 for _, r in results if isinstance(r, BaseException) or r)
