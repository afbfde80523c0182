"""Reports from tracked runs: the paper's Tables 1-6 (Markdown, CSV, LaTeX) and Figs. 4, 6 and 7 (+ Fig. 1).

    python analysis/make_tables.py [--tracking-uri URI] [--spec table3] [--preset quick] [--out reports/]
                                   [--no-figures] [--params] [--tsne [SPEC ...]]

Without ``--spec`` every spec (``ablations/table{2..6}.yaml``, ``experiments/table1_*.yaml``) that has
FINISHED runs at the preset is reported. Writes ``<out>/table{N}.{md,csv,tex}`` (Table 6 from the
tracked benchmark runs; an ablation's Markdown ends with where and how CAC helps: calibration and
changed pixels per row, per-class Δ IoU in ``table{N}_classes.csv``) and, unless ``--no-figures``,
``<out>/figures/oracle_curves_<spec>_<preset>``, ``masks_<spec>_<preset>``, ``class_delta_<spec>_<preset>``
and ``reliability_<spec>_<preset>`` (PNG and PDF); ``--tsne`` adds the t-SNE figures (Fig. 7 and Fig. 1
views, with the cosine sidecar JSON) of the latest +CAC run of every reported spec, ``--tsne table3``
of the named specs only (then a t-SNE that cannot be made is an error, exit 1).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: import from the repo root, not this folder
    # (this folder on sys.path would let its modules shadow others, e.g. tables.py vs PyTables)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from cac.exp.credentials import public_url  # noqa: E402
from cac.exp.spec import find_spec, spec_files  # noqa: E402

from analysis.tables import (DATASET_NAMES, ablation_csv, ablation_latex, ablation_markdown,  # noqa: E402
                             build_ablation, build_table1, paper_model, table1_csv, table1_latex,
                             table1_markdown, table_number)

__all__ = ["report_ablation", "report_table1", "report_table6", "report_figures", "explain_sections", "main"]

REPORTED_TASKS = ("train", "benchmark")

def _finished_count(spec, preset: str, uri: str) -> int:
    from cac.exp.tracking import find_runs

    return len(find_runs(uri, spec.name, {"preset": preset}, statuses=["FINISHED"]))


def _has_shared_runs(spec, preset: str, uri: str) -> bool:
    """Whether runs another spec trained count in this one (Table 3 (a) is Table 2 (d))."""
    from cac.exp.results import matched_runs

    return spec.task == "train" and any(matched_runs(spec, preset, uri).values())


def _ignored_note(spec, preset: str, uri: str, results: dict) -> list[str]:
    """Say how many FINISHED runs were not counted (config changed since, or another row set)."""
    counted = sum(len(v) for v in results.values())
    ignored = _finished_count(spec, preset, uri) - counted
    if ignored <= 0:
        return []
    return [f"{ignored} FINISHED run(s) of `{spec.name}` at preset `{preset}` were not counted: their config "
            "differs from the spec's current one, their row is not in the spec, or they lack `val/mIoU`."]


def _write(out_dir: Path, stem: str, texts: dict[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in texts.items():
        path = out_dir / f"{stem}.{ext}"
        path.write_text(text)
        paths.append(path)
    return paths


def report_ablation(spec, preset: str, uri: str, out_dir: Path, fig_dir: Optional[Path] = None,
                    echo: Callable[[str], None] = print) -> list[Path]:
    """``table{N}.{md,csv,tex}`` for one spec; the Markdown ends with :func:`explain_sections` and
    ``table{N}_classes.csv`` holds its per-class table (figures in ``fig_dir`` when given)."""
    from cac.exp.results import collect, matched_runs, versions_note

    runs = matched_runs(spec, preset, uri)
    results = collect(spec, preset, uri, runs=runs)
    table = build_ablation(spec, results, preset, notes=_ignored_note(spec, preset, uri, results) + versions_note(runs))
    stem = table_number(spec.name)
    extra, classes_csv, figures = explain_sections(spec, preset, uri, fig_dir, echo)
    texts = {"md": ablation_markdown(table, uri) + extra, "csv": ablation_csv(table), "tex": ablation_latex(table)}
    paths = _write(out_dir, stem, texts) + figures
    if classes_csv:
        paths += _write(out_dir, f"{stem}_classes", {"csv": classes_csv})
    return paths


def _class_tables(uri: str, runs: dict, name: str, column: str) -> dict[int, dict[str, float]]:
    """``{seed: {class: value}}`` from each run's logged per-class CSV (runs without it left out)."""
    from analysis.figures import read_class_table, run_artifact_text

    out = {}
    for seed, run in sorted(runs.items()):
        text = run_artifact_text(uri, run, name)
        if text is not None:
            out[seed] = read_class_table(text, column)
    return out


