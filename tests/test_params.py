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


def test_ssa_rows_at_paper_scale_add_ssa_segs_modules_to_upernet_swin_t(capsys):
    """ablations/ssa.yaml at preset paper is UperNet + Swin-T (d = 512, 150 classes); SSA-Seg adds
    the position conv, 150 embeddings, two position projectors and two d x d maps to CAC's."""
    assert main(["params", str(ROOT / "ablations" / "ssa.yaml"), "--preset", "paper", "--json"]) == 0
    rows = {r["row"]: r["params"] for r in json.loads(capsys.readouterr().out)}
    d, n = 512, 150
    projector = 2 * d * (d // 2) + (d // 2) * d + d
    assert rows["CAC"] - rows["(a)"] == 2 * projector == 787_456  # profile official: no first-layer bias
    assert rows["SSA-Seg"] - rows["CAC"] == (9 * d + d) + n * d + 2 * projector + 2 * d * d
    assert rows["SSA-Seg"] == rows["+pos distill"] and rows["+dice"] == rows["+relation"] == rows["CAC"]
