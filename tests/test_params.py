"""Table 1's #params column, from mmseg's shipped configs plus the CAC projectors."""
import json
from pathlib import Path

from cac.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_all_22_table1_param_counts_match_the_paper(capsys):
    assert main(["params", str(ROOT / "experiments" / "table1_ade20k.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 22
    from cac.exp.spec import load_spec

    paper = {r.label: r.paper["params"] for r in load_spec(ROOT / "experiments" / "table1_ade20k.yaml").rows}
    for r in rows:
        assert round(r["params"] / 1e6, 2) == paper[r["row"]], r
    # CAC adds the same two projectors (d = 512) to every model.
    by = {r["row"]: r["params"] for r in rows}
    assert {by[f"{k}+cac"] - by[k] for k in paper if not k.endswith("+cac")} == {787_968}