def explain_sections(spec, preset: str, uri: str, fig_dir: Optional[Path] = None,
                     echo: Callable[[str], None] = print) -> tuple[str, str, list[Path]]:
    """The report's evidence on where and how CAC helps, from the runs' logged per-class IoU tables,
    calibration bins and metrics: ``(Markdown, per-class CSV, figure files)``.

    Per class: the full-CAC row against the spec's baseline (test-time output, ``per_class_iou.csv``)
    and p_p against p within the full-CAC row's runs (``per_class_iou_classifiers.csv``), each the
    mean over seeds of per-seed differences with a paired 95% CI, beside the class's share of train
    pixels; the calibration and changed-pixel metrics of every row; a reliability diagram."""
    import json

    from analysis.figures import (full_cac_row, matched_runs, plot_class_deltas, plot_reliability, pool_reliability,
                                  run_artifact_text, run_config, save_figure, train_pixel_frequency)
    from analysis.tables import (EXPLAIN_METRICS, class_delta_csv, class_delta_markdown, explain_metrics_markdown,
                                 per_class_deltas)

    runs = matched_runs(spec, preset, uri)
    metrics = {m: {label: {s: r.data.metrics[m] for s, r in seeds.items() if m in r.data.metrics}
                   for label, seeds in runs.items()} for m, _ in EXPLAIN_METRICS}
    if not any(v for per_row in metrics.values() for v in per_row.values()):
        return "", "", []  # runs from before these measures were logged: nothing to add
    parts = ["", "## Where and how CAC helps (measured on these runs)", "", explain_metrics_markdown(spec, metrics, preset)]
    base = spec.baseline if spec.baseline and runs.get(spec.baseline) else None
    full = full_cac_row(spec, [label for label, seeds in runs.items() if seeds and label != base])
    sections: dict = {}
    if full is not None:
        if base is not None:
            row_iou = _class_tables(uri, runs[full.label], "per_class_iou.csv", "iou")
            base_iou = _class_tables(uri, runs[base], "per_class_iou.csv", "iou")
            sections[f"{full.label} vs baseline {base}"] = (row_iou, base_iou, (
                f"Per-class IoU (test-time output) of {full.label} ({full.description}) minus the baseline "
                f"{base}'s, per seed, then the mean over seeds with a paired 95% t-interval; sorted, largest first."))
        pp = _class_tables(uri, runs[full.label], "per_class_iou_classifiers.csv", "iou_pp")
        p = _class_tables(uri, runs[full.label], "per_class_iou_classifiers.csv", "iou_p")
        sections[f"p_p vs p within {full.label}"] = (pp, p, (
            f"Per-class IoU of the context-aware classifier p_p minus the original classifier p on the same "
            f"features, within each run of {full.label}; mean over seeds with a paired 95% t-interval."))
    deltas: dict = {}
    classes = next((list(t[s]) for t, _, _ in sections.values() for s in t), [])
    if classes:
        try:
            frequency = train_pixel_frequency(run_config(uri, next(iter(runs[full.label].values()))))
        except (FileNotFoundError, OSError, KeyError) as err:
            echo(f"  train pixel shares for {spec.name}: unknown ({type(err).__name__}: {err})")
            frequency = {}
        for name, (row_iou, base_iou, what) in sections.items():
            deltas[name] = per_class_deltas(row_iou, base_iou, frequency, classes)
            parts.append(class_delta_markdown(f"Per class: {name}", deltas[name], what))
    paths: list[Path] = []
    if fig_dir is not None and deltas:
        paths += save_figure(plot_class_deltas(deltas, f"{spec.name} (preset {preset}): Δ IoU per class against "
                                                        f"its share of train pixels"),
                             fig_dir / f"class_delta_{spec.name}_{preset}")
        parts.append(f"![per-class Δ IoU against train pixel share](figures/class_delta_{spec.name}_{preset}.png)\n")
    curves: dict = {}
    for label, short in ([(base, "p")] if base else []) + ([(full.label, "p"), (full.label, "pp")] if full else []):
        tables = [json.loads(t)[short]["bins"] for t in (run_artifact_text(uri, r, "calibration.json")
                                                         for r in runs[label].values()) if t and short in json.loads(t)]
        if tables:
            curves[f"{label} {'p_p' if short == 'pp' else 'p'} ({len(tables)} runs)"] = pool_reliability(tables)
    if fig_dir is not None and curves:
        paths += save_figure(plot_reliability(curves, f"{spec.name} (preset {preset}): reliability on val, bins pooled "
                                                       f"over seeds"), fig_dir / f"reliability_{spec.name}_{preset}")
        parts.append(f"![reliability diagram](figures/reliability_{spec.name}_{preset}.png)\n")
    return "\n".join(parts), class_delta_csv(deltas) if deltas else "", paths


