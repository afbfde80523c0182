"""README's "Does CAC help my model?": the config and every command of the walkthrough, run as written
(from a directory that looks like a checkout: the specs beside it), and what they leave behind."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> tuple[str, str, list[list[str]]]:
    """(config file name, its text, the commands as argv lists) from README.md's walkthrough."""
    text = (ROOT / "README.md").read_text()
    config = re.search(r"<!-- walkthrough:config (\S+) -->\n```python\n(.*?)```", text, re.S)
    block = re.search(r"<!-- walkthrough:commands -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, re.S)
    assert config and block, "README.md lost its walkthrough markers"
    commands = [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]
    return config.group(1), config.group(2), commands


def test_walkthrough_parses():
    name, text, commands = walkthrough()
    assert name.endswith(".py") and "_base_" in text
    readme = re.sub(r"<!--.*?-->", "", (ROOT / "README.md").read_text(), flags=re.S)
    assert f"save it as `{name}`" in readme  # the file name a reader sees, not only the marker's
    assert [c[0] for c in commands] == ["cac-exp"] * 5 + ["python"]
    assert all("--model" in c for c in commands if c[1] in ("run", "results", "analysis/make_tables.py"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_walkthrough_commands_run_as_written(workspace, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from analysis.make_tables import main as make_tables
    from cac.cli import main as cac_exp

    monkeypatch.setenv("CAC_DATA_ROOT", str(workspace / "data"))  # the tiny Cityscapes is this test's own
    for folder in ("ablations", "experiments"):
        (workspace / folder).symlink_to(ROOT / folder)
    name, text, commands = walkthrough()
    (workspace / name).write_text(text)
    for argv in commands:
        if argv[0] == "cac-exp":
            code = cac_exp(argv[1:])
        else:
            assert argv[:2] == ["python", "analysis/make_tables.py"], argv
            code = make_tables(argv[2:])
        out = capsys.readouterr()
        assert code == 0, f"{' '.join(argv)} exited {code}: {out.err[-2000:]}"
        if argv[1:3] == ["run", "ablations/table3.yaml"] and "quick" in argv:
            assert "shared with" in out.out  # Table 3 (e) is Table 2 (f): trained once

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = {(e.name, r.data.tags["row"], r.data.tags["preset"]): r
            for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert sorted(runs) == [("table2", "(a)", "quick"), ("table2", "(f)", "quick"), ("table3", "(a)", "quick"),
                            ("table3", "(e)", "paper")]
    for run in runs.values():
        assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
        assert run.data.tags["base_model"].startswith(f"{name}@")
        assert run.data.params["cfg.model.backbone.type"] == "MixVisionTransformer"
    assert runs[("table3", "(e)", "paper")].data.tags["data_version"] == "cityscapes-subset-train6-val2"
    logged = {"(a)": runs[("table3", "(a)", "quick")].data.metrics["val/mIoU"],
              "(e)": runs[("table2", "(f)", "quick")].data.metrics["val/mIoU"]}  # (e) is Table 2's (f)
    report = (workspace / "reports" / "mine" / "table3.md").read_text()
    assert runs[("table2", "(f)", "quick")].data.tags["base_model"] in report.splitlines()[0]
    for label, value in logged.items():
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {label} "))
        assert f"{value:.2f}" in line, line

    # A byte-identical copy under another path is the same model: nothing is trained again, and the
    # results of --model COPY are the runs above (read back as MLflow holds them); the spec's own
    # model has none of them.
    copy = workspace / "elsewhere" / "configs" / name
    copy.parent.mkdir(parents=True)
    copy.write_bytes((workspace / name).read_bytes())
    assert cac_exp(["run", "ablations/table3.yaml", "--preset", "quick", "--rows", "(a),(e)", "--model", str(copy)]) == 0
    assert capsys.readouterr().out.count("skip") == 2
    assert len(runs) == sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())
    summary = workspace / "results.json"
    assert cac_exp(["results", "ablations/table3.yaml", "--preset", "quick", "--model", str(copy),
                    "--out", str(summary)]) == 0
    data = json.loads(summary.read_text())
    assert data["val/mIoU"]["(a)"] == {"0": logged["(a)"]} and data["val/mIoU"]["(e)"] == {"0": logged["(e)"]}
    assert data["base_model"] == runs[("table2", "(f)", "quick")].data.tags["base_model"]
    assert cac_exp(["results", "ablations/table3.yaml", "--preset", "quick", "--out", str(summary)]) == 0
    assert not any(json.loads(summary.read_text())["val/mIoU"].values())
