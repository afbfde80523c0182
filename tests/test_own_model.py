"""Bring your own model (issue 19): any mmseg config as the base model of a spec's rows.

A model outside Table 1 (a slim SegFormer written here, in the test's temporary directory) trains
Table 3's rows with ``--model PATH``; the same file under another path is the same unit; reports
select its runs with ``--model``; a config that cannot be used is one line, exit 2, nothing tracked.
The trainings themselves (Table 3 (a), (e) over a config in a temporary directory, a copy skipped, the
report) are README's walkthrough, run in tests/test_walkthrough.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cac.cli import main

ROOT = Path(__file__).resolve().parents[1]
TABLE3 = str(ROOT / "ablations" / "table3.yaml")

# SegFormer (MiT-B0 shape, one block per stage) from mmseg's shipped config: not a Table 1 model.
SEGFORMER = """\
_base_ = ['mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py']
model = dict(
    backbone=dict(embed_dims=16, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 5, 8]),
    decode_head=dict(in_channels=[16, 32, 80, 128], channels=32))
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _runs(uri: str, experiment: str = "table3") -> list:
    from cac.exp.tracking import find_runs

    return find_runs(uri, experiment, {})


def test_same_file_under_another_path_is_the_same_unit(workspace):
    """Identity is the resolved config's content: two copies plan the same config hash and name."""
    from cac.exp.options import RunOptions
    from cac.exp.runner import plan_runs
    from cac.exp.spec import load_spec

    one = _write(workspace / "a" / "my_segformer.py", SEGFORMER)
    two = _write(workspace / "checkout2" / "configs" / "my_segformer.py", SEGFORMER)
    spec = load_spec(TABLE3)
    units = [plan_runs(spec, "quick", "(a),(e)", options=RunOptions(model=str(p)))
             for p in (one, two)]
    assert [u.cfg_hash for u in units[0]] == [u.cfg_hash for u in units[1]]
    assert units[0][0].model == units[1][0].model
    assert units[0][0].model.startswith("my_segformer.py@")
    # ...and a different model is a different unit
    other = _write(workspace / "b" / "my_segformer.py", SEGFORMER.replace("channels=32", "channels=48"))
    third = plan_runs(spec, "quick", "(a)", options=RunOptions(model=str(other)))
    assert third[0].cfg_hash != units[0][0].cfg_hash
    assert third[0].model != units[0][0].model
    # the model (backbone + head) is the file's; the data and class count are the generated data's
    cfg = units[0][1].cfg
    assert cfg["model"]["backbone"]["type"] == "MixVisionTransformer"
    assert cfg["model"]["decode_head"]["type"] == "CACHead"
    assert cfg["model"]["decode_head"]["head"]["type"] == "SegformerHead"
    assert cfg["dataset_type"] == "ContextScenesDataset"


def test_spec_model_path_is_relative_to_the_spec_file(workspace):
    """`model:` in a spec may name a config file next to the spec; `--model` wins over it."""
    from cac.exp.options import RunOptions
    from cac.exp.runner import plan_runs
    from cac.exp.spec import load_spec

    _write(workspace / "specs" / "models" / "seg.py", SEGFORMER)
    spec_path = _write(workspace / "specs" / "mine.yaml", "title: mine\nmodel: models/seg.py\nseeds: 1\n"
                       "rows:\n  - {label: base, description: b, cac: false}\n  - {label: cac, description: c}\n")
    spec = load_spec(spec_path)
    assert spec.rows[0].model == str((workspace / "specs" / "models" / "seg.py").resolve())
    units = plan_runs(spec, "quick")
    assert units[0].cfg["model"]["decode_head"]["type"] == "SegformerHead"
    assert units[1].cfg["model"]["decode_head"]["head"]["type"] == "SegformerHead"
    replaced = plan_runs(spec, "quick", options=RunOptions(model="fcn-slim-r18"))
    assert replaced[1].cfg["model"]["decode_head"]["head"]["type"] == "FCNHead"


def test_paper_preset_keeps_the_configs_own_data(workspace, capsys, monkeypatch):
    """At preset paper a user config trains with its own data section (roots under CAC_DATA_ROOT),
    schedule and optimizer; CAC wraps its head."""
    import runpy

    cfg_file = _write(workspace / "my_segformer.py", SEGFORMER)
    out = workspace / "resolved.py"
    assert main(["config", TABLE3, "--row", "(e)", "--preset", "paper", "--model", str(cfg_file),
                 "--out", str(out)]) == 0
    resolved = runpy.run_path(str(out))
    import os

    assert resolved["train_dataloader"]["dataset"]["type"] == "ADE20KDataset"
    assert resolved["train_dataloader"]["dataset"]["data_root"] == os.path.join(
        os.environ["CAC_DATA_ROOT"], "ade", "ADEChallengeData2016")
    assert resolved["train_cfg"]["max_iters"] == 160000
    assert resolved["optim_wrapper"]["optimizer"]["type"] == "AdamW"  # SegFormer's own optimizer
    assert resolved["model"]["decode_head"]["type"] == "CACHead"
    assert resolved["model"]["decode_head"]["head"]["in_channels"] == [16, 32, 80, 128]


@pytest.mark.parametrize("case, text, needle", [
    ("missing", None, "file not found"),
    ("syntax", "model = dict(type='EncoderDecoder'\n", "syntax error"),
    ("base", "_base_ = ['./nowhere/base.py']\n", "nowhere"),
    ("nohead", "model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c'))\n", "no decode_head"),
    ("refused", "model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c'), decode_head=dict("
                "type='PointHead', in_channels=[64], in_index=[0], channels=64, num_classes=19))\n",
     "CAC cannot wrap PointHead"),
])
def test_unusable_config_is_one_line_and_tracks_nothing(workspace, capsys, case, text, needle):
    cfg_file = workspace / f"{case}.py"
    if text is not None:
        cfg_file.write_text(text)
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    code = main(["run", TABLE3, "--preset", "quick", "--rows", "(a)", "--model", str(cfg_file),
                 "--tracking-uri", uri])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(cfg_file) in err and needle in err, err
    assert "Traceback" not in err
    assert _runs(uri) == []


def test_model_on_a_benchmark_spec_is_refused(workspace, capsys):
    code = main(["run", str(ROOT / "ablations" / "table6.yaml"), "--model", "fcn-slim-r18", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--model does not apply to a benchmark spec" in err


def test_unknown_model_name_is_one_line(workspace, capsys):
    code = main(["config", TABLE3, "--row", "(a)", "--model", "no-such-model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown model 'no-such-model'" in err and len(err.splitlines()) == 1


def test_sweep_and_params_take_the_model(workspace, capsys):
    """A sweep over another base model is that model's own study; `params --model` counts its rows."""
    import json

    from cac.exp.sweep import load_sweep

    cfg_file = _write(workspace / "my_segformer.py", SEGFORMER)
    sweep_path = str(ROOT / "experiments" / "sweep_tau_lambda.yaml")
    own, mine = load_sweep(sweep_path), load_sweep(sweep_path, str(cfg_file))
    assert own.study == "sweep_tau_lambda"
    assert mine.study.startswith("sweep_tau_lambda-my_segformer.py_") and mine.study != own.study
    assert {r.model for r in mine.base.rows} == {str(cfg_file)}
    assert main(["params", TABLE3, "--preset", "quick", "--model", str(cfg_file), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert main(["params", TABLE3, "--preset", "quick", "--json"]) == 0
    own_rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(own_rows) == 7
    assert all(a["params"] != b["params"] for a, b in zip(rows, own_rows))
