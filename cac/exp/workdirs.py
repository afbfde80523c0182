"""A unit's work dir as several processes see it: who trains it now (its lock) and which run of which
store owns it (``owner.json``, the store known by its public URL)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["work_dir_lock", "read_owner", "claim_work_dir", "OWNER_FILE"]


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, enabled: bool = True) -> Iterator[bool]:
    """Yields True if this process holds the work dir's lock (nobody else is training it).
    ``enabled=False`` (non-zero DDP ranks) yields True without locking: rank 0 decides for all."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if not enabled:
        yield True
        return
    fh = open(work_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


OWNER_FILE = "owner.json"


def read_owner(work_dir: Path) -> Optional[dict]:
    """The run that owns ``work_dir`` (``{"tracking_uri", "run_id"}``), its store by its public URL (an
    owner file written before stores were recorded without credentials is read the same way)."""
    from cac.exp.credentials import public_url

    try:
        owner = json.loads((work_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict):
        return None
    return {"tracking_uri": public_url(str(owner.get("tracking_uri", ""))), "run_id": owner.get("run_id")}


def claim_work_dir(work_dir: Path, uri: str, run_id: str, echo: Callable[[str], None] = print) -> None:
    """Record that ``run_id`` in store ``uri`` owns ``work_dir``; checkpoints another run (or another
    store) left there are moved aside first, so a unit resumes only from its own open run's checkpoints.
    A store is known by its public URL: the same store with a new password keeps its work dirs."""
    from cac.exp.credentials import public_url

    owner_path = work_dir / OWNER_FILE
    owner = {"tracking_uri": public_url(uri), "run_id": run_id}
    previous = read_owner(work_dir)
    stale = [p for p in work_dir.glob("iter_*.pth")] + [p for p in (work_dir / "last_checkpoint",) if p.exists()]
    if previous != owner and stale:
        aside = work_dir / f"stale-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for path in stale:
            path.rename(aside / path.name)
        whose = (f"run {previous.get('run_id')} of {previous.get('tracking_uri')}" if previous
                 else "no recorded run")
        echo(f"note  {work_dir}: {len(stale)} checkpoint file(s) of {whose} moved to {aside.name}/, "
             f"not resumed by run {run_id}")
    owner_path.write_text(json.dumps(owner) + "\n")
