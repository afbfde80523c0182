"""Start-up time of ``cac-exp``: ``--help`` (the light ``cac_cli``) beside a command's ``--help``
(the whole parser: torch, mmseg), each the median of N runs, interleaved so load hits both alike.

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
    cases = {"cac-exp --help": ["--help"], "cac-exp run --help": ["run", "--help"]}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(n):
        for name, argv in cases.items():
            times[name].append(seconds(argv))
    for name, values in times.items():
        print(f"{name:<22} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f}, n={n})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