def report_table6(spec, preset: str, uri: str, out_dir: Path) -> list[Path]:
    """``table6.{md,csv,tex}`` from the newest tracked benchmark run of each row and size."""
    from cac.bench.table6 import tracked_results
    from cac.exp.tracking import find_runs

    from analysis.tables import build_table6, table6_csv, table6_latex, table6_markdown

    results, models = tracked_results(spec, preset, uri)
    notes = []
    runs = find_runs(uri, spec.name, {"preset": preset, "task": "benchmark"}, statuses=["FINISHED"])
    devices = sorted({r.data.tags.get("device", "") for r in runs} - {""})
    methods = sorted({r.data.tags.get("mem_method", "") for r in runs} - {""})
    if devices:
        notes.append(f"Measured on {', '.join(devices)}" + (f"; Mem: {'; '.join(methods)}." if methods else "."))
    if not results:
        notes.append(f"No tracked benchmark runs at preset `{preset}`: "
                     f"`cac-exp run {spec.path.name} --preset {preset}` makes them.")
    table = build_table6(spec, results, models, preset, notes)
    return _write(out_dir, table_number(spec.name), {"md": table6_markdown(table, uri), "csv": table6_csv(table),
                                                     "tex": table6_latex(table)})


def _count_params(spec, preset: str) -> dict[str, float]:
    from cac.exp.param_counts import count_spec_params

    return {r["row"]: r["params"] / 1e6 for r in count_spec_params(str(spec.path), preset)}


def report_table1(specs: Sequence, preset: str, uri: str, out_dir: Path, params: bool = False) -> list[Path]:
    """``table1.{md,csv,tex}`` from the Table 1 specs (one per dataset)."""
    from cac.exp.results import collect, collect_evaluations

    parts, notes = [], []
    for spec in specs:
        ss, ms = collect(spec, preset, uri), collect(spec, preset, uri, "val/mIoU_ms")
        notes += _ignored_note(spec, preset, uri, ss)
        # rows nobody trained here may have evaluated checkpoints (e.g. the official releases)
        ev_ss, ev_ms = collect_evaluations(spec, preset, uri), collect_evaluations(spec, preset, uri, "val/mIoU_ms")
        from_eval = [label for label in ev_ss if not ss.get(label)]
        for label in from_eval:
            ss[label] = ev_ss[label]
            ms[label] = ms.get(label) or ev_ms.get(label, {})
        if from_eval:
            notes.append(f"{DATASET_NAMES.get(spec.dataset, spec.dataset)}: rows from evaluated checkpoints "
                         f"(`cac-exp eval`, no training run): {', '.join(from_eval)}.")
        parts.append((spec, ss, ms))
    swapped = sorted({spec.model_for(r, preset) for spec in specs for r in spec.rows
                      if spec.model_for(r, preset) != paper_model(r)})
    if swapped:
        notes.append(f"At preset `{preset}` the rows train {', '.join(f'`{m}`' for m in swapped)} in place of the "
                     "listed models (Head / Backbone name the paper's model).")
    counts = None
    if params:
        # The column sits beside the paper's count of the paper's models, so count those (paper preset,
        # the spec's data set's classes), whatever preset the mIoU columns come from.
        counts = _count_params(specs[0], "paper")
        notes.append(f"#params ours: counted from the resolved paper-preset configs of `{specs[0].name}` "
                     f"({DATASET_NAMES.get(specs[0].dataset, specs[0].dataset)} classes).")
    table = build_table1(parts, preset, counts, notes)
    return _write(out_dir, "table1", {"md": table1_markdown(table, uri), "csv": table1_csv(table),
                                      "tex": table1_latex(table)})


