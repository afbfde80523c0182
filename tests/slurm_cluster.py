"""A real one-node Slurm cluster for the tests, started on loopback from Debian's packages (slurm-wlm
22.05, munge, slurmdbd on MariaDB for the accounting submitit polls with ``sacct``), as the tests
start PostgreSQL: every daemon's state, logs and ports are the fixture's own, under a temporary
folder, and it is stopped at the end of the session. ``.ci/run`` installs the packages; without
them the tests that need the cluster are skipped, saying which binary is missing.

munge's clients in Slurm 22.05 use munged's default socket (``/run/munge/munge.socket.2``): a munged
already answering there is used as it is, else the fixture starts one there with a key of its own.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

from ports import on_free_ports

__all__ = ["BINARIES", "missing_binaries", "SlurmCluster", "start_cluster"]

BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "squeue", "scancel", "munged",
            "mungekey", "mariadbd", "mariadb-install-db", "mariadb")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
CLUSTER = "cactest"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


def _wait(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Slurm test cluster: {what} did not come up within {timeout:.0f} s")


def _ok(*cmd: str, env: Optional[dict] = None) -> bool:
    return subprocess.run(cmd, capture_output=True, env=env, timeout=30).returncode == 0


class SlurmCluster:
    """The running cluster: ``env`` carries ``SLURM_CONF`` for every Slurm client (and submitit)."""

    def __init__(self, root: Path, cpus: int, memory_mb: int) -> None:
        self.root, self.cpus, self.memory_mb = root, cpus, memory_mb
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self._procs: list[subprocess.Popen] = []
        self._pids: list[Path] = []

    # -- the daemons --------------------------------------------------------------------------------
    def _munge(self) -> None:
        if MUNGE_SOCKET.exists() and _ok("munge", "-n", "-s", "ok"):
            return  # a munged serves the default socket already (a machine with Slurm set up)
        key = self.root / "munge.key"
        subprocess.run([_which("mungekey"), "-c", "-k", str(key), "-b", "1024"], check=True, capture_output=True)
        key.chmod(0o400)
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        pid = self.root / "munged.pid"
        subprocess.run([_which("munged"), f"--key-file={key}", f"--pid-file={pid}", "-f",
                        f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={self.root / 'munge.seed'}"],
                       check=True, capture_output=True)
        self._pids.append(pid)
        _wait(lambda: _ok("munge", "-n", "-s", "ok"), "munged")

    def _mariadb(self, port: int) -> None:
        data = self.root / "db"
        subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, capture_output=True)
        sock = self.root / "mysql.sock"
        self._procs.append(subprocess.Popen(
            [_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root", f"--socket={sock}",
             f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
             f"--pid-file={self.root / 'mysqld.pid'}", f"--log-error={self.root / 'log' / 'mysqld.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = [_which("mariadb"), "--no-defaults", "-S", str(sock), "-uroot"]
        _wait(lambda: _ok(*client, "-e", "select 1"), "MariaDB")
        subprocess.run([*client, "-e", "create user 'slurm'@'127.0.0.1' identified by 'slurm-test'; "
                                         "grant all on *.* to 'slurm'@'127.0.0.1';"], check=True, capture_output=True)

    def _configs(self, db_port: int, dbd_port: int, ctld_port: int, slurmd_port: int) -> None:
        r, host = self.root, socket.gethostname()
        (r / "slurmdbd.conf").write_text(
            f"AuthType=auth/munge\nDbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={dbd_port}\nSlurmUser=root\n"
            f"LogFile={r}/log/slurmdbd.log\nPidFile={r}/slurmdbd.pid\nStorageType=accounting_storage/mysql\n"
            f"StorageHost=127.0.0.1\nStoragePort={db_port}\nStorageUser=slurm\nStoragePass=slurm-test\n"
            "StorageLoc=slurm_acct_db\n")
        (r / "slurmdbd.conf").chmod(0o600)
        (r / "slurm.conf").write_text(f"""ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again once its launch credential expires (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, ports: list[int]) -> "SlurmCluster":
        """Start munge, MariaDB, slurmdbd, slurmctld and slurmd on ``ports`` (4, free on loopback)."""
        for sub in ("log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        db_port, dbd_port, ctld_port, slurmd_port = ports
        self._munge()
        self._mariadb(db_port)
        self._configs(db_port, dbd_port, ctld_port, slurmd_port)
        subprocess.run([_which("slurmdbd")], env=self.env, check=True, capture_output=True)
        self._pids.append(self.root / "slurmdbd.pid")
        _wait(lambda: _ok("sacctmgr", "-n", "list", "cluster", env=self.env), "slurmdbd")
        for cmd in (["add", "cluster", CLUSTER], ["add", "account", "cac", f"cluster={CLUSTER}"],
                    ["add", "user", "root", "account=cac", f"cluster={CLUSTER}"]):
            subprocess.run(["sacctmgr", "-i", *cmd], env=self.env, capture_output=True, timeout=30)
        subprocess.run([_which("slurmctld")], env=self.env, check=True, capture_output=True)
        self._pids.append(self.root / "slurmctld.pid")
        subprocess.run([_which("slurmd")], env=self.env, check=True, capture_output=True)
        self._pids.append(self.root / "slurmd.pid")
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True,
                                               text=True, timeout=30).stdout, "slurmctld and slurmd")
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=30)
        for pid in reversed(self._pids):
            try:
                os.kill(int(pid.read_text().split()[0]), 15)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- what the tests read ----------------------------------------------------------------------
    def squeue_running(self) -> int:
        out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], env=self.env, capture_output=True,
                             text=True, timeout=30).stdout
        return len(out.split())

    def job_ids(self) -> list[str]:
        out = subprocess.run(["sacct", "-n", "-X", "-o", "JobID", "-P"], env=self.env, capture_output=True, text=True,
                             timeout=30).stdout
        return out.split()


def start_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start the cluster in ``root`` (2 CPUs and 12 GB of this machine), yield it, stop it. A start that
    fails (a port taken between our check and a daemon's bind) is stopped and retried on new ports."""
    clusters: list[SlurmCluster] = []

    def start(ports: list[int]) -> SlurmCluster:
        cluster = SlurmCluster(root / f"try{len(clusters)}", cpus=max(1, min(2, os.cpu_count() or 1)),
                               memory_mb=12000)
        clusters.append(cluster)
        try:
            return cluster.start(ports)
        except Exception:
            cluster.stop()
            raise

    try:
        yield on_free_ports(start, n=4)
    finally:
        if clusters:
            clusters[-1].stop()
