"""Reports, figures and t-SNE from real quick runs in a temporary MLflow store; statistics on
hand-made values."""
import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import enter_work

from cac.exp.stats import (Ordering, agreement_words, kendall_ordering, ordering_verdict, paired_ci,
                            paired_differences, summarize)

ROOT = Path(__file__).resolve().parents[1]
T_975_DF1 = 12.706204736174698  # Student t quantile 0.975, 1 degree of freedom (tables)
T_975_DF2 = 4.302652729749464  # ... 2 degrees of freedom
FAST = {"train_cfg.max_iters": 20, "train_cfg.val_interval": 10, "default_hooks.checkpoint.interval": 10}


# -- statistics on hand-made values ------------------------------------------------------------------
def test_summarize_mean_and_sample_std():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    one = summarize([4.5])
    assert one.mean == 4.5 and one.n == 1 and math.isnan(one.std)
    assert summarize([]) is None


def test_paired_differences_use_common_seeds_in_order():
    row = {0: 46.0, 1: 47.0, 2: 45.0, 5: 1.0}
    base = {2: 44.0, 0: 45.0, 1: 44.5, 3: 9.0}
    assert paired_differences(row, base) == [1.0, 2.5, 1.0]


def test_paired_ci_by_hand():
    # diffs 1, 3: mean 2, sd sqrt(2), n 2 -> half width t(0.975, 1) * sqrt(2) / sqrt(2)
    ci = paired_ci([1.0, 3.0])
    assert ci.mean == pytest.approx(2.0)
    assert ci.low == pytest.approx(2.0 - T_975_DF1) and ci.high == pytest.approx(2.0 + T_975_DF1)
    assert ci.n_pairs == 2 and ci.has_interval
    # diffs 1, 2, 3: mean 2, sd 1 -> half width t(0.975, 2) / sqrt(3)
    ci = paired_ci([1.0, 2.0, 3.0])
    assert ci.high - ci.mean == pytest.approx(T_975_DF2 / math.sqrt(3))
    # a 90% interval is narrower
    assert paired_ci([1.0, 2.0, 3.0], 0.9).high < ci.high
    one = paired_ci([0.7])
    assert one.mean == 0.7 and one.n_pairs == 1 and not one.has_interval and math.isnan(one.low)
    assert paired_ci([]) is None
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1\.5"):
        paired_ci([1.0, 2.0], confidence=1.5)


def test_paired_ci_removes_shared_seed_variation():
    # Seed effects of +-5 swamp the rows' spread, but each seed's difference is exactly 1.
    base = {0: 40.0, 1: 45.0, 2: 50.0}
    row = {s: v + 1.0 for s, v in base.items()}
    ci = paired_ci(paired_differences(row, base))
    assert ci.low == pytest.approx(1.0) and ci.high == pytest.approx(1.0)