def report_figures(spec, preset: str, uri: str, fig_dir: Path, images: int = 4, tsne: bool = False,
                   echo: Callable[[str], None] = print) -> list[Path]:
    """Fig. 4 and Fig. 6 (and optionally the t-SNE) for a spec; a figure that cannot be made is
    reported and skipped, so one missing checkpoint does not stop the tables."""
    return _report_figures(spec, preset, uri, fig_dir, images, tsne, echo)[0]


def _report_figures(spec, preset: str, uri: str, fig_dir: Path, images: int, tsne: bool,
                    echo: Callable[[str], None]) -> tuple[list[Path], list[str]]:
    """``report_figures`` and the names of the figures it skipped."""
    from analysis.figures import masks_figure, matched_runs, oracle_curves_figure

    runs = matched_runs(spec, preset, uri)
    paths: list[Path] = []
    skipped: list[str] = []
    makers: list[tuple[str, str, Callable[[], list[Path]]]] = [
        ("oracle curves", "no +CAC row with runs that log p_y",
         lambda: oracle_curves_figure(spec, preset, uri, fig_dir, runs)),
        ("masks", "needs a baseline row and a +CAC row with runs of a common seed",
         lambda: masks_figure(spec, preset, uri, fig_dir, images, runs))]
    if tsne:
        makers.append(("t-SNE", "no FINISHED +CAC run with a context-aware classifier",
                       lambda: _tsne(spec, preset, uri, fig_dir, images)))
    if table_number(spec.name) == "table1":
        makers.append(("Fig. 2", "no model with runs of both its rows",
                       lambda: _fig2(spec, preset, uri, fig_dir)))
    for name, why, make in makers:
        try:
            made = make()
        except Exception as err:  # noqa: BLE001 - a figure is optional; say why it is missing
            echo(f"  {name} for {spec.name}: skipped ({type(err).__name__}: {err})")
            skipped.append(name)
            continue
        if not made:
            echo(f"  {name} for {spec.name}: skipped ({why})")
            skipped.append(name)
        paths += made
    return paths, skipped


def _fig2(spec, preset: str, uri: str, fig_dir: Path) -> list[Path]:
    """Fig. 2 (mIoU against #params and time) of a Table 1 spec; time from the speed spec's runs."""
    from cac.exp.spec import REPO, load_spec

    from analysis.efficiency import SPEED_SPEC, fig2_figure

    speed = REPO / "experiments" / f"{SPEED_SPEC}.yaml"
    return fig2_figure(spec, preset, uri, fig_dir, load_spec(speed) if speed.is_file() else None)


