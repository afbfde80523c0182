"""Run identity is the same on every machine: no absolute path of the data or work dirs in it."""
from pathlib import Path

import pytest

from cac.cli import main
from cac.exp.runner import make_unit, unit_state
from cac.exp.spec import load_spec
from cac.exp.tracking import RunTracker

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec_file,row,preset", [("ablations/table3.yaml", "(e)", "quick"),
                                                   ("experiments/table1_ade20k.yaml", "ocrnet-hr18+cac", "paper")])
def test_same_unit_under_other_roots_is_the_same_run(tmp_path, monkeypatch, spec_file, row, preset):
    spec = load_spec(ROOT / spec_file)
    monkeypatch.setenv("CAC_DATA_ROOT", str(tmp_path / "node-a" / "data"))
    here = make_unit(spec, spec.row(row), 0, preset, work_root=tmp_path / "node-a" / "work")
    monkeypatch.setenv("CAC_DATA_ROOT", str(tmp_path / "mnt" / "shared" / "datasets"))
    there = make_unit(spec, spec.row(row), 0, preset, work_root=tmp_path / "node-b" / "work")
    assert here.cfg["data_root"] != there.cfg["data_root"]  # the configs do differ in their paths...
    assert here.cfg_hash == there.cfg_hash  # ...but not in what they train
    assert here.work_dir.relative_to(tmp_path / "node-a" / "work") == there.work_dir.relative_to(tmp_path / "node-b" / "work")
    changed = make_unit(spec, spec.row(row), 1, preset)
    assert changed.cfg_hash != there.cfg_hash  # the seed is part of it


def test_finished_elsewhere_is_skipped_here(tmp_path, monkeypatch, data_root, capsys):
    """A unit finished on another node (other data root, other work root) is skipped as done."""
    spec_file = ROOT / "ablations" / "table3.yaml"
    spec = load_spec(spec_file)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("CAC_DATA_ROOT", "/nodes/a/data")
    elsewhere = make_unit(spec, spec.row("(e)"), 0, "quick", work_root=Path("/nodes/a/work"))
    tracker = RunTracker.open(uri, spec.name, elsewhere.tags, elsewhere.name)
    tracker.finish("FINISHED")
    monkeypatch.setenv("CAC_DATA_ROOT", str(data_root))
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work"))
    here = make_unit(spec, spec.row("(e)"), 0, "quick")
    assert unit_state(here, uri) == ("finished", tracker.run_id)
    assert main(["run", str(spec_file), "--rows", "(e)", "--preset", "quick", "--tracking-uri", uri, "--dry-run"]) == 0
    assert f"skip (FINISHED run {tracker.run_id})" in capsys.readouterr().out


BEFORE_JOURNAL = "e9d39435bd7c35172698c19dd39c9251a65ff7c0"  # main before the tracking journal (#36)
# Runs inside either tree (its own ``cac`` first on sys.path): every unit's identity, as JSON
IDENTITY = """
import json, sys
from cac.exp.runner import plan_runs
from cac.exp.spec import load_spec
out = {}
for spec_file, preset in (("ablations/table3.yaml", "quick"), ("ablations/ssa.yaml", "bench"),
                          ("experiments/table1_ade20k.yaml", "paper")):
    spec = load_spec(sys.argv[2] + "/" + spec_file)
    for unit in plan_runs(spec, preset):
        out[unit.name] = {"tags": {k: str(v) for k, v in unit.tags.items()},
                          "work_dir": str(unit.work_dir.relative_to(sys.argv[3]))}
print(json.dumps(out, sort_keys=True))
"""


def test_the_runs_a_store_holds_from_before_the_journal_are_the_same_units(tmp_path):
    """A store written by main before the tracking journal is still read as it was: every unit (Table 3
    and SSA-Seg's rows at the embedded presets, Table 1 at preset paper) has the same identity tags, by
    which its FINISHED run is found and skipped, and the same work dir, which it resumes from."""
    import json
    import os
    import subprocess
    import sys

    from components import require_commit

    require_commit(BEFORE_JOURNAL, "main before the tracking journal")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "archive", BEFORE_JOURNAL, "cac", "cac_cli"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    env = {**os.environ, "CAC_DATA_ROOT": str(tmp_path / "data"), "CAC_WORK_DIR": str(tmp_path / "work")}

    def identities(tree: Path) -> dict:
        code = f"import sys; sys.path.insert(0, {str(tree)!r})\n" + IDENTITY
        out = subprocess.run([sys.executable, "-c", code, "-", str(ROOT), str(tmp_path / "work")], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    before, now = identities(old), identities(ROOT)
    assert len(before) > 40 and before == now
