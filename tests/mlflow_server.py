"""A real ``mlflow server`` for the tests, on a SQLite backend in a temporary folder and a free
loopback port, that can be stopped and started again on the same port and store (an outage)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from ports import on_free_ports


class MlflowServer:
    def __init__(self, folder: Path) -> None:
        self.folder, self.port = Path(folder), 0
        self.proc: Optional[subprocess.Popen] = None
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend(self) -> str:
        return f"sqlite:///{self.folder / 'server.db'}"

    def start(self, port: Optional[int] = None) -> "MlflowServer":
        def start_on(ports: list[int]) -> int:
            log = open(self.folder / "server.log", "a")
            # MLflow 3's job runner (GenAI judges and scorers: seven worker processes) has no part in tracking
            env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                          str(ports[0]), "--workers", "1"], stdout=log, stderr=log, cwd=self.folder,
                                         env=env)
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/health", timeout=2)
                    return ports[0]
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError("mlflow server exited (port taken?)")
                    time.sleep(0.25)
            self.proc.kill()
            raise RuntimeError("mlflow server did not answer within 60 s")

        self.port = start_on([port]) if port else on_free_ports(start_on)
        return self

    def stop(self) -> None:
        """The server goes away: its process group ends; connections are refused from here on."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        for _ in range(100):  # its workers let go of the port
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                time.sleep(0.1)
            except OSError:
                return

    def cpu_seconds(self) -> float:
        """CPU time the server's processes (it and its children) have used so far."""
        tick = os.sysconf("SC_CLK_TCK")
        todo, total = [self.proc.pid] if self.proc else [], 0.0
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                continue
        return total

    def restart(self) -> None:
        self.start(self.port)
