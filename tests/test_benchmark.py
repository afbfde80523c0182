"""Table 6 benchmark: the spec, the protocol pieces, a real tiny run logged to MLflow, the KL loop."""
import importlib.util
from pathlib import Path

import pytest
import torch

from cac.bench.models import bench_model_cfg, bench_settings, build_eval_model, classifier_cost
from cac.bench.table6 import (PAPER_TABLE6, SizeResult, add_deltas, format_table, print_tracked_benchmark,
                              run_benchmark)
from cac.bench.timing import time_interleaved
from cac.errors import CacError
from cac.core.functional import entropy_kl_loss
from cac.exp.spec import load_spec
from cac.synthetic import kl_inputs

ROOT = Path(__file__).resolve().parents[1]
TABLE6 = ROOT / "ablations" / "table6.yaml"

TINY = """\
title: "tiny benchmark"
task: benchmark
model: fcn-slim-r18
baseline: Baseline
benchmark: {sizes: [64], warmup: 1, repeats: 2, device: cpu}
rows:
  - {label: Baseline, description: "plain", cac: false}
  - {label: Ours, description: "+CAC", cac: true}
"""


def _load_kl_script():
    spec = importlib.util.spec_from_file_location("kl_loss_bench", ROOT / "benchmarks" / "kl_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table6_spec_validates_with_presets_and_paper_figures():
    spec = load_spec(TABLE6)
    assert spec.task == "benchmark" and spec.name == "table6"
    assert [(r.label, r.cac is None) for r in spec.rows] == [("Baseline", True), ("Ours", False)]
    assert {spec.model_for(r, p) for r in spec.rows for p in ("quick", "bench", "paper")} == {"upernet-swin-t"}
    quick, bench, paper = (bench_settings(spec, p) for p in ("quick", "bench", "paper"))
    assert (quick.sizes, quick.repeats, quick.warmup) == ((512,), 3, 1)
    assert set(quick.sizes) < set(bench.sizes) < set(paper.sizes) == {512, 1280, 2560}
    for row in spec.rows:  # the rows' `paper:` holds the 512 column of the paper's Table 6
        assert (row.paper["fps"], row.paper["mem"]) == PAPER_TABLE6[512][row.label]
    cfg = bench_model_cfg(spec, spec.row("Ours"), "quick")
    assert cfg["decode_head"]["type"] == "CACHead" and cfg["decode_head"]["head"]["num_classes"] == 150
    assert cfg["test_cfg"]["mode"] == "whole" and "SyncBN" not in str(cfg) and "Pretrained" not in str(cfg)


def test_dry_run_prints_plan_and_model_override(monkeypatch, tmp_path):
    lines = []
    monkeypatch.setenv("CAC_BENCH_MODEL", "fcn-mv2")
    code = run_benchmark(load_spec(TABLE6), "bench", rows="Ours", dry_run=True,
                         tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", echo=lines.append)
    text = "\n".join(lines)
    assert code == 0 and "sizes [512, 1280]" in text and "fcn-mv2 (from CAC_BENCH_MODEL) cac on" in text and "Baseline" not in text
    assert not (tmp_path / "m.db").exists()  # a dry run opens no store
    monkeypatch.setenv("CAC_BENCH_MODEL", "no-such-model")
    with pytest.raises(CacError, match="unknown model"):
        run_benchmark(load_spec(TABLE6), "quick", dry_run=True, echo=lines.append)


def test_time_interleaved_rotates_the_order_and_skips_warmup():
    calls = []
    times = time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, warmup=1, repeats=3)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_format_table_has_paper_columns_and_deltas():
    res = {}
    for size in (512, 1280):
        rows = {"Baseline": SizeResult("Baseline", size, [1.0, 1.0], {"fps": 1.0, "time_ms_median": 1000.0},
                                       {"mem_mb": 800.0}),
                "Ours": SizeResult("Ours", size, [1.01, 1.01], {"fps": 1 / 1.01, "time_ms_median": 1010.0},
                                   {"mem_mb": 802.0},
                                   {"classifier_extra_ms": 9.0, "cac_classifier_ms": 34.0, "conv_seg_ms": 25.0})}
        add_deltas(rows, "Baseline")
        res[size] = rows
    assert res[512]["Ours"].delta["fps_delta_pct"] == pytest.approx(-0.990, abs=1e-3)
    assert res[512]["Ours"].delta["mem_delta_pct"] == pytest.approx(0.25)
    assert res[512]["Ours"].delta["fps_delta_from_classifier_pct"] == pytest.approx(100 * (1000 / 1009 - 1))
    text = format_table(res, ["Baseline", "Ours"], "Baseline", "upernet-swin-t")
    assert "20.38" in text and "-2.05%" in text and "-1.94%" in text and "-0.99%" in text and "+0.25%" in text
    assert "20.38" not in format_table(res, ["Baseline", "Ours"], "Baseline", "fcn-mv2")
    # a row the paper does not have (ablations/ssa_cost.yaml's) gets no paper Δ of its own
    for size in res:
        res[size]["SSA-Seg"] = SizeResult("SSA-Seg", size, [1.02], {"fps": 1 / 1.02, "time_ms_median": 1020.0},
                                          {"mem_mb": 804.0})
        add_deltas(res[size], "Baseline")
    lines = format_table(res, ["Baseline", "Ours", "SSA-Seg"], "Baseline", "upernet-swin-t").splitlines()
    (ours,) = [ln for ln in lines if ln.startswith("Δ Ours")]
    (ssa,) = [ln for ln in lines if ln.startswith("Δ SSA-Seg")]
    assert "-2.05%" in ours and "-2.05%" not in ssa and "-1.96%" in ssa and "—" in ssa


def test_oracle_branch_never_runs_at_inference():
    spec = load_spec(TABLE6)
    cfg = bench_model_cfg(spec, spec.row("Ours"), "quick")
    cfg["backbone"]["depths"] = [1, 1, 1, 1]  # a shallow Swin: same head, seconds to build and run
    model = build_eval_model(cfg, "cpu")
    assert model.decode_head.classifier.proj_y is not None  # the training-only branch exists...
    cost = classifier_cost(model, 64, 1, repeats=2, device="cpu")  # ...and raises if it ever runs here
    assert cost["cac_classifier_ms"] > 0 and cost["conv_seg_ms"] > 0


@pytest.mark.parametrize("label", ["GMMSeg", "ProtoSeg", "SSA-Seg"])
def test_the_classifier_share_is_measured_for_every_classifier(label):
    """Table 6's classifier timing on the cost spec's other rows: the classifier each head ends with,
    on the features the head gave it (GMMSeg and ProtoSeg have no oracle branch to watch)."""
    spec = load_spec(ROOT / "ablations" / "classifiers_cost.yaml")
    cfg = bench_model_cfg(spec, spec.row(label), "quick")
    cfg["backbone"]["depths"] = [1, 1, 1, 1]
    model = build_eval_model(cfg, "cpu")
    kind = {"GMMSeg": "GMMSegClassifier", "ProtoSeg": "ProtoSegClassifier"}.get(label, "ContextAwareClassifier")
    assert type(model.decode_head.classifier).__name__ == kind
    cost = classifier_cost(model, 64, 1, repeats=2, device="cpu")
    assert cost["cac_classifier_ms"] > 0 and cost["conv_seg_ms"] > 0


@pytest.mark.slow
def test_run_benchmark_logs_runs_and_prints_table6(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAC_BENCH_MODEL", raising=False)
    path = tmp_path / "tiny_bench.yaml"
    path.write_text(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines = []
    assert run_benchmark(load_spec(path), "quick", tracking_uri=uri, echo=lines.append) == 0
    text = "\n".join(lines)
    assert "64x64" in text and "\nΔ" in text and "%" in text and "cross-checks (Ours)" in text
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("tiny_bench").experiment_id])
    by_row = {r.data.tags["row"]: r for r in runs}
    assert set(by_row) == {"Baseline", "Ours"} and all(r.info.status == "FINISHED" for r in runs)
    for row in by_row.values():
        tags, metrics = row.data.tags, row.data.metrics
        assert (tags["spec"], tags["preset"], tags["size"], tags["device"], tags["model"]) == \
            ("tiny_bench", "quick", "64", "cpu", "fcn-slim-r18")
        assert metrics["fps"] > 0 and metrics["time_ms_median"] > 0 and metrics["mem_mb"] > 0
        assert row.data.params["bench.repeats"] == "2"
    ours = by_row["Ours"].data.metrics
    assert {"fps_delta_pct", "mem_delta_pct", "classifier_extra_ms"} <= set(ours)
    assert by_row["Ours"].data.params["cac.tau"] == "15.0" and by_row["Baseline"].data.params["cac"] == "off"
    # `cac-exp results` rebuilds the same Table 6 from the store
    tracked = []
    assert print_tracked_benchmark(load_spec(path), "quick", uri, echo=tracked.append) == 0
    printed_delta = next(line for line in text.splitlines() if line.startswith("Δ"))
    assert next(line for line in "\n".join(tracked).splitlines() if line.startswith("Δ")) == printed_delta
    empty = []
    print_tracked_benchmark(load_spec(path), "bench", uri, echo=empty.append)
    assert "no tracked benchmark runs" in empty[0]


@pytest.mark.parametrize("classes", [150, 171])
def test_kl_loop_agrees_with_entropy_kl_loss(classes):
    kl = _load_kl_script()
    student, teacher, labels = kl_inputs(batch=2, classes=classes, size=24, per_image=6)
    labels[1, :4] = 7 % classes  # a class present in one image only
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    vec = entropy_kl_loss(s1, teacher, labels)
    loop = kl.classwise_kl_loop(s2, teacher, labels)
    torch.testing.assert_close(vec, loop, rtol=1e-5, atol=1e-6)
    vec.backward()
    loop.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("options", [{}, {"original": "cos"}, {"context": "dot"}, {"test_output": "original"}])
def test_inference_predict_reusing_buffers_matches_autograd_path(options):
    """Without autograd, predict writes p_p into p's buffer; the values are those of forward()."""
    from cac.core.classifier import ContextAwareClassifier

    torch.manual_seed(0)
    cac = ContextAwareClassifier(16, 5, options).eval()
    feats, weight, bias = torch.randn(2, 16, 6, 7), torch.randn(5, 16), torch.randn(5)
    want = cac(feats, weight, bias)
    want = want.p if options.get("test_output") == "original" else want.p_p
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(cac.predict(feats, weight, bias), want)


def test_inference_predict_under_autocast_falls_back_from_the_shared_buffer():
    """autocast does not cast ``out=`` products: p_p must then be computed without p's buffer."""
    from cac.core.classifier import ContextAwareClassifier

    torch.manual_seed(0)
    cac = ContextAwareClassifier(16, 5).eval()
    feats, weight, bias = torch.randn(2, 16, 6, 7), torch.randn(5, 16), torch.randn(5)
    want = cac.predict(feats, weight, bias)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cac.predict(feats, weight, bias)
    torch.testing.assert_close(got.float(), want, atol=0.3, rtol=0.05)
