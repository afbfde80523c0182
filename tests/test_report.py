"""The pipeline's report: Table 6 from tracked benchmark runs, the t-SNE cosines, the DVC stages.

Fast tests use hand-made MLflow runs and arrays; the one marked slow trains a 10-iteration quick run
and makes the report exactly as the DVC ``report`` stage does.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


# -- Table 6 from hand-made benchmark runs ------------------------------------------------------------
def _log_bench_run(uri: str, row: str, size: int, metrics: dict, model: str = "upernet-swin-t",
                   preset: str = "quick", spec: str = "table6") -> str:
    """A FINISHED run tagged as ``cac.bench.table6`` logs one (row, size)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(spec)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec)
    run = client.create_run(exp_id, tags={"spec": spec, "row": row, "preset": preset, "size": str(size),
                                          "device": "cpu", "model": model, "task": "benchmark",
                                          "mem_method": "peak RSS over one inference"})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value, step=0)
    client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.01)  # distinct start times: the newest run of a (row, size) wins
    return run.info.run_id


BASE = {"fps": 1.25, "time_ms_median": 800.0, "time_ms_min": 790.0, "time_spread_pct": 1.0, "foreign_cores": 0.01,
        "mem_mb": 900.5}
OURS = {"fps": 1.2, "time_ms_median": 833.3, "time_ms_min": 820.0, "time_spread_pct": 1.5, "foreign_cores": 0.02,
        "mem_mb": 910.0, "fps_delta_pct": -4.0, "mem_delta_pct": 1.05, "fps_delta_paired_pct": -3.5,
        "conv_seg_ms": 1.0, "cac_classifier_ms": 9.0, "classifier_extra_ms": 8.0,
        "fps_delta_from_classifier_pct": -0.99}


