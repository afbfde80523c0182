"""Hand a plan to a cluster: one submitit job per unit (row x seed), or per sweep worker.

``--executor slurm`` submits to Slurm; ``--executor local`` runs the same jobs as local processes,
``--jobs`` at a time, each pinned to its own GPUs where there are GPUs (one 8-GPU box, and the tests
on CPU). A job with G GPUs runs G tasks that train with torch.distributed (submitit's distributed
environment gives mmengine its rank, world size and master address). A job is planned again when it
starts, so a requeued or resubmitted job sees what the tracking store holds by then: a preempted or
timed-out job (submitit's checkpoint hook) and a job whose process died (``--retries``) resume from
the newest complete checkpoint in the same MLflow run.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cac.errors import CacError
from cac.exp.options import RunOptions
from cac_cli.commands import DEFAULT_MEM_GB, EXECUTORS  # the command line's own lists

__all__ = ["DispatchOptions", "UnitJob", "dispatch_units", "run_jobs", "make_executor", "job_env", "cpu_threads",
           "limit_threads", "end_reason", "describe_ended", "slurm_parameters", "slurm_script", "job_memory_gb",
           "describe_ask", "DEFAULT_MEM_GB", "dispatch_options", "EXECUTORS"]

_ENV_KEYS = ("CAC_DATA_ROOT", "CAC_WORK_DIR", "CAC_LOG_LEVEL")
# The full store URLs (passwords included) reach a job through the environment it inherits from the
# submitting process (submitit's local jobs, and sbatch's default --export=ALL), never through a file:
# a job's pickle and its Slurm files hold the public URLs only.
TRACKING_ENV, STORAGE_ENV = "MLFLOW_TRACKING_URI", "CAC_SWEEP_STORAGE"


@dataclass(frozen=True)
class DispatchOptions:
    """Where the units of a plan run. ``inline`` (default): in this process, one after another."""

    executor: str = "inline"
    jobs: int = 1  # jobs running at once (local), or Slurm's array-style throttle
    gpus_per_run: int = 0  # 0: no GPU (CPU runs, or whatever this process sees)
    partition: Optional[str] = None
    time_min: int = 24 * 60
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None  # memory each job asks for (CPU jobs: DEFAULT_MEM_GB when unset)
    retries: int = 2  # resubmissions of a job that failed without finishing its unit
    folder: Optional[str] = None  # submitit's logs and pickles
    slurm: dict = field(default_factory=dict)  # more sbatch options (account, qos, constraint, ...)
    poll_s: float = 2.0

    @property
    def tasks(self) -> int:
        return max(1, self.gpus_per_run)




def job_env() -> dict:
    """The environment a job needs from the submitting process (data and work locations), written into
    its pickle; secrets are not among them (see :func:`hand_over`)."""
    return {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}


def hand_over(uri: str, storage: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Put the full tracking URI (and sweep storage) where the jobs inherit them, the environment;
    returns their public forms, which are all a job's pickle carries (:func:`take_over` in the job)."""
    from cac.exp.credentials import public_url

    os.environ[TRACKING_ENV] = uri
    if storage:
        os.environ[STORAGE_ENV] = storage
    return public_url(uri), (public_url(storage) if storage else None)


def take_over(public: Optional[str], env: str = TRACKING_ENV) -> Optional[str]:
    """In a job: the full URL whose public form is ``public``, from the inherited environment."""
    from cac.exp.credentials import remember, with_credentials

    full = with_credentials(public, [os.environ.get(env)])
    remember(full)
    return full


