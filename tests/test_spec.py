"""Strict spec validation: every bad input is one clear line, exit code 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from cac.cli import main
from cac.exp.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
title: t
model: fcn-slim-r18
baseline: "(a)"
seeds: 1
rows:
  - {label: "(a)", description: base, cac: false}
  - {label: "(b)", description: cac, cac: {tau: 10.0}}
"""


def _write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("spec", sorted((ROOT / "ablations").glob("table[2-5].yaml"))
                         + sorted((ROOT / "experiments").glob("table1_*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(spec):
    s = load_spec(spec)
    assert s.rows and len({r.label for r in s.rows}) == len(s.rows)
    # the supplementary's datasets have no figures in the paper; every other table has them all
    assert all((r.paper is None) == (s.dataset in ("cityscapes", "pascal-context")) for r in s.rows)


def test_table_row_counts_match_paper():
    counts = {"table2": 8, "table3": 7, "table4": 8, "table5": 11}
    for name, n in counts.items():
        assert len(load_spec(ROOT / "ablations" / f"{name}.yaml").rows) == n
    assert len(load_spec(ROOT / "experiments" / "table1_ade20k.yaml").rows) == 22


BAD = {
    "unknown top key": (GOOD + "colour: red\n", "unknown key 'colour'"),
    "unknown row key": (GOOD.replace("cac: false}", "cac: false, lr: 1}"), "unknown key 'lr'"),
    "tau <= 0": (GOOD.replace("tau: 10.0", "tau: 0.0"), "tau must be > 0"),
    "lambda_kl < 0": (GOOD.replace("tau: 10.0", "lambda_kl: -1.0"), "lambda_kl must be >= 0"),
    "wrong type": (GOOD.replace("tau: 10.0", "tau: fast"), "tau: must be a float"),
    "duplicate rows": (GOOD.replace('label: "(b)"', 'label: "(a)"'), "duplicate row label"),
    "unknown cac option": (GOOD.replace("tau: 10.0", "temperature: 3"), "unknown key 'temperature'"),
    "unknown model": (GOOD.replace("fcn-slim-r18", "vgg-99"), "unknown model 'vgg-99'"),
    "unknown preset block": (GOOD + "presets: {huge: {seeds: 1}}\n", "presets.huge: unknown preset"),
    "bad seeds": (GOOD.replace("seeds: 1", "seeds: [0, 0]"), "duplicate seeds"),
    "missing title": (GOOD.replace("title: t\n", ""), "missing required key 'title'"),
    "bad baseline": (GOOD.replace('baseline: "(a)"', 'baseline: "(z)"'), "no row labelled '(z)'"),
    "bad compare": (GOOD.replace('baseline: "(a)"', 'baseline: "(a)"\ncompare: "(z)"'), "compare: no row labelled '(z)'"),
    "compare is baseline": (GOOD.replace('baseline: "(a)"', 'baseline: "(a)"\ncompare: "(a)"'),
                            "other than the baseline"),
    "ssa without cosine": (GOOD.replace("tau: 10.0", "ssa_dice: 1.0, context: dot"), "need context='cos'"),
    "yaml error": ("title: [unclosed\nrows: 1\n", "YAML error"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_refused_with_one_line(case, tmp_path, capsys):
    text, expected = BAD[case]
    path = _write(tmp_path, text)
    code = main(["run", str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err


def test_missing_file_unknown_preset_and_unknown_row(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "spec file not found" in capsys.readouterr().err
    path = _write(tmp_path, GOOD)
    assert main(["run", str(path), "--preset", "huge", "--dry-run"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["run", str(path), "--rows", "(q)", "--dry-run"]) == 2
    assert "no row '(q)'" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    path = _write(tmp_path, GOOD.replace("tau: 10.0", "tau: -2.0"))
    out = subprocess.run([sys.executable, "-m", "cac.cli", "run", str(path), "--dry-run"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert "tau must be > 0" in out.stderr


def test_dry_run_prints_plan(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    assert main(["run", str(path), "--dry-run", "--seeds", "2", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    out = capsys.readouterr().out
    assert out.count("] train: ") == 4 and "plan: 4 to train" in out and "tau=10.0" in out and "cac=off" in out


def test_load_spec_error_type(tmp_path):
    with pytest.raises(SpecError, match=r"rows: must be a non-empty list"):
        load_spec(_write(tmp_path, "rows: []\ntitle: x\n"))


def test_missing_real_dataset_is_one_line_and_tracks_nothing(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.setenv("CAC_DATA_ROOT", str(tmp_path / "nodata"))
    uri = f"sqlite:///{tmp_path}/m.db"
    code = main(["run", str(ROOT / "ablations" / "table3.yaml"), "--preset", "paper", "--rows", "(e)",
                 "--tracking-uri", uri])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "ADE20K not found" in err and str(tmp_path / "nodata") in err and "cac-exp data ade20k" in err
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("table3")
    assert exp is None or not mlflow.MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])