def _tsne(spec, preset: str, uri: str, fig_dir: Path, images: int) -> list[Path]:
    from tsne.make_tsne import make_tsne, pick_run

    run = pick_run(uri, spec, preset)
    return [] if run is None else make_tsne(uri, run, fig_dir, images)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri")
    p.add_argument("--spec", action="append",
                   help="a spec stem (table3, table1_ade20k) or path; repeatable; default: every spec with runs")
    p.add_argument("--preset", default="quick")
    p.add_argument("--out", default="reports")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--params", action="store_true", help="count Table 1 #params (slow: builds every model)")
    p.add_argument("--tsne", nargs="*", metavar="SPEC",
                   help="also the t-SNE figures (tsne/make_tsne.py): of every reported spec, or of the named ones")
    p.add_argument("--images", type=int, default=4, help="val images in the mask and t-SNE figures")
    p.add_argument("--model", metavar="NAME|PATH",
                   help="report the runs of this base model (as given to `cac-exp run --model`)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """The command; a bad spec, preset or tracking store is one line on stderr and exit code 2."""
    from cac.errors import CacError

    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (FileNotFoundError, CacError) as err:  # one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from cac.errors import CacError
    from cac.exp.spec import load_spec
    from cac.exp.tracking import check_tracking_uri, resolve_tracking_uri
    from cac.mmseg.presets import get_preset

    uri = resolve_tracking_uri(args.tracking_uri)
    get_preset(args.preset)
    if args.images < 1:
        raise CacError(f"--images must be >= 1, got {args.images}")
    out = Path(args.out)
    explicit = bool(args.spec)
    specs = [load_spec(find_spec(s)) for s in args.spec] if explicit else [load_spec(p) for p in spec_files()]
    specs = [s for s in specs if s.task in REPORTED_TASKS]
    if args.model:  # the runs `cac-exp run --model` trained: the same specs over that base model
        from cac.exp.options import model_option

        model = model_option(args)
        specs = [s.with_model(model) for s in specs if s.task == "train"]
    tsne_names = set(args.tsne or ())
    unknown = tsne_names - {s.name for s in specs if s.task == "train"}
    if unknown:
        raise CacError(f"--tsne {' '.join(sorted(unknown))}: not a reported training spec "
                       f"(reported: {', '.join(s.name for s in specs if s.task == 'train')})")
    check_tracking_uri(uri)  # after the arguments: a typo in them touches no store
    with_runs = {s.name for s in specs if _finished_count(s, args.preset, uri) > 0 or _has_shared_runs(s, args.preset, uri)}
    for s in specs:
        if s.name not in with_runs:
            print(f"{s.name}: no FINISHED runs at preset {args.preset}" + (" (table written anyway)" if explicit else
                                                                           " (skipped)"))
    chosen = specs if explicit else [s for s in specs if s.name in with_runs]
    if not chosen:
        print(f"nothing to report from {public_url(uri)}")
        return 1
    t0 = time.time()
    table1 = [s for s in chosen if table_number(s.name) == "table1"]
    if table1 and not explicit:  # the paper's layout has both data sets: keep the one without runs as paper-only
        table1 = [s for s in specs if table_number(s.name) == "table1"  # a paper-only column needs paper figures
                  and (s.name in with_runs or any(r.paper is not None for r in s.rows))]
    written: list[Path] = []
    if table1:
        written += report_table1(table1, args.preset, uri, out, params=args.params)
    for spec in (s for s in chosen if table_number(s.name) != "table1"):
        if spec.task == "benchmark":
            written += report_table6(spec, args.preset, uri, out)
        else:
            written += report_ablation(spec, args.preset, uri, out, None if args.no_figures else out / "figures")
    missing = []
    if not args.no_figures:
        for spec in (s for s in chosen if s.name in with_runs and s.task == "train"):
            tsne = args.tsne is not None and (not tsne_names or spec.name in tsne_names)
            paths, skipped = _report_figures(spec, args.preset, uri, out / "figures", args.images, tsne, print)
            written += paths
            if spec.name in tsne_names and "t-SNE" in skipped:
                missing.append(spec.name)
    for path in written:
        print(path)
    print(f"{len(written)} files in {time.time() - t0:.0f}s (tracking {public_url(uri)})")
    missing += sorted(tsne_names - with_runs)
    if missing:
        print(f"error: no t-SNE of {', '.join(missing)} (asked for by --tsne; see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