def _md_rows(md: str) -> dict[str, list[str]]:
    """``{first cell: cells}`` of the Markdown table's body rows."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| Model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture()
def bench_store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_bench_run(uri, "Baseline", 512, {**BASE, "fps": 9.0, "mem_mb": 1.0})  # older: must not be reported
    _log_bench_run(uri, "Ours", 512, {**OURS, "fps": 9.0})
    _log_bench_run(uri, "Baseline", 512, BASE)
    _log_bench_run(uri, "Ours", 512, OURS)
    return uri


def test_table6_report_from_tracked_runs(bench_store, tmp_path, capsys):
    from analysis.make_tables import main

    out = tmp_path / "reports"
    assert main(["--tracking-uri", bench_store, "--spec", "table6", "--out", str(out), "--no-figures"]) == 0
    md = (out / "table6.md").read_text()
    assert md.startswith("# Table 6")
    # Table 6's columns: fps and Mem at each of the paper's sizes, ours beside the paper's
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    for size in (512, 1280, 2560):
        for col in ("fps", "fps (paper)", "Mem", "Mem (paper)"):
            assert f"| {size}×{size} {col} |" in header
    rows = _md_rows(md)
    assert list(rows) == ["Baseline", "Ours", "Δ"]
    # 512: ours (newest runs), then the paper's; 1280 / 2560 were not measured at quick
    assert rows["Baseline"][:4] == ["1.250", "20.38", "900.5", "2794"]
    assert rows["Ours"][:4] == ["1.200", "19.96", "910.0", "2796"]
    assert rows["Δ"][:4] == ["-4.00%", "-2.05%", "+1.05%", "+0.07%"]
    assert rows["Baseline"][4:8] == ["—", "4.13", "—", "5650"] and rows["Δ"][8:] == ["—", "-2.00%", "—", "+0.04%"]
    for label, cells in rows.items():  # every row has a number of ours
        assert any(re.fullmatch(r"[+-]?\d+\.\d+%?", c) for c in cells[0::2]), (label, cells)
    assert "Not measured at preset `quick`: 1280×1280, 2560×2560" in md
    assert "paired Δfps -3.50%" in md and "Δfps -0.99%" in md and "Measured on cpu" in md
    assert "within the noise" not in md and "Other processes used" not in md
    csv_text = (out / "table6.csv").read_text()
    assert "Ours,0,512,1,1.2000,910.0000,19.9600,2796.0000,upernet-swin-t,quick" in csv_text
    assert r"\multicolumn{4}{c}{$512 \times 512$}" in (out / "table6.tex").read_text()


def test_table6_without_runs_or_for_another_model():
    from analysis.tables import build_table6, table6_markdown
    from cac.bench.table6 import SizeResult, add_deltas
    from cac.exp.spec import load_spec

    spec = load_spec(ROOT / "ablations" / "table6.yaml")
    empty = table6_markdown(build_table6(spec, {}, {}, "quick", ["no runs"]))
    assert list(_md_rows(empty)) == ["Baseline", "Ours", "Δ"] and "| 512×512 fps (paper) |" in empty
    res = {64: {"Baseline": SizeResult("Baseline", 64, [0.1, 0.1], {"fps": 10.0}, {"mem_mb": 100.0}),
                "Ours": SizeResult("Ours", 64, [0.2, 0.2], {"fps": 5.0, "time_spread_pct": 60.0}, {"mem_mb": 110.0})}}
    add_deltas(res[64], "Baseline")
    table = build_table6(spec, res, {"Baseline": "fcn-slim-r18", "Ours": "fcn-slim-r18"}, "quick")
    assert not table.with_paper and table.sizes == [64]  # another model: no paper columns
    md = table6_markdown(table)
    assert _md_rows(md) == {"Baseline": ["10.000", "100.0"], "Ours": ["5.000", "110.0"], "Δ": ["-50.00%", "+10.00%"]}
    assert "exceeds |Δ fps| at 64×64 (spread up to 60.0%)" in md  # a spread wider than the Δ is flagged


def test_make_tables_fails_when_an_asked_for_tsne_cannot_be_made(bench_store, tmp_path, capsys):
    from analysis.make_tables import main

    out = tmp_path / "reports"
    code = main(["--tracking-uri", bench_store, "--spec", "table6", "--spec", "table3", "--tsne", "table3",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "no t-SNE of table3" in err
    assert (out / "table6.md").is_file() and (out / "table3.md").is_file()  # the tables are still written
    assert main(["--tracking-uri", bench_store, "--spec", "table6", "--tsne", "table9", "--out", str(out)]) == 2
    assert "--tsne table9: not a reported training spec" in capsys.readouterr().err


# -- t-SNE: what is embedded and the cosines ------------------------------------------------------------
def _toy_view():
    """Two images, classes 0 and 1; class k's features point along e_k plus an image-specific e_(2+b)."""
    from tsne.embed import HeadView

    d = 4
    labels = np.array([[[0, 0], [1, 255]], [[1, 1], [1, 0]]])
    feats = np.zeros((2, d, 2, 2))
    for b in range(2):
        for y in range(2):
            for x in range(2):
                k = labels[b, y, x]
                if k != 255:
                    feats[b, k, y, x], feats[b, 2 + b, y, x] = 3.0, 3.0  # norm 3 sqrt 2
    classifier = np.eye(2, d) * 5.0  # C[k] = 5 e_k
    context = np.zeros((2, 2, d))
    for b in range(2):
        for k in range(2):
            context[b, k, k], context[b, k, 2 + b] = 0.1, 0.1  # A_p[b, k] along its image's class-k features
    return HeadView(feats, labels, classifier, context)


def test_cosine_stats_by_hand():
    from tsne.embed import cosine_stats, mean_cosines, row_similarity

    stats = cosine_stats(_toy_view())
    assert [s.cls for s in stats] == [0, 1] and [s.images for s in stats] == [2, 2]
    assert [s.pixels for s in stats] == [3, 4]
    for s in stats:
        assert s.to_c == pytest.approx(1 / np.sqrt(2))  # cos(e_k + e_img, e_k)
        assert s.to_ap == pytest.approx(1.0)  # A_p[b, k] is its image's class-k direction
        assert s.to_other_ap == pytest.approx(0.5)  # the other image's A_p[k] shares e_k only
        assert s.to_c_rest == pytest.approx(0.0) and s.to_ap_rest == pytest.approx(0.5)  # shares e_img
    m = mean_cosines(stats)
    assert m["classes"] == 2 and m["to_ap"] - m["to_c"] == pytest.approx(1 - 1 / np.sqrt(2))
    assert row_similarity(_toy_view()) == pytest.approx({"ap": 0.5, "c": 0.0})


