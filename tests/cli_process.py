"""``cac-exp`` as a background process, for the tests that stop a server, kill a job or hold a run
under it while they wait.

Its stdout and stderr go to files, never to pipes: a pipe nobody reads while the test waits fills at
64 KiB, and the process then stops at its next print, a run held mid-training for no fault of the code
(the console of an outage is long: each retry says why). A test that times out waiting sends SIGUSR1
first, and the process writes every thread's stack to its stderr (:mod:`faulthandler`), so the failure
shows where it was.
"""
from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["CacExp"]

# The console entry point's own call, with the stack dump registered before anything runs.
_BOOT = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "from cac_cli import main; sys.exit(main(sys.argv[1:]))")
_COUNT = itertools.count()


class CacExp:
    """``cac-exp ARGS`` started in ``cwd`` with ``env``; its console in ``<cwd>/console/``."""

    def __init__(self, args: list[str], cwd: Path, env: dict, merge: bool = False, **popen) -> None:
        folder = Path(cwd) / "console"
        folder.mkdir(parents=True, exist_ok=True)
        n = next(_COUNT)
        self.out_path = folder / f"{n}-{args[0]}.out"
        self.err_path = self.out_path if merge else folder / f"{n}-{args[0]}.err"
        with open(self.out_path, "w") as out:
            err = subprocess.STDOUT if merge else open(self.err_path, "w")
            try:
                self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, *args], cwd=cwd, env=env, stdout=out,
                                             stderr=err, **popen)
            finally:
                if err is not subprocess.STDOUT:
                    err.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def console(self, chars: int = 3000) -> str:
        """The end of what it printed (stdout, then stderr when they are apart)."""
        text = self.out() if self.err_path == self.out_path else self.out() + self.err()
        return text[-chars:]

    def communicate(self, timeout: float) -> tuple[str, str]:
        """Wait for the end (its stacks are in the message of a timeout) and give (stdout, stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cac-exp still running after {timeout:g} s:\n{self.stacks()}") from None
        return self.out(), self.err()

    def stacks(self) -> str:
        """Every thread's stack, then the process killed; the end of its console."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.proc.kill()
            self.proc.wait(timeout=60)
        return self.console(12000)

    def wait_for(self, path: Path, timeout: float = 300) -> None:
        """Until ``path`` exists; the process's end or ``timeout`` fails the test with its console."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"cac-exp ended ({self.proc.returncode}) before {path.name}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {path} within {timeout:g} s:\n{self.stacks()}")
            time.sleep(0.1)
