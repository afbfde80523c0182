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