def _distributed_launcher() -> str:
    """Inside a job: export submitit's distributed environment for torch.distributed when the job
    has several tasks; returns the launcher the runner should use."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return "none"
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    return "pytorch"


def limit_threads(threads: Optional[int]) -> None:
    """CPU jobs sharing a machine split its cores instead of each taking all of them."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class UnitJob:
    """One unit as a picklable submitit job. Checkpointable: on preemption or timeout submitit calls
    :meth:`checkpoint`, the job is requeued, and the requeued job resumes the unit's MLflow run from
    its newest complete checkpoint."""

    def __init__(self, spec_path: str, row: str, seed: int, preset: str, options: RunOptions, uri: str,
                 work_root: str, env: Optional[dict] = None, threads: Optional[int] = None) -> None:
        self.spec_path, self.row, self.seed, self.preset = spec_path, row, seed, preset
        self.options, self.uri, self.work_root = options, uri, work_root
        self.env, self.threads = dict(env or {}), threads

    def __call__(self) -> dict:
        os.environ.update(self.env)
        limit_threads(self.threads)
        from cac.exp.journal import drain_all
        from cac.exp.runner import (broadcast, deliver_waiting, init_distributed, is_main_process, execute_unit,
                                    local_state, make_unit, unit_state)
        from cac.exp.spec import load_spec
        from cac.exp.journal import unreachable

        launcher = _distributed_launcher()
        options = self.options
        if launcher != "none":
            init_distributed(launcher)
            from mmengine.dist import get_world_size

            options = dataclasses.replace(options, world_size=get_world_size())
        spec = load_spec(self.spec_path)
        unit = make_unit(spec, spec.row(self.row), self.seed, self.preset, options=options,
                         work_root=Path(self.work_root))
        uri = take_over(self.uri)
        offline = False
        if is_main_process():
            try:  # a requeued job may start while its store is away: it resumes its own run offline
                deliver_waiting(unit, uri)
                found = unit_state(unit, uri)
            except Exception as err:  # noqa: BLE001 - only an unreachable store is worked around
                if not unreachable(err):
                    raise
                print(f"note  {unit.name}: {err}; resuming from its work dir", flush=True)
                found, offline = local_state(unit, uri), True
        state, run_id = broadcast(found if is_main_process() else None)
        if state in ("finished", "shared"):
            return {"state": state, "run_id": run_id}
        metrics = execute_unit(unit, state, run_id, uri, launcher=launcher, offline=offline)
        if is_main_process():
            drain_all()
        if metrics is None:
            return {"state": "busy"}
        if metrics is False:
            return {"state": "failed"}
        return {"state": "done", "mIoU": metrics.get("mIoU")}

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def slurm_parameters(d: DispatchOptions) -> dict:
    """submitit's SlurmExecutor parameters for ``d``: one node, one task per GPU (DDP), USR2 two
    minutes before the time limit (checkpoint and requeue), ``--jobs`` as the array throttle."""
    params: dict = {"time": d.time_min, "ntasks_per_node": d.tasks, "nodes": 1, "signal_delay_s": 120,
                    "array_parallelism": max(1, d.jobs)}
    if d.gpus_per_run:
        params["gpus_per_node"] = d.gpus_per_run
    if d.partition:
        params["partition"] = d.partition
    cpus, mem = cpu_threads(d), job_memory_gb(d)
    if cpus:  # what the job trains with: Slurm then places as many jobs at once as fit
        params["cpus_per_task"] = cpus
    if mem:
        params["mem"] = f"{mem}G"
    extra = dict(d.slurm)
    params.update({k: extra.pop(k) for k in list(extra) if k in ("account", "qos", "constraint", "mem", "comment",
                                                                    "exclusive")})
    if extra:
        params["additional_parameters"] = extra
    return params


def slurm_script(d: DispatchOptions, folder: Path, command: str = "<the job>") -> str:
    """The sbatch file submitit would write for one job of ``d`` (what ``--dry-run`` shows)."""
    from submitit.slurm.slurm import _make_sbatch_string

    try:
        return _make_sbatch_string(command=command, folder=str(folder), **slurm_parameters(d))
    except (TypeError, ValueError) as err:
        raise CacError(f"--slurm: {err}") from None


def make_executor(d: DispatchOptions, folder: Path):
    """A submitit executor for ``d`` (jobs, GPUs, partition, time) writing its logs under ``folder``."""
    import submitit

    if d.executor == "local":
        from cac.exp.localjobs import RecordingLocalExecutor

        executor = RecordingLocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=d.time_min, tasks_per_node=d.tasks, gpus_per_node=d.gpus_per_run)
        return executor
    if d.executor == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=str(folder))
        except RuntimeError as err:  # no srun on this machine
            raise CacError(f"--executor slurm: {err} (on one machine, use --executor local)") from None
        executor.update_parameters(**slurm_parameters(d))
        return executor
    raise CacError(f"unknown executor {d.executor!r}; use one of {', '.join(EXECUTORS)}")


def cpu_threads(d: DispatchOptions) -> Optional[int]:
    """CPU cores a job asks for and trains with (torch's threads): ``--cpus-per-task``, else for CPU
    jobs this machine's cores split over the jobs running at once; None (the cluster's default) for
    GPU jobs without ``--cpus-per-task``, and inline."""
    if d.executor == "inline":
        return None
    if d.cpus_per_task:
        return d.cpus_per_task
    if d.gpus_per_run:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, d.jobs))


def job_memory_gb(d: DispatchOptions) -> Optional[int]:
    """Memory a Slurm job asks for: ``--mem-gb``, else DEFAULT_MEM_GB for CPU jobs (without an ask a
    job of a memory-scheduled partition takes the whole node, so no two run at once); None for GPU
    jobs (the cluster's default) and other executors."""
    if d.executor != "slurm":
        return None
    return d.mem_gb or (None if d.gpus_per_run else DEFAULT_MEM_GB)


