"""A test that needs a real component skips without it, and fails under CI in one line naming it."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_missing_component_skips_outside_ci_and_fails_in_one_line_under_ci(tmp_path):
    (tmp_path / "test_needs_it.py").write_text(
        "from components import require\n\n\n"
        "def test_needs_slurm():\n"
        "    require('Slurm', 'missing sbatch, squeue', 'apt-get install slurm-wlm')\n\n\n"
        "def test_has_it():\n"
        "    require('PostgreSQL', '')\n")
    outcomes = {}
    for ci in ("", "true"):
        env = {**os.environ, "CI": ci, "PYTHONPATH": str(TESTS)}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "-o",
                              "addopts=", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        outcomes[ci] = out
    assert outcomes[""].returncode == 0 and "1 passed, 1 skipped" in outcomes[""].stdout
    assert "Slurm: missing sbatch, squeue; apt-get install slurm-wlm" in outcomes[""].stdout
    failed = outcomes["true"]
    assert failed.returncode == 1 and "1 failed, 1 passed" in failed.stdout
    lines = [ln for ln in failed.stdout.splitlines() if "CI needs Slurm" in ln]
    assert lines and all("missing sbatch, squeue" in ln for ln in lines)
    assert "Traceback" not in failed.stdout and "def test_needs_slurm" not in failed.stdout  # no code dumped
