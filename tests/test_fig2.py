"""Fig. 2 (issue 19, item 4): mIoU against #params and inference time, baseline -> + CAC, from tracked
runs; models without runs are left out and named in the caption."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cac.cli import main

SPEC = """\
title: "Table 1: a small check"
dataset: ade20k
seeds: 1
overrides: {train_cfg.max_iters: 10, train_cfg.val_interval: 10, cac_curve.points: 1}
rows:
  - {label: slim, description: "FCN, slim ResNet-18", model: fcn-slim-r18, cac: false}
  - {label: slim+cac, description: "FCN, slim ResNet-18 + Ours", model: fcn-slim-r18, cac: true}
  - {label: fcn-mv2, description: "FCN, MobileNet-V2", model: fcn-mv2, cac: false}
  - {label: fcn-mv2+cac, description: "FCN, MobileNet-V2 + Ours", model: fcn-mv2, cac: true}
"""
SPEED = """\
title: "timings"
task: benchmark
benchmark: {sizes: [512], warmup: 1, repeats: 2, batch_size: 1, device: cpu}
rows:
  - {label: slim, description: "FCN, slim ResNet-18", model: fcn-slim-r18, cac: false}
  - {label: slim+cac, description: "FCN, slim ResNet-18 + Ours", model: fcn-slim-r18, cac: true}
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fig2_plots_tracked_miou_params_and_time(workspace):
    from mlflow.tracking import MlflowClient

    from analysis.efficiency import fig2_figure, plot_fig2, ModelPair
    from cac.exp.spec import load_spec
    from cac.mmseg.config import resolve_config
    from cac.mmseg.params import count_params

    spec_path = workspace / "table1_small.yaml"
    spec_path.write_text(SPEC)
    speed_path = workspace / "speed.yaml"
    speed_path.write_text(SPEED)
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    assert main(["run", str(spec_path), "--preset", "quick", "--rows", "slim,slim+cac", "--tracking-uri", uri]) == 0
    assert main(["run", str(speed_path), "--preset", "quick", "--tracking-uri", uri]) == 0

    client = MlflowClient(uri)
    trained = {r.data.tags["row"]: r for r in client.search_runs(
        [client.get_experiment_by_name("table1_small").experiment_id])}
    timed = {r.data.tags["row"]: r for r in client.search_runs(
        [client.get_experiment_by_name("speed").experiment_id])}
    spec = load_spec(spec_path)
    out = workspace / "figs"
    # results=None: the figure reads the runs back from MLflow, as make_tables.py draws it
    paths = fig2_figure(spec, "quick", uri, out, speed=load_spec(speed_path))
    assert sorted(p.suffix for p in paths) == [".json", ".pdf", ".png"]
    side = json.loads((out / "fig2_table1_small_quick.json").read_text())
    models = {m["base"]: m for m in side["models"]}
    slim = models["slim"]
    assert slim["miou"] == [trained["slim"].data.metrics["val/mIoU"], trained["slim+cac"].data.metrics["val/mIoU"]]
    expected_params = [count_params(resolve_config("fcn-slim-r18", "quick", cac=c)["model"]) / 1e6
                       for c in (False, True)]
    assert slim["params_m"] == pytest.approx(expected_params)
    assert slim["params_m"][1] > slim["params_m"][0]  # the projectors
    assert slim["time_ms"] == [timed["slim"].data.metrics["time_ms_median"],
                               timed["slim+cac"].data.metrics["time_ms_median"]]
    # the model nobody trained is left out and named
    assert models["fcn-mv2"]["miou"] is None
    assert "FCN, MobileNet-V2" in side["caption"] and "Left out" in side["caption"]

    # what is drawn: one baseline point and one + CAC point per model with data, at the values above
    pair = ModelPair(**{k: tuple(v) if isinstance(v, list) else v for k, v in slim.items()})
    fig = plot_fig2([pair, ModelPair("no runs", "a", "b")], "t", "c")
    for ax, xs in zip(fig.axes[:2], (pair.params_m, pair.time_ms)):
        points = [tuple(c.get_offsets()[0]) for c in ax.collections]
        assert points == [(xs[0], pair.miou[0]), (xs[1], pair.miou[1])]
        arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
        assert [(a.xy, a.xyann) for a in arrows] == [((xs[1], pair.miou[1]), (xs[0], pair.miou[0]))]