def describe_ask(d: DispatchOptions) -> str:
    """What each job asks for, in words (the dry run prints it)."""
    parts = [f"{d.gpus_per_run} GPU(s)"]
    cpus, mem = cpu_threads(d), job_memory_gb(d)
    if cpus:
        parts.append(f"{cpus} CPU(s) (its torch threads)")
    if mem:
        parts.append(f"{mem} GB")
    return ", ".join(parts)


def _gpu_slots(d: DispatchOptions) -> list[tuple[int, ...]]:
    """GPUs of each local job slot: slot i gets GPUs [i*G, (i+1)*G)."""
    g = d.gpus_per_run
    return [tuple(range(i * g, (i + 1) * g)) for i in range(max(1, d.jobs))] if g else [()] * max(1, d.jobs)


_SLURM_STATES = {"OUT_OF_MEMORY": "ran out of memory", "TIMEOUT": "timed out", "PREEMPTED": "was preempted",
                 "NODE_FAIL": "lost its node", "BOOT_FAIL": "could not boot its node", "DEADLINE": "passed its deadline",
                 "CANCELLED": "was cancelled", "FAILED": "failed"}


def describe_ended(record: dict, time_min: Optional[int] = None) -> Optional[str]:
    """Why a local job's tasks ended without finishing, from its controller's record (see
    ``cac.exp.localjobs``): killed by signal N, out of memory, exit code N, timed out; None when
    every task exited with 0 (the job's own outcome then says what happened)."""
    codes = list(record.get("exit_codes") or [])
    if record.get("timed_out"):
        return "timed out" + (f" (limit {time_min} min)" if time_min else "")
    for task, code in enumerate(codes):
        if not code:
            continue
        who = f"task {task}" if len(codes) > 1 else "its process"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown signal"
            if -code == signal.SIGKILL and (record.get("oom_kills") or 0) > 0:
                return (f"ran out of memory ({who} was killed by signal 9, SIGKILL: the kernel's OOM killer "
                        "ran while it did)")
            return f"was killed: {who} got signal {-code} ({name})"
        return f"exited with code {code}: {who} ended before finishing"
    return None


def _exception_line(trace: str) -> str:
    """The last line of a Python traceback: ``RuntimeError: boom``."""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "an exception"


def end_reason(job, err: BaseException, record: Optional[dict] = None, time_min: Optional[int] = None) -> str:
    """What happened to a job that ended without a result, in words, from the job's state: a local
    job's recorded task ends, a Slurm job's final state, or the exception the function raised."""
    from submitit.core.utils import FailedJobError

    if isinstance(err, FailedJobError):  # the job's function raised: submitit pickled the traceback
        trace = str(err).split("-" * 22)
        line = _exception_line(trace[1] if len(trace) > 2 else str(err))
        if "timed-out" in line:  # submitit's own UncompletedJobError on the last allowed timeout
            return "timed out" + (f" (limit {time_min} min)" if time_min else "") + f": {line}"
        return f"raised {line}"
    why = describe_ended(record, time_min) if record is not None else None
    if why:
        return why
    state = str(getattr(job, "state", "") or "").split()
    if state and state[0] in _SLURM_STATES:
        return f"{_SLURM_STATES[state[0]]} (Slurm state {' '.join(state)})"
    if state and state[0] not in ("FINISHED", "COMPLETED", "UNKNOWN"):
        return f"ended in state {' '.join(state)} without a result"
    return f"ended without a result ({type(err).__name__})"


def _outcome(job, d: DispatchOptions) -> tuple[Any, Optional[str]]:
    """``(result, None)`` for a job whose function returned, else ``(exception, why it ended)``. A
    local job whose tasks were killed or exited non-zero is answered from its controller's record,
    without submitit's wait for a result file that will never come."""
    from submitit.core.utils import UncompletedJobError

    record = None
    if d.executor == "local":
        from cac.exp.localjobs import read_ended

        record = read_ended(job.paths.folder, job.job_id)
        if record is not None and describe_ended(record) and not job.paths.result_pickle.exists():
            err = UncompletedJobError(f"job {job.job_id} ended without a result")
            return err, end_reason(job, err, record, d.time_min)
    try:
        return job.result(), None
    except Exception as err:  # the job's process died or raised: its unit resumes when resubmitted
        return err, end_reason(job, err, record, d.time_min)