def test_embedded_points_are_unit_vectors_and_caption_states_the_numbers():
    from tsne.embed import Points, cosine_stats, joint_points, row_similarity
    from tsne.make_tsne import cosine_caption, cosine_lines

    pts = joint_points(_toy_view(), per_class=10)
    assert np.allclose(np.linalg.norm(pts.vectors, axis=1), 1.0)
    assert (pts.kind == Points.CONTEXT).sum() == 4
    stats = cosine_stats(_toy_view())
    caption = cosine_caption(stats, row_similarity(_toy_view()))
    assert "to C[k] +0.707, to their image's A_p[k] +1.000 (Δ +0.293), to other images' A_p[k] +0.500" in caption
    assert "margins C +0.707, A_p +0.500" in caption and "mean pairwise cos +0.500" in caption
    assert caption.endswith("A_p[k] sits closer to its image's class-k features than C[k] does.")
    lines = cosine_lines(stats, ["wall", "bed"])
    assert len(lines) == 3 and lines[2].startswith("bed ")


# -- the DVC pipeline ----------------------------------------------------------------------------------
def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_stages_depend_on_what_they_run():
    stages = _stages()
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            path = dep.replace("${preset}", "quick")
            assert (ROOT / path).exists() or path.startswith(("data/", "runs/")), (name, dep)
    for n in range(2, 6):
        deps = stages[f"table{n}"]["deps"]
        assert f"ablations/table{n}.yaml" in deps and "data/context-scenes/${preset}" in deps
        assert "cac/exp/runner.py" in deps and "cac/mmseg" in deps
        assert not {"cac", "cac/exp", "cac/exp/sweep.py"} & set(deps)  # not the sweep...
        assert not any(d.startswith("cac/bench") for d in deps)  # ...nor the benchmark
    t6 = stages["table6"]
    assert "cac/bench" in t6["deps"] and not any(d.startswith(("data/", "cac/data")) for d in t6["deps"])
    assert t6["outs"] == ["runs/table6.txt"]
    report = stages["report"]
    assert report["outs"] == ["reports"]
    for n in range(2, 7):
        assert f"--spec table{n}" in report["cmd"] and f"ablations/table{n}.yaml" in report["deps"]
    assert "--tsne table3" in report["cmd"]
    outs = {o for s in stages.values() for o in s.get("outs", [])}
    assert {"runs/table2.json", "runs/table3.json", "runs/table4.json", "runs/table5.json",
            "runs/table6.txt"} <= set(report["deps"]) <= outs | {d for d in report["deps"] if (ROOT / d).exists()}
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored  # bytecode written while a stage runs must not change a dep's hash


