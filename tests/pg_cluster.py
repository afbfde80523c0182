"""A real PostgreSQL server for the tests (Debian's ``postgresql`` package; ``.ci/run`` installs it),
started in a temporary directory on a free loopback port, password-protected as a lab's shared server
is (scram-sha-256 on TCP), and stoppable and restartable on the same port and data (an outage)."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from components import require
from ports import on_free_ports

PASSWORD = "pg-Secr3t-7f3a9c"  # found nowhere a test searches if it leaked
DATABASES = ("optuna", "mlflow")


def pg_bin() -> Optional[Path]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PgServer:
    """One server: ``url`` is ``postgresql://postgres:PASSWORD@127.0.0.1:PORT`` (append ``/optuna`` or
    ``/mlflow``); :meth:`stop` and :meth:`start` make an outage."""

    def __init__(self, bindir: Path, tmp: Path, as_user: list[str]) -> None:
        self.bindir, self.tmp, self.as_user = bindir, tmp, as_user
        self.data, self.port = tmp / "data", 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}"

    def run(self, *cmd: str) -> None:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        out = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120, env=env)
        log = self.tmp / "server.log"
        assert out.returncode == 0, (out.stdout + out.stderr + (log.read_text() if log.exists() else ""))[-3000:]

    def init(self) -> None:
        pwfile = self.tmp / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self.run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-local", "trust", "--auth-host", "scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()

    def start(self, port: Optional[int] = None) -> int:
        def start_on(ports: list[int]) -> int:
            options = (f"-p {ports[0]} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.tmp / "server.log"),
                      "-o", options, "-w", "-t", "60", "start")
            return ports[0]

        self.port = start_on([port]) if port else on_free_ports(start_on)
        return self.port

    def stop(self, mode: str = "fast") -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Back on the same port, with the same data: the end of an outage."""
        self.start(self.port)

    def dump(self, database: str) -> str:
        """Every byte the database holds, as pg_dump writes it (schema and data)."""
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        out = subprocess.run([str(self.bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              database], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout


@contextlib.contextmanager
def postgres() -> Iterator[PgServer]:
    """A throw-away server (no fsync) holding the databases ``optuna`` and ``mlflow``, stopped and
    removed at the end. As root it runs as the ``postgres`` user (the server refuses root)."""
    bindir = pg_bin()
    require("PostgreSQL", "" if bindir else "its server binaries (initdb, pg_ctl, pg_dump) are not installed",
            "apt-get install postgresql (.ci/run does)")
    as_user: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="cac-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(tmp)
            require("PostgreSQL", "running as root and there is no postgres user to run the server as",
                    "apt-get install postgresql creates it (.ci/run does)")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PgServer(bindir, tmp, as_user)
    try:
        server.init()
        server.start()
        for name in DATABASES:
            server.run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", name)
        yield server
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