def test_kendall_ordering_by_hand():
    paper = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    same = kendall_ordering({"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0}, paper)
    assert same.tau == pytest.approx(1.0) and same.n == 4
    assert same.p_value == pytest.approx(2 / 24)  # exact test: 1 of 24 orderings each way
    assert kendall_ordering({"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}, paper).tau == pytest.approx(-1.0)
    # one discordant pair out of three: (2 - 1) / 3
    assert kendall_ordering({"a": 1.0, "b": 3.0, "c": 2.0}, paper).tau == pytest.approx(1 / 3)
    # rows missing on either side or not finite are left out
    partial = kendall_ordering({"a": 1.0, "b": 2.0, "x": 9.0, "c": float("nan")}, paper)
    assert partial.n == 2
    assert kendall_ordering({"a": 1.0}, paper) is None


def test_agreement_words_and_verdict():
    assert agreement_words(0.1) == "no clear agreement"
    assert agreement_words(0.43) == "weak agreement"
    assert agreement_words(0.6) == "moderate agreement"
    assert agreement_words(0.9) == "strong agreement"
    assert agreement_words(-0.9).startswith("strong disagreement")
    assert "undefined" in agreement_words(float("nan"))
    line = ordering_verdict(Ordering(0.43, 0.24, 7))
    assert line == ("ordering vs paper: Kendall τ = 0.43 over 7 rows (p = 0.24): weak agreement; "
                    "not significant at the 5% level")
    assert "too few" in ordering_verdict(Ordering(1.0, 0.33, 3))
    assert "not computable" in ordering_verdict(None)


def test_ablation_table_from_hand_made_results():
    from analysis.tables import ablation_csv, ablation_latex, ablation_markdown, build_ablation
    from cac.exp.spec import load_spec

    spec = load_spec(ROOT / "ablations" / "table3.yaml")
    results = {"(a)": {0: 40.0, 1: 41.0, 2: 42.0}, "(b)": {0: 41.0, 1: 43.0}, "(e)": {0: 41.0, 1: 42.0, 2: 43.0},
               "(c)": {7: 50.0}}
    table = build_ablation(spec, results, "quick")
    rows = {r.label: r for r in table.rows}
    assert rows["(a)"].is_baseline and rows["(a)"].summary.mean == 41.0
    assert rows["(b)"].delta.mean == pytest.approx(1.5)  # seeds 0, 1 pair: diffs 1, 2
    assert rows["(b)"].delta.high == pytest.approx(1.5 + T_975_DF1 * math.sqrt(0.5) / math.sqrt(2))
    assert rows["(e)"].delta.low == pytest.approx(1.0) == rows["(e)"].delta.high
    assert rows["(c)"].delta is None  # its only seed has no baseline partner
    assert rows["(d)"].summary is None
    assert rows["(e)"].paper_delta == pytest.approx(46.91 - 45.74)
    md = ablation_markdown(table)
    for label in ("(a)", "(b)", "(c)", "(d)", "(e)", "(1)", "(2)"):
        assert f"| {label} |" in md
    assert "| (d) | Class-wise KL | no runs |" in md
    assert "n/a (0 pairs)" in md and "45.74" in md and "+1.17" in md
    assert "Kendall τ" in md
    parsed = list(csv.DictReader(io.StringIO(ablation_csv(table))))
    assert [r["row"] for r in parsed] == [r.label for r in spec.rows]
    assert parsed[3]["status"] == "no runs" and float(parsed[4]["paper"]) == 46.91
    tex = ablation_latex(table)
    assert r"\begin{tabular}" in tex and r"$\tau$" in tex and "τ" not in tex


def test_ablation_table_adds_a_delta_against_the_specs_compare_row():
    """ablations/ssa.yaml compares every row with CAC as well as with the baseline, paired by seed."""
    from analysis.tables import ablation_csv, ablation_markdown, build_ablation
    from cac.exp.spec import load_spec

    spec = load_spec(ROOT / "ablations" / "ssa.yaml")
    assert (spec.baseline, spec.compare) == ("(a)", "CAC")
    results = {"(a)": {0: 40.0, 1: 41.0, 2: 42.0}, "CAC": {0: 45.0, 1: 47.0, 2: 46.0},
               "SSA-Seg": {0: 46.0, 1: 47.5, 2: 46.0}, "+dice": {5: 50.0}}
    table = build_ablation(spec, results, "bench")
    rows = {r.label: r for r in table.rows}
    assert rows["SSA-Seg"].compare_delta.mean == pytest.approx(0.5)  # diffs 1.0, 0.5, 0.0
    assert rows["SSA-Seg"].delta.mean == pytest.approx(16.5 / 3)
    assert rows["(a)"].compare_delta.mean == pytest.approx(-5.0) and rows["CAC"].compare_delta is None
    assert rows["+dice"].compare_delta is None  # no seed in common with CAC
    md = ablation_markdown(table)
    assert "| Δ vs CAC [95% CI] |" in md and "| CAC | CAC as the official code trains it | 46.00" in md
    assert "| reference |" in md and "+0.50 [" in md
    parsed = {r["row"]: r for r in csv.DictReader(io.StringIO(ablation_csv(table)))}
    assert float(parsed["SSA-Seg"]["compare_delta"]) == pytest.approx(0.5)
    assert int(parsed["SSA-Seg"]["compare_n_pairs"]) == 3 and parsed["CAC"]["compare_delta"] == ""
    plain = ablation_csv(build_ablation(load_spec(ROOT / "ablations" / "table3.yaml"), {}, "quick"))
    assert "compare_delta" not in plain.splitlines()[0]  # other tables keep their columns


# -- real quick runs ---------------------------------------------------------------------------------
def _subset_spec(src: Path, dst: Path, labels: list[str], extra: dict) -> Path:
    """A copy of a repo spec with only ``labels`` and a shorter schedule; the file stem names the table."""
    data = yaml.safe_load(src.read_text())
    data["rows"] = [r for r in data["rows"] if r["label"] in labels]
    data.update(extra)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return dst


@pytest.fixture(scope="session")
def tracked(tmp_path_factory, quick_data):
    """table3 rows (a), (e) x 2 seeds and table1_ade20k's fcn-mv2+cac (the slim FCN: shared with table3 (e) s0) x 1 seed,
    20 iterations each, in a temporary MLflow SQLite store. Row (b) and fcn-mv2 stay without runs."""
    from cac.exp.runner import run_spec

    root = tmp_path_factory.mktemp("analysis")
    t3 = _subset_spec(ROOT / "ablations" / "table3.yaml", root / "specs" / "table3.yaml", ["(a)", "(b)", "(e)"],
                      {"overrides": FAST, "presets": {"quick": {"seeds": 2}}})
    t1 = _subset_spec(ROOT / "experiments" / "table1_ade20k.yaml", root / "specs" / "table1_ade20k.yaml",
                      ["fcn-mv2", "fcn-mv2+cac"],
                      {"overrides": FAST, "presets": {"quick": {"model": "fcn-slim-r18"}}})
    uri = f"sqlite:///{root}/mlflow.db"
    work = root / "work_dirs"
    with pytest.MonkeyPatch.context() as mp:
        enter_work(mp, root, work)
        mp.setenv("CAC_DATA_ROOT", str(quick_data))
        assert run_spec(str(t3), "quick", rows="(a),(e)", tracking_uri=uri, echo=lambda s: None) == 0
        assert run_spec(str(t1), "quick", rows="fcn-mv2+cac", tracking_uri=uri, echo=lambda s: None) == 0
    return SimpleNamespace(root=root, uri=uri, work=work, table3=t3, table1=t1, data=quick_data)


@pytest.fixture()
def in_work(tracked, monkeypatch):
    """Analysis code finds the runs' local work dirs and data as the runner placed them."""
    enter_work(monkeypatch, tracked.root, tracked.work)
    monkeypatch.setenv("CAC_DATA_ROOT", str(tracked.data))
    return tracked


def _env(tracked) -> dict:
    return {**os.environ, "CAC_WORK_DIR": str(tracked.work), "CAC_DATA_ROOT": str(tracked.data), "MPLBACKEND": "Agg"}


def _assert_figure(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    head = path.read_bytes()[:8]
    assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")


def _logged(uri: str, experiment: str, key: str) -> dict[str, dict[int, tuple[str, float]]]:
    """``{row: {seed: (run id, value of key)}}`` of the FINISHED runs, read with MlflowClient."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    out: dict[str, dict[int, tuple[str, float]]] = {}
    for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id]):
        if r.info.status == "FINISHED" and key in r.data.metrics:
            out.setdefault(r.data.tags["row"], {})[int(r.data.tags["seed"])] = (r.info.run_id, r.data.metrics[key])
    return out


def _md_row(md: str, label: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is ``label`` (the main table)."""
    row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _assert_curves_drawn(fig, uri: str, run_ids: list[str]) -> None:
    """Each panel of Fig. 4 draws, per classifier, the mean over the seeds of the logged curve."""
    import mlflow
    import numpy as np

    client = mlflow.MlflowClient(tracking_uri=uri)
    for ax, split in zip(fig.axes[:2], ("train", "val")):
        drawn = sorted((tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines if len(line.get_xdata()))
        expected = []
        for short in ("p", "pp", "py"):
            hists = [{m.step: m.value for m in client.get_metric_history(rid, f"curve/{split}_mIoU_{short}")}
                     for rid in run_ids]
            steps = sorted(hists[0])
            assert steps and all(sorted(h) == steps for h in hists), (split, short)
            expected.append((tuple(float(s) for s in steps), tuple(float(np.mean([h[s] for h in hists])) for s in steps)))
        assert len(drawn) == len(expected), (split, len(drawn))
        for (x, y), (ex, ey) in zip(drawn, sorted(expected)):
            assert x == pytest.approx(ex) and y == pytest.approx(ey), split


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_tables_writes_tables_and_figures(in_work, tmp_path, saved_figures):
    from analysis.make_tables import main
    from cac.exp.spec import load_spec

    out = tmp_path / "reports"
    assert main(["--tracking-uri", in_work.uri, "--spec", str(in_work.table3), "--spec", str(in_work.table1),
                 "--out", str(out), "--tsne", "--images", "2"]) == 0
    md = (out / "table3.md").read_text()
    spec = load_spec(in_work.table3)
    for row in spec.rows:
        assert f"| {row.label} | {row.description} |" in md
    assert "| (b) | Vanilla KL | no runs |" in md
    for paper in ("45.74", "45.72", "46.91", "+1.17"):
        assert paper in md
    # row (e) from the values MLflow holds: mean ± sample std of val/mIoU, and the paired Δ vs (a)
    # with its 95% t-interval over the 2 seeds
    logged = _logged(in_work.uri, "table3", "val/mIoU")
    assert sorted(logged) == ["(a)", "(e)"] and sorted(logged["(e)"]) == sorted(logged["(a)"]) == [0, 1]
    e = [logged["(e)"][s][1] for s in (0, 1)]
    diffs = [logged["(e)"][s][1] - logged["(a)"][s][1] for s in (0, 1)]
    d, half = sum(diffs) / 2, T_975_DF1 * (abs(diffs[0] - diffs[1]) / math.sqrt(2)) / math.sqrt(2)
    assert _md_row(md, "(e)") == ["(e)", spec.row("(e)").description,
                                  f"{sum(e) / 2:.2f} ± {abs(e[0] - e[1]) / math.sqrt(2):.2f} (n=2)",
                                  f"{d:+.2f} [{d - half:+.2f}, {d + half:+.2f}] (2 pairs)", "46.91", "+1.17"]
    assert "Ordering vs paper: Kendall τ" in md
    rows = list(csv.DictReader((out / "table3.csv").open()))
    assert {r["row"]: r["status"] for r in rows} == {"(a)": "ok", "(b)": "no runs", "(e)": "ok"}
    assert r"\toprule" in (out / "table3.tex").read_text()

    t1 = (out / "table1.md").read_text()
    assert "| FCN | MobileNet-V2 |" in t1 and "| + Ours | MobileNet-V2 |" in t1
    assert "no runs" in t1 and "19.71" in t1 and "37.40" in t1 and "10.61M" in t1
    assert "(n=1)" in t1 and "fcn-slim-r18" in t1
    assert (out / "table1.csv").is_file() and (out / "table1.tex").is_file()

    figs = out / "figures"
    for name in ("oracle_curves_table3_quick", "masks_table3_quick", "oracle_curves_table1_ade20k_quick",
                 # Table 1's fcn-mv2+cac at quick is Table 3 (e) seed 0 (same model, options, data): shared,
                 # so its t-SNE is of that run and carries its name
                 "tsne_table3_quick_e_s1", "tsne_table3_quick_e_s0_fig1"):
        for ext in (".png", ".pdf"):
            _assert_figure(figs / f"{name}{ext}")
    _assert_curves_drawn(saved_figures["oracle_curves_table3_quick.png"], in_work.uri,
                         [logged["(e)"][s][0] for s in (0, 1)])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_oracle_history_and_full_cac_row(in_work):
    from analysis.figures import full_cac_row, matched_runs, metric_history
    from cac.exp.runner import curve_interval
    from cac.exp.spec import load_spec

    spec = load_spec(in_work.table3)
    runs = matched_runs(spec, "quick", in_work.uri)
    assert {k: sorted(v) for k, v in runs.items()} == {"(a)": [0, 1], "(b)": [], "(e)": [0, 1]}
    assert full_cac_row(spec).label == "(e)"
    frame = metric_history(in_work.uri, runs["(e)"])
    assert set(frame["classifier"]) == {"original p", "context-aware p_p", "oracle p_y"}
    every = curve_interval(20, 10)  # the dense curve series (curve/*) of Fig. 4
    assert sorted(set(frame["step"])) == list(range(every, 21, every)) and set(frame["split"]) == {"train", "val"}
    # (a) has lambda_kl = 0 but keeps L_y^ce, so it logs the oracle too
    assert "oracle p_y" in set(metric_history(in_work.uri, runs["(a)"])["classifier"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoint_falls_back_to_mlflow_artifacts(in_work, tmp_path):
    import torch

    from analysis.figures import matched_runs, run_checkpoint, run_config
    from cac.exp.spec import load_spec

    run = matched_runs(load_spec(in_work.table3), "quick", in_work.uri)["(e)"][0]
    local = run_checkpoint(in_work.uri, run)
    assert local.is_file() and str(local).startswith(str(in_work.work))
    remote = run_checkpoint(in_work.uri, run, work_root=tmp_path / "elsewhere")
    assert remote.is_file() and not str(remote).startswith(str(in_work.work))
    assert torch.load(remote, map_location="cpu", weights_only=False)["meta"]["iter"] == 20
    cfg = run_config(in_work.uri, run, work_root=tmp_path / "elsewhere")
    assert cfg["model"]["decode_head"]["type"] == "CACHead"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tsne_script_writes_its_figures(tracked, tmp_path):
    from analysis.figures import matched_runs
    from cac.exp.spec import load_spec

    run = matched_runs(load_spec(tracked.table3), "quick", tracked.uri)["(e)"][0]
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, str(ROOT / "tsne" / "make_tsne.py"), "--run-id", run.info.run_id,
                           "--tracking-uri", tracked.uri, "--images", "3", "--out", str(out)],
                          cwd=tracked.root, env=_env(tracked), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tsne_table3_quick_e_s0", "tsne_table3_quick_e_s0_fig1"):
        for ext in (".png", ".pdf"):
            _assert_figure(out / f"{name}{ext}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_tables_as_a_script_and_as_a_module(tracked, tmp_path):
    out = tmp_path / "r"
    script = subprocess.run([sys.executable, str(ROOT / "analysis" / "make_tables.py"), "--tracking-uri", tracked.uri,
                             "--spec", str(tracked.table3), "--out", str(out), "--no-figures"],
                            cwd=tracked.root, env=_env(tracked), capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-3000:]
    assert (out / "table3.md").is_file() and not (out / "figures").exists()
    module = subprocess.run([sys.executable, "-m", "analysis.make_tables", "--spec", "no-such-table"],
                            cwd=ROOT, env=_env(tracked), capture_output=True, text=True, timeout=300)
    assert module.returncode == 2 and "no spec 'no-such-table'" in module.stderr


def test_tsne_helpers_on_hand_made_arrays():
    import numpy as np

    from tsne.embed import HeadView, Points, choose_images, joint_points, tsne_2d

    maps = [np.array([[0, 1], [1, 255]]), np.array([[2, 2], [2, 1]]), np.array([[0, 3], [3, 3]])]
    cls, chosen = choose_images(maps, 2)
    assert cls == 1 and chosen == [0, 1]  # class 1 is in two images; 0 too, but with fewer pixels
    rng = np.random.default_rng(0)
    view = HeadView(feats=rng.normal(size=(2, 8, 2, 2)), labels=np.stack(maps[:2]),
                    classifier=rng.normal(size=(4, 8)), context=rng.normal(size=(2, 4, 8)))
    pts = joint_points(view, per_class=10)
    assert (pts.kind == Points.FEATURE).sum() == 7  # every labelled pixel, the ignored one left out
    assert sorted(pts.cls[pts.kind == Points.CLASSIFIER].tolist()) == [0, 1, 2]
    assert sorted(zip(pts.image[pts.kind == Points.CONTEXT].tolist(), pts.cls[pts.kind == Points.CONTEXT].tolist())) \
        == [(0, 0), (0, 1), (1, 1), (1, 2)]
    xy = tsne_2d(pts.vectors, random_state=0)
    assert xy.shape == (len(pts.vectors), 2) and np.isfinite(xy).all()
    assert np.allclose(xy, tsne_2d(pts.vectors, random_state=0))


def _visible_text(page: str) -> str:
    """The text a reader sees in a dumped DOM (scripts and styles dropped, tags to spaces)."""
    import html
    import re

    page = re.sub(r"<script.*?</script>|<style.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def _ui(args: list, cwd: Path, env: dict):
    """``cac-exp ui ARGS`` started on a free port; returns (process, the lines it printed up to its
    "Ctrl-C stops it")."""
    import time

    from ports import on_free_ports

    def start(ports: list[int]):
        proc = subprocess.Popen([sys.executable, "-m", "cac.cli", "ui", *args, "--port", str(ports[0])], cwd=cwd,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("cac-exp ui ended: " + "".join(lines)[-2000:])
            lines.append(line.rstrip("\n"))
            if "stops it" in line:
                return proc, lines
        proc.kill()
        raise RuntimeError("cac-exp ui printed no address within 120 s")

    return on_free_ports(start)


def _stop(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _dump(browser: str, page: str, profile: Path) -> str:
    """The DOM headless Chromium renders for ``page``, as a reader sees its text."""
    dump = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}",
                           "--window-size=1920,1200", "--virtual-time-budget=30000", "--dump-dom", page],
                          capture_output=True, text=True, timeout=180)
    return _visible_text(dump.stdout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cac_exp_ui_opens_on_the_training_runs(tracked, tmp_path):
    """``cac-exp ui`` starts MLflow's UI on the tracked store (loopback) and prints, per experiment, the
    address of its training runs; opened in headless Chromium that page is MLflow's runs table with
    each run's dataset (the data version, a training input) and source (cac-exp) in MLflow's own
    columns, not its GenAI overview. A run's page shows the ``git_dirty`` tag among its tags (MLflow's
    UI hides its own ``mlflow.source.git.dirty``)."""
    import shutil

    import mlflow

    from components import require

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    require("Chromium", "" if browser else "headless Chromium is not installed", "apt-get install chromium (.ci/run does)")
    client = mlflow.MlflowClient(tracked.uri)
    experiment = client.get_experiment_by_name("table3")
    runs = client.search_runs([experiment.experiment_id])
    version = runs[0].data.tags["data_version"]

    server, lines = _ui(["--tracking-uri", tracked.uri], tmp_path, _env(tracked))
    try:
        (link,) = [line.split(": ", 1)[1] for line in lines if line.strip().startswith("table3 (")]
        assert link.startswith("http://127.0.0.1:") and link.endswith(
            f"/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"), lines
        text = _dump(browser, link, tmp_path / "profile")
        run = runs[0]
        run_page = link.replace("?workflowType=machine_learning", f"/runs/{run.info.run_id}")
        run_text = _dump(browser, run_page, tmp_path / "profile")
    finally:
        _stop(server)
    assert "Runs - Experiment" in text, text[:2000]
    assert " Dataset " in text and " Source " in text, text[:2000]  # MLflow's own columns
    assert text.count(f"{version} (") == len(runs) and text.count(" training ") >= len(runs), text[:3000]
    assert text.count(" cac-exp ") == len(runs), text[:3000]
    tags = run_text.split(" Tags ", 1)[-1]
    assert f" git_dirty : {run.data.tags['git_dirty']} " in tags, run_text[:4000]


@pytest.mark.slow
def test_cac_exp_ui_sweep_serves_optuna_dashboard_on_the_sweeps_storage(tmp_path):
    """``cac-exp ui --sweep SPEC`` serves optuna-dashboard on the sweep's storage, its study's address
    printed; the dashboard's API lists the study with its trial."""
    import json
    import time
    import urllib.request

    import optuna

    spec = ROOT / "experiments" / "sweep_tau_lambda.yaml"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="sweep_tau_lambda", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"tau": 15.0}, distributions={
        "tau": optuna.distributions.FloatDistribution(1.0, 30.0, log=True)}, value=42.0))
    server, lines = _ui(["--sweep", str(spec), "--storage", storage], tmp_path, dict(os.environ))
    try:
        (line,) = [line for line in lines if line.startswith("optuna-dashboard on ")]
        address = line.split()[2]
        assert address.startswith("http://127.0.0.1:") and address.endswith(f"/dashboard/studies/{study._study_id}")
        base = address.split("/dashboard")[0]

        def get(path: str) -> dict:
            for _ in range(100):  # the address is printed as the server starts listening
                try:
                    return json.loads(urllib.request.urlopen(f"{base}{path}", timeout=30).read())
                except OSError:  # urllib's URLError: not listening yet
                    time.sleep(0.2)
            raise AssertionError(f"no answer from {base}{path}")

        studies = get("/api/studies")["study_summaries"]
        detail = get(f"/api/studies/{study._study_id}")
    finally:
        _stop(server)
    assert [s["study_name"] for s in studies] == ["sweep_tau_lambda"]
    assert [t["values"] for t in detail["trials"]] == [[42.0]]
