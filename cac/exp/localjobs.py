"""``--executor local``: submitit's local executor, with a job controller that records how the job's
tasks ended, so the submitting process can say why a job did not finish (killed by a signal, an exit
code, out of memory, timed out) instead of quoting the last line of its log.

submitit's own controller (``submitit.local.local.Controller``) knows each task's exit code and
whether the job timed out, then exits 0 whatever happened. The controller here is the same class,
run as this file (``python -P localjobs.py FOLDER``: it imports submitit and nothing of ``cac``, so a
job starts no slower), writing ``<folder>/<job id>_ended.json`` after each round of tasks::

    {"exit_codes": [-9], "timed_out": false, "oom_kills": 1}

``exit_codes`` as ``subprocess`` gives them (``-N``: killed by signal N, ``null``: still running at
the time limit), ``oom_kills``: how many processes the kernel's OOM killer ended in this machine's
memory cgroup while the tasks ran (``null`` where the counter cannot be read).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from submitit.core import utils
from submitit.local.local import Controller, LocalExecutor, LocalJob

__all__ = ["RecordingLocalExecutor", "ended_path", "read_ended"]

_CGROUP = Path("/sys/fs/cgroup")


def ended_path(folder: Path, job_id: str) -> Path:
    """Where the controller of job ``job_id`` records how its tasks ended."""
    return utils.JobPaths(folder, job_id).folder / f"{job_id}_ended.json"


def read_ended(folder: Path, job_id: str) -> Optional[dict]:
    """The controller's record of job ``job_id``, or None (not written, or not a local job)."""
    try:
        return json.loads(ended_path(folder, job_id).read_text())
    except (OSError, ValueError):
        return None


def _own_cgroup_v2() -> Optional[Path]:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return _CGROUP / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def oom_kills() -> Optional[int]:
    """The kernel's count of OOM kills in this process's memory cgroup (v2 ``memory.events``, v1
    ``memory.oom_control``), or None where neither can be read."""
    for path in (_own_cgroup_v2(), _CGROUP, _CGROUP / "memory"):
        if path is None:
            continue
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (path / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
    return None


class RecordingController(Controller):
    """submitit's local controller that also records each round's task exit codes."""

    def wait(self, freq: int = 24):
        before = oom_kills()
        codes = super().wait(freq)
        after = oom_kills()
        record = {"exit_codes": list(codes), "timed_out": any(c is None for c in codes),
                  "oom_kills": None if before is None or after is None else after - before}
        path = ended_path(self.folder, self.pid)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)  # the submitting process never reads half a record
        return codes


class RecordingLocalExecutor(LocalExecutor):
    """submitit's ``LocalExecutor`` whose jobs run under :class:`RecordingController`. The controller's
    environment is the one ``submitit.local.local.start_controller`` gives its own (submitit 1.5.4)."""

    def _submit_command(self, command: str) -> LocalJob:
        ntasks = self.parameters.get("tasks_per_node", 1)
        n_gpus = self.parameters.get("gpus_per_node", 0)
        visible = self.parameters.get("visible_gpus", ())
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        env = dict(os.environ)
        env.update(SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
                   SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
                   SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                   SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                   SUBMITIT_STDERR_TO_STDOUT="1" if self.parameters.get("stderr_to_stdout", False) else "",
                   SUBMITIT_EXECUTOR="local", CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus),
                   SUBMITIT_LOCAL_WITH_SHELL="")
        # -P: this file's folder is not put on sys.path (its modules would shadow others by name)
        process = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), str(self.folder)], env=env)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


if __name__ == "__main__":
    RecordingController(Path(sys.argv[1])).run()