def _refusal(err: BaseException) -> str:
    """The scheduler's own reason for refusing a submission: sbatch's last ``error:``/``fatal:`` line
    (submitit wraps them in a FailedJobError with its command line and a traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    said = [ln for ln in lines if "error:" in ln or "fatal:" in ln]
    return (said or lines or [type(err).__name__])[-1][:300]


def _submit(executor, job, d: DispatchOptions):
    """``executor.submit(job)``; a submission the scheduler refuses (an unknown partition, GPUs on a
    CPU partition, a bad account, no controller) is one CacError line, before anything is trained."""
    import contextlib
    import io

    said = io.StringIO()  # submitit echoes sbatch's stderr before raising: the one line below says it
    try:
        with contextlib.redirect_stderr(said):
            return executor.submit(job)
    except Exception as err:  # noqa: BLE001 - submitit's FailedJobError, or sbatch missing on a node
        raise CacError(f"--executor {d.executor}: the scheduler refused the job: {_refusal(err)}") from None


def run_jobs(make_job: Callable[[Any], Any], items: list, label: Callable[[Any], str], d: DispatchOptions,
              folder: Path, echo: Callable[[str], None]) -> list[tuple[Any, Any]]:
    """Submit one job per item, ``d.jobs`` at a time; a failed job is resubmitted up to ``d.retries``
    times. Returns ``(item, result or exception)`` per item."""
    executor = make_executor(d, folder)
    slots = _gpu_slots(d)
    free = list(range(len(slots)))
    pending = [(item, 0) for item in items]
    running: dict = {}
    out: list = []
    while pending or running:
        while pending and free:
            item, attempt = pending.pop(0)
            slot = free.pop(0)
            if d.executor == "local" and d.gpus_per_run:
                executor.update_parameters(visible_gpus=slots[slot])
            job = _submit(executor, make_job(item), d)
            echo(f"job   {label(item)}: {d.executor} job {job.job_id}"
                 + (f" on GPUs {','.join(map(str, slots[slot]))}" if slots[slot] else "")
                 + (f" (attempt {attempt + 1})" if attempt else ""))
            running[job.job_id] = (job, item, attempt, slot)
        time.sleep(d.poll_s)
        for job_id in list(running):
            job, item, attempt, slot = running[job_id]
            if not job.done():
                continue
            del running[job_id]
            free.append(slot)
            result, why = _outcome(job, d)
            if why is None:
                out.append((item, result))
            elif attempt < d.retries:
                echo(f"retry {label(item)}: job {job_id} {why}; resubmitted, it resumes from its last checkpoint")
                pending.append((item, attempt + 1))
            else:
                echo(f"error {label(item)}: job {job_id} {why}; {attempt + 1} attempt(s), none finished "
                     f"(log: {job.paths.stderr})")
                out.append((item, result))
    return out


def dispatch_units(spec_path: str, preset: str, units: list, options: RunOptions, uri: str, d: DispatchOptions,
                   echo: Callable[[str], None] = print) -> int:
    """Run ``units`` as jobs; returns how many failed."""
    from cac.exp.runner import WORK_ROOT
    from cac.exp.tracking import prepare_store

    folder = Path(d.folder) if d.folder else WORK_ROOT / "submitit"
    env, threads, root = job_env(), cpu_threads(d), str(WORK_ROOT.resolve())
    prepare_store(uri, sorted({u.spec.name for u in units}))  # before any job: jobs never race to create them
    public, _ = hand_over(uri)

    def make_job(unit) -> UnitJob:
        return UnitJob(spec_path, unit.row.label, unit.seed, preset, options, public, root, env, threads)

    failures = 0
    for unit, result in run_jobs(make_job, units, lambda u: u.name, d, folder, echo):
        if isinstance(result, BaseException) or result.get("state") == "failed":
            failures += 1
        elif result["state"] == "done":
            echo(f"done  {unit.name}: val mIoU {result.get('mIoU') or float('nan'):.2f} (job)")
        elif result["state"] == "busy":
            echo(f"busy  {unit.name}: another process is training it now")
        else:
            echo(f"skip  {unit.name}: {result['state']} (run {result.get('run_id')})")
    return failures


def dispatch_options(args) -> DispatchOptions:
    d = DispatchOptions(executor=getattr(args, "executor", "inline"), jobs=getattr(args, "jobs", 1),
                        gpus_per_run=getattr(args, "gpus_per_run", 0), partition=getattr(args, "partition", None),
                        time_min=getattr(args, "time_min", 24 * 60), cpus_per_task=getattr(args, "cpus_per_task", None),
                        mem_gb=getattr(args, "mem_gb", None),
                        retries=getattr(args, "retries", 2), folder=getattr(args, "submitit_folder", None),
                        slurm=dict(getattr(args, "slurm", None) or {}))
    for name in ("jobs", "time_min") + tuple(n for n in ("cpus_per_task", "mem_gb") if getattr(d, n) is not None):
        if getattr(d, name) < 1:
            raise CacError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(d, name)}")
    for name in ("gpus_per_run", "retries"):
        if getattr(d, name) < 0:
            raise CacError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(d, name)}")
    if d.executor == "inline" and (d.jobs > 1 or d.gpus_per_run or d.partition):
        raise CacError("--jobs, --gpus-per-run and --partition need --executor local or slurm")
    return d
