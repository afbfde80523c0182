"""Start-up time of ``cac-exp``: ``--help``, a command's ``--help`` (both answered by the light
``cac_cli``) and a command that does work (``cac-exp params``: torch and mmseg imported), each the
median of N runs, interleaved so load hits them alike.

    .venv/bin/python benchmarks/cli_startup.py [N]
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

EXE = Path(sys.executable).with_name("cac-exp")


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(EXE), *argv], check=True, capture_output=True)
    return time.perf_counter() - start


def main(n: int = 5) -> None:
    spec = str(Path(__file__).resolve().parents[1] / "ablations" / "table3.yaml")
    cases = {"cac-exp --help": ["--help"], "cac-exp run --help": ["run", "--help"],
             "cac-exp data tiny --help": ["data", "tiny", "--help"],
             "cac-exp params (work)": ["params", spec, "--preset", "quick"]}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(n):
        for name, argv in cases.items():
            times[name].append(seconds(argv))
    for name, values in times.items():
        print(f"{name:<26} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f}, n={n})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