def _recomputed_cosines(uri: str, run_id: str, images: list[int]) -> dict:
    """From the run's checkpoint, independently of tsne/: per class k, the mean over the images with k
    of the mean cosine of k's pixel features f to C[k] (the head's conv_seg row) and to the image's
    A_p[k]; and each (image, class)'s pixel count at the features' resolution."""
    import mlflow
    import torch
    import torch.nn.functional as F
    from mmengine.runner import load_checkpoint

    from analysis.figures import build_val_dataset, run_checkpoint, run_config, val_batch
    from cac.mmseg.params import build_model

    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    cfg = run_config(uri, run)
    model = build_model(cfg["model"]).eval()
    load_checkpoint(model, str(run_checkpoint(uri, run)), map_location="cpu", strict=True, logger="silent")
    with torch.no_grad():
        data = model.data_preprocessor(val_batch(build_val_dataset(cfg), images), False)
        feats = model.extract_feat(data["inputs"])
        head = model.decode_head
        f = head.features(feats)  # [B, D, h, w]
        c = head.head.conv_seg.weight.flatten(1)  # [N, D]
        a_p = head.context_weights(feats)  # [B, N, D]
    labels = torch.stack([s.gt_sem_seg.data[0] for s in data["data_samples"]])
    labels = F.interpolate(labels[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
    per_class: dict[int, list] = {}
    counts = {}
    for b in range(len(images)):
        for k in labels[b].unique().tolist():
            if k == 255:
                continue
            pix = f[b][:, labels[b] == k].T  # [P, D]
            counts[(b, k)] = len(pix)
            per_class.setdefault(k, []).append((F.cosine_similarity(pix, c[k][None], dim=1).mean().item(),
                                                F.cosine_similarity(pix, a_p[b, k][None], dim=1).mean().item()))
    return {"cos": {k: tuple(np.mean(v, axis=0)) for k, v in per_class.items()}, "counts": counts}


@pytest.mark.slow
def test_report_stage_command_writes_table6_and_tsne(workspace, tmp_path, capsys, saved_figures):
    """The report stage's command on a 10-iteration quick run of Table 3 (e) and hand-made Table 6 runs."""
    from analysis.make_tables import main
    from cac.exp.runner import run_spec

    spec = tmp_path / "specs" / "table3.yaml"
    spec.parent.mkdir()
    data = yaml.safe_load((ROOT / "ablations" / "table3.yaml").read_text())
    data["rows"] = [r for r in data["rows"] if r["label"] == "(e)"]
    data["baseline"] = "(e)"
    data["overrides"] = {"train_cfg.max_iters": 10, "train_cfg.val_interval": 10,
                         "default_hooks.checkpoint.interval": 10, "cac_curve.points": 1}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    assert run_spec(str(spec), "quick", tracking_uri=uri, echo=lambda s: None) == 0
    _log_bench_run(uri, "Baseline", 512, BASE)
    _log_bench_run(uri, "Ours", 512, OURS)
    out = tmp_path / "reports"
    assert main(["--tracking-uri", uri, "--preset", "quick", "--out", str(out), "--spec", str(spec),
                 "--spec", "table6", "--tsne", "table3", "--images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Mean cos of class-k pixels" in printed and "to their image's A_p[k]" in printed
    # Table 6's measured cells are the newest logged values (fps, Mem, their Δ)
    rows = _md_rows((out / "table6.md").read_text())
    assert list(rows) == ["Baseline", "Ours", "Δ"]
    for label, logged in (("Baseline", BASE), ("Ours", OURS)):
        assert (rows[label][0], rows[label][2]) == (f"{logged['fps']:.3f}", f"{logged['mem_mb']:.1f}"), label
    assert (rows["Δ"][0], rows["Δ"][2]) == (f"{OURS['fps_delta_pct']:+.2f}%", f"{OURS['mem_delta_pct']:+.2f}%")
    figs = out / "figures"
    for stem in ("tsne_table3_quick_e_s0", "tsne_table3_quick_e_s0_fig1"):
        for ext in (".png", ".pdf"):
            assert (figs / f"{stem}{ext}").stat().st_size > 1000
    side = json.loads((figs / "tsne_table3_quick_e_s0_cosine.json").read_text())
    assert side["embedded"] == "L2-normalised f, C rows and A_p rows" and side["classes"]
    assert side["caption"].startswith("Mean cos of class-k pixels") and side["row_pairwise_cos"]["ap"] is not None
    # the two cosines of every class, recomputed from the checkpoint's features on the same images
    again = _recomputed_cosines(uri, side["run_id"], side["images"])
    assert sorted(e["id"] for e in side["classes"].values()) == sorted(again["cos"])
    for name, entry in side["classes"].items():
        to_c, to_ap = again["cos"][entry["id"]]
        assert entry["to_c"] == pytest.approx(to_c, abs=1e-4) and entry["to_ap"] == pytest.approx(to_ap, abs=1e-4), name
        assert entry["pixels"] == sum(n for (_, k), n in again["counts"].items() if k == entry["id"]), name
    # Fig. 7 draws a dot per sampled pixel (up to 100 per class and image), C[k] once per class, A_p[k] per image
    ax = saved_figures["tsne_table3_quick_e_s0.png"].axes[0]
    dots, circles, stars = (len(col.get_offsets()) for col in ax.collections[:3])
    assert dots == sum(min(100, n) for n in again["counts"].values())
    assert circles == len(side["classes"]) and stars == len(again["counts"])
    assert ax.get_xlabel().replace("\n", " ").startswith(side["caption"])
