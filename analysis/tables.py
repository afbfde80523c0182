"""The paper's tables rebuilt from tracked results: plain data in, Markdown / CSV / LaTeX text out.

Building (``build_ablation``, ``build_table1``) takes the ``{row label: {seed: value}}`` mappings
``cac.exp.results.collect`` returns; ``build_table6`` takes the ``{size: {row: SizeResult}}`` that
``cac.bench.table6.tracked_results`` rebuilds (its Δ% as the benchmark computed and logged them).
Rendering takes the built tables. Nothing here talks to MLflow.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from cac.exp.credentials import public_url
from cac.exp.spec import Row, Spec

from cac.exp.stats import (NO_RUNS, Ordering, PairedCI, Summary, fmt_summary, kendall_ordering, ordering_verdict,
                           paired_ci, paired_differences, summarize)

__all__ = ["AblationRow", "AblationTable", "Table1Row", "Table1", "paper_value", "build_ablation",
           "build_table1", "ablation_markdown", "ablation_csv", "ablation_latex", "table1_markdown",
           "table1_csv", "table1_latex", "Table6Row", "Table6", "build_table6", "table6_markdown", "table6_csv",
           "table6_latex", "fmt_summary", "fmt_delta", "table_number", "paper_model", "tex_escape",
           "EXPLAIN_METRICS", "ClassDelta", "per_class_deltas", "class_delta_markdown", "class_delta_csv",
           "explain_metrics_markdown"]

DATASET_NAMES = {"ade20k": "ADE20K", "cocostuff": "COCO-Stuff 164K", "cityscapes": "Cityscapes",
                 "pascal-context": "Pascal-Context 59"}


# -- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationRow:
    label: str
    description: str
    values: dict[int, float]
    summary: Optional[Summary]
    delta: Optional[PairedCI]  # None for the baseline row and for rows without paired seeds
    is_baseline: bool
    paper: Optional[float]
    paper_delta: Optional[float]
    compare_delta: Optional[PairedCI] = None  # against the spec's ``compare`` row, paired by seed


@dataclass(frozen=True)
class AblationTable:
    name: str
    title: str
    preset: str
    metric: str
    baseline: Optional[str]
    rows: list[AblationRow]
    ordering: Optional[Ordering]
    confidence: float = 0.95
    notes: list[str] = field(default_factory=list)
    compare: Optional[str] = None  # the second reference row (spec ``compare``), if any

    @property
    def verdict(self) -> str:
        return ordering_verdict(self.ordering)


@dataclass(frozen=True)
class Table1Row:
    label: str
    head: str
    backbone: str
    with_cac: bool
    fps_paper: Optional[float]
    params_paper: Optional[float]  # millions
    params_ours: Optional[float]  # millions; None unless counted (--params)
    ss: dict[str, Optional[Summary]]  # dataset -> ours, single scale
    ms: dict[str, Optional[Summary]]  # dataset -> ours, multi scale
    paper_ss: dict[str, Optional[float]]
    paper_ms: dict[str, Optional[float]]


@dataclass(frozen=True)
class Table1:
    preset: str
    datasets: list[str]
    rows: list[Table1Row]
    orderings: dict[str, Optional[Ordering]]  # dataset -> s.s. ordering vs paper
    notes: list[str] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        return [ordering_verdict(self.orderings[d], f"{DATASET_NAMES.get(d, d)} s.s. ordering vs paper")
                for d in self.datasets]


# -- building --------------------------------------------------------------------------------------
def paper_value(row: Row, key: str = "ss") -> Optional[float]:
    """The paper's figure of a row: the number itself, or ``paper[key]`` for Table 1 style rows."""
    if isinstance(row.paper, Mapping):
        value = row.paper.get(key)
    else:
        value = row.paper if key == "ss" else None
    return None if value is None else float(value)


def table_number(spec_name: str) -> str:
    """``table3`` -> ``table3``; ``table1_ade20k`` -> ``table1``: the report file stem."""
    return spec_name.split("_")[0]


def build_ablation(spec: Spec, results: Mapping[str, Mapping[int, float]], preset: str,
                   metric: str = "val/mIoU", confidence: float = 0.95,
                   notes: Sequence[str] = ()) -> AblationTable:
    """One row per spec row (in spec order), Δ paired by seed against ``spec.baseline``."""
    base, compare = spec.baseline, spec.compare
    base_values = dict(results.get(base, {})) if base else {}
    compare_values = dict(results.get(compare, {})) if compare else {}
    base_paper = paper_value(spec.row(base)) if base else None
    rows = []
    for row in spec.rows_for(preset):
        values = dict(results.get(row.label, {}))
        is_base = row.label == base
        delta = compare_delta = None
        if base and not is_base and values:
            delta = paired_ci(paired_differences(values, base_values), confidence)
        if compare and row.label != compare and values:
            compare_delta = paired_ci(paired_differences(values, compare_values), confidence)
        paper = paper_value(row)
        paper_delta = None if (paper is None or base_paper is None or not base) else paper - base_paper
        rows.append(AblationRow(row.label, row.description, values,
                                summarize([values[s] for s in sorted(values)]), delta, is_base, paper,
                                paper_delta, compare_delta))
    ordering = kendall_ordering({r.label: r.summary.mean for r in rows if r.summary},
                                {r.label: r.paper for r in rows if r.paper is not None})
    return AblationTable(spec.name, spec.title, preset, metric, base, rows, ordering, confidence, list(notes),
                         compare)


def build_table1(parts: Sequence[tuple[Spec, Mapping, Mapping]], preset: str,
                 params: Optional[Mapping[str, float]] = None, notes: Sequence[str] = ()) -> Table1:
    """Table 1 from ``(spec, s.s. results, m.s. results)`` per dataset; rows matched by label.

    ``params`` maps a row label to our parameter count in millions (counted only on request).
    """
    from cac.mmseg.zoo import MODELS

    datasets = [spec.dataset for spec, _, _ in parts]
    labels: list[str] = []
    by_label: dict[str, Row] = {}
    for spec, _, _ in parts:
        for row in spec.rows:
            if row.label not in by_label:
                labels.append(row.label)
                by_label[row.label] = row
    rows = []
    for label in labels:
        row = by_label[label]
        model = paper_model(row)
        entry = MODELS.get(model)
        ss, ms, pss, pms = {}, {}, {}, {}
        for spec, res_ss, res_ms in parts:
            d = spec.dataset
            srow = next((r for r in spec.rows if r.label == label), None)
            vals_ss, vals_ms = res_ss.get(label, {}), res_ms.get(label, {})
            ss[d] = summarize([vals_ss[s] for s in sorted(vals_ss)])
            ms[d] = summarize([vals_ms[s] for s in sorted(vals_ms)])
            pss[d] = paper_value(srow, "ss") if srow else None
            pms[d] = paper_value(srow, "ms") if srow else None
        rows.append(Table1Row(label, entry.head if entry else model, entry.backbone if entry else "",
                              row.cac is not None, paper_value(row, "fps"), paper_value(row, "params"),
                              (params or {}).get(label), ss, ms, pss, pms))
    orderings = {d: kendall_ordering({r.label: r.ss[d].mean for r in rows if r.ss.get(d)},
                                     {r.label: r.paper_ss[d] for r in rows if r.paper_ss.get(d) is not None})
                 for d in datasets}
    return Table1(preset, datasets, rows, orderings, list(notes))


def paper_model(row: Row) -> str:
    """The model the paper's Table 1 row names (Head / Backbone come from its zoo entry)."""
    if isinstance(row.model, Mapping):
        return row.model.get("paper") or next(iter(row.model.values()))
    return row.model


# -- cell formatting -------------------------------------------------------------------------------
def _num(value: Optional[float], signed: bool = False, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_delta(row: AblationRow, confidence: float = 0.95) -> str:
    """``+0.52 [-0.10, +1.14] (3 pairs)``; ``n/a`` where fewer than 2 seeds pair with the baseline."""
    if row.is_baseline:
        return "baseline"
    return _fmt_ci(row, row.delta)


def _fmt_ci(row: AblationRow, d: Optional[PairedCI]) -> str:
    if row.summary is None:
        return "—"
    if d is None:
        return "n/a (0 pairs)"
    if not d.has_interval:
        return f"{_num(d.mean, True)} (CI n/a, {d.n_pairs} pair)"
    return f"{_num(d.mean, True)} [{_num(d.low, True)}, {_num(d.high, True)}] ({d.n_pairs} pairs)"


def _paper_delta(row: AblationRow) -> str:
    return "baseline" if row.is_baseline else _num(row.paper_delta, True)


def _comparability(preset: str, what: str = " and the signs of Δ") -> Optional[str]:
    if preset == "paper":
        return None
    return (f"The paper's figures are UperNet + Swin-T on ADE20K; ours at preset `{preset}` come from a "
            f"smaller model on other data, so compare orderings{what}, not the levels.")


# -- Markdown --------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def ablation_markdown(table: AblationTable, tracking_uri: str = "") -> str:
    pct = round(table.confidence * 100)
    base = table.baseline
    lines = [f"# {table.title}", "",
             f"Ours: `{table.metric}` (%) at preset `{table.preset}`, mean ± sample std over seeds (n)."
             + (f" Tracking: `{public_url(tracking_uri)}`." if tracking_uri else "")]
    if base:
        lines.append(f"Δ: row − baseline {base}, the mean of per-seed differences over the seeds both rows "
                     f"have, with a {pct}% t-interval (n/a with fewer than 2 pairs).")
    note = _comparability(table.preset)
    if note:
        lines.append(note)
    if table.compare:
        lines.append(f"Δ vs {table.compare}: the same, paired against row {table.compare}.")
    extra = f" Δ vs {table.compare} [{pct}% CI] |" if table.compare else ""
    lines += ["", f"| Row | Description | Ours mIoU | Δ vs {base or '—'} [{pct}% CI] |{extra} Paper mIoU | Paper Δ |",
              "|---|---|---|---|" + ("---|" if table.compare else "") + "---|---|"]
    for r in table.rows:
        cmp = ""
        if table.compare:
            cmp = f" {'reference' if r.label == table.compare else _fmt_ci(r, r.compare_delta)} |"
        lines.append(f"| {r.label} | {_md_escape(r.description)} | {fmt_summary(r.summary)} | "
                     f"{fmt_delta(r, table.confidence)} |{cmp} {_num(r.paper)} | {_paper_delta(r)} |")
    lines += ["", table.verdict[0].upper() + table.verdict[1:] + "."]
    lines += [f"\n{n}" for n in table.notes]
    return "\n".join(lines) + "\n"


def table1_markdown(table: Table1, tracking_uri: str = "") -> str:
    lines = ["# Table 1: Performance comparison (s.s. / m.s. mIoU, %)", "",
             f"Ours at preset `{table.preset}` (mean ± sample std over seeds, n); s.s. is `val/mIoU`, m.s. "
             "`val/mIoU_ms` where it was evaluated (— where not). fps is the paper's (RTX 2080Ti, 512×512); "
             "#params in millions." + (f" Tracking: `{public_url(tracking_uri)}`." if tracking_uri else "")]
    note = _comparability(table.preset, " and the gains of + Ours")
    if note:
        lines.append(note.replace("UperNet + Swin-T on ADE20K", "the listed models on ADE20K / COCO-Stuff"))
    head = ["Head", "Backbone", "fps (paper)", "#params ours", "#params paper"]
    for d in table.datasets:
        name = DATASET_NAMES.get(d, d)
        head += [f"{name} s.s. ours", f"{name} s.s. paper", f"{name} m.s. ours", f"{name} m.s. paper"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [("+ Ours" if r.with_cac else r.head), r.backbone, _num(r.fps_paper),
                 _num(r.params_ours) + ("M" if r.params_ours is not None else ""),
                 _num(r.params_paper) + ("M" if r.params_paper is not None else "")]
        for d in table.datasets:
            cells += [fmt_summary(r.ss[d]), _num(r.paper_ss[d]),
                      "—" if r.ss[d] is not None and r.ms[d] is None else fmt_summary(r.ms[d]), _num(r.paper_ms[d])]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines.append("")
    lines += [v[0].upper() + v[1:] + "." for v in table.verdicts]
    lines += [f"\n{n}" for n in table.notes]
    return "\n".join(lines) + "\n"


# -- CSV -------------------------------------------------------------------------------------------
def _csv_num(value: Optional[float]) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


def ablation_csv(table: AblationTable) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    extra = ["compare_delta", "compare_ci_low", "compare_ci_high", "compare_n_pairs"] if table.compare else []
    w.writerow(["row", "description", "status", "n", "seeds", "mean", "std", "delta", "delta_ci_low",
                "delta_ci_high", "n_pairs", "paper", "paper_delta", "is_baseline"] + extra)
    for r in table.rows:
        s, d, c = r.summary, r.delta, r.compare_delta
        cells = [_csv_num(c.mean if c else None), _csv_num(c.low if c else None), _csv_num(c.high if c else None),
                 c.n_pairs if c else 0] if table.compare else []
        w.writerow([r.label, r.description, "ok" if s else NO_RUNS, s.n if s else 0,
                    " ".join(str(k) for k in sorted(r.values)), _csv_num(s.mean if s else None),
                    _csv_num(s.std if s else None), _csv_num(d.mean if d else None),
                    _csv_num(d.low if d else None), _csv_num(d.high if d else None), d.n_pairs if d else 0,
                    _csv_num(r.paper), _csv_num(r.paper_delta), int(r.is_baseline)] + cells)
    return out.getvalue()


def table1_csv(table: Table1) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["row", "head", "backbone", "cac", "dataset", "status", "n", "ss_mean", "ss_std", "ms_mean",
                "ms_std", "paper_ss", "paper_ms", "fps_paper", "params_ours_m", "params_paper_m"])
    for r in table.rows:
        for d in table.datasets:
            ss, ms = r.ss[d], r.ms[d]
            w.writerow([r.label, r.head, r.backbone, int(r.with_cac), d, "ok" if ss else NO_RUNS,
                        ss.n if ss else 0, _csv_num(ss.mean if ss else None), _csv_num(ss.std if ss else None),
                        _csv_num(ms.mean if ms else None), _csv_num(ms.std if ms else None),
                        _csv_num(r.paper_ss[d]), _csv_num(r.paper_ms[d]), _csv_num(r.fps_paper),
                        _csv_num(r.params_ours), _csv_num(r.params_paper)])
    return out.getvalue()


# -- LaTeX -----------------------------------------------------------------------------------------
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


# Symbols the specs and verdicts use, as math so that pdflatex needs no Unicode setup.
_TEX_SYMBOLS = {"±": r"$\pm$", "—": "--", "−": "-", "τ": r"$\tau$", "θ": r"$\theta$", "⊕": r"$\oplus$",
                "Δ": r"$\Delta$", "†": r"$^\dagger$", "×": r"$\times$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch) or _TEX_SYMBOLS.get(ch, ch) for ch in text)


def ablation_latex(table: AblationTable) -> str:
    pct = round(table.confidence * 100)
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{tex_escape(table.title)} (ours: preset {tex_escape(table.preset)}; "
             rf"$\Delta$ vs {tex_escape(table.baseline or '--')} paired by seed, {pct}\% t-interval)}}",
             r"\begin{tabular}{llllrr}", r"\toprule",
             rf"Row & Description & Ours & $\Delta$ [{pct}\% CI] & Paper & Paper $\Delta$ \\", r"\midrule"]
    for r in table.rows:
        cells = [r.label, r.description, fmt_summary(r.summary), fmt_delta(r, table.confidence), _num(r.paper),
                 _paper_delta(r)]
        lines.append(" & ".join(tex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\par\smallskip\footnotesize {tex_escape(table.verdict)}.",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def table1_latex(table: Table1) -> str:
    n = len(table.datasets)
    lines = [r"\begin{table*}[t]", r"\centering",
             rf"\caption{{Table 1 (ours: preset {tex_escape(table.preset)}; fps is the paper's)}}",
             r"\begin{tabular}{llrrr" + "llll" * n + "}", r"\toprule"]
    top = ["", "", "", "", ""] + [rf"\multicolumn{{4}}{{c}}{{{tex_escape(DATASET_NAMES.get(d, d))}}}"
                                  for d in table.datasets]
    lines.append(" & ".join(top) + r" \\")
    sub = ["Head", "Backbone", "fps", "#params ours", "#params paper"] + ["s.s. ours", "s.s. paper",
                                                                        "m.s. ours", "m.s. paper"] * n
    lines += [" & ".join(tex_escape(c) for c in sub) + r" \\", r"\midrule"]
    for r in table.rows:
        cells = [("+ Ours" if r.with_cac else r.head), r.backbone, _num(r.fps_paper), _num(r.params_ours),
                 _num(r.params_paper)]
        for d in table.datasets:
            cells += [fmt_summary(r.ss[d]), _num(r.paper_ss[d]),
                      "—" if r.ss[d] is not None and r.ms[d] is None else fmt_summary(r.ms[d]), _num(r.paper_ms[d])]
        lines.append(" & ".join(tex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {tex_escape(v)}." for v in table.verdicts]
    lines.append(r"\end{table*}")
    return "\n".join(lines) + "\n"


# -- Table 6: inference speed and memory ------------------------------------------------------------
Pair = tuple[Optional[float], Optional[float]]  # (fps, Mem MB) of a row, or (fps Δ%, Mem Δ%) of a Δ row


@dataclass(frozen=True)
class Table6Row:
    """One line of Table 6 at every size: ours and the paper's (``None`` where there is none)."""

    label: str
    is_delta: bool
    ours: dict[int, Pair]
    paper: dict[int, Pair]


@dataclass(frozen=True)
class Table6:
    title: str
    preset: str
    model: str  # our model ("" when the rows ran different models)
    sizes: list[int]  # the columns: the sizes we measured, and the paper's when it is the paper's model
    measured: list[int]
    rows: list[Table6Row]
    with_paper: bool
    checks: list[str] = field(default_factory=list)  # the benchmark's cross-checks, as sentences
    notes: list[str] = field(default_factory=list)


def build_table6(spec: Spec, results: Mapping[int, Mapping], models: Mapping[str, str], preset: str,
                 notes: Sequence[str] = ()) -> Table6:
    """Table 6 from ``cac.bench.table6.tracked_results``: a row per spec row with runs, then a Δ row
    per non-baseline row, each size's fps and Mem beside the paper's (for the paper's model).

    Every number is one the benchmark logged; nothing is recomputed here.
    """
    from cac.bench.models import baseline_label, bench_model_name
    from cac.bench.table6 import BUSY_CORES, PAPER_MODEL, PAPER_TABLE6, PAPER_TABLE6_DELTA

    rows = [r for r in spec.rows if r.label in models] or list(spec.rows)
    base = baseline_label(spec, rows)
    names = sorted(set(models.values()))
    model = names[0] if len(names) == 1 else ("" if names else bench_model_name(spec, rows[0], preset))
    with_paper = model == PAPER_MODEL
    measured = sorted(results)
    sizes = sorted(set(measured) | (set(PAPER_TABLE6) if with_paper else set()))

    def paper_pair(size: int, label: str) -> Pair:
        fig = PAPER_TABLE6.get(size, {}).get(label) if with_paper else None
        return (fig[0], fig[1]) if fig else (None, None)

    out = []
    for row in rows:
        ours = {}
        for s in sizes:
            res = results.get(s, {}).get(row.label)
            ours[s] = (res.fps, res.mem_mb) if res is not None else (None, None)
        out.append(Table6Row(row.label, False, ours, {s: paper_pair(s, row.label) for s in sizes}))
    checks = []
    for row in (r for r in rows if r.label != base and base is not None):
        ours, texts = {}, []
        for s in sizes:
            res = results.get(s, {}).get(row.label)
            d = res.delta if res is not None else {}
            ours[s] = (d.get("fps_delta_pct"), d.get("mem_delta_pct"))
            if "fps_delta_paired_pct" in d:
                text = f"{s}×{s}: paired Δfps {d['fps_delta_paired_pct']:+.2f}%"
                if res.classifier is not None and "fps_delta_from_classifier_pct" in d:
                    c = res.classifier
                    text += (f"; CAC's classifier {c['cac_classifier_ms']:.1f} ms vs the head's conv_seg "
                             f"{c['conv_seg_ms']:.1f} ms, i.e. Δfps {d['fps_delta_from_classifier_pct']:+.2f}%")
                texts.append(text)
        paper = {s: (PAPER_TABLE6_DELTA[s] if with_paper and s in PAPER_TABLE6_DELTA else (None, None))
                 for s in sizes}
        others = [r for r in rows if r.label != base]
        out.append(Table6Row("Δ" if len(others) == 1 else f"Δ {row.label}", True, ours, paper))
        if texts:
            checks.append(f"Cross-checks of {row.label}: " + "; ".join(texts) + ".")
    busy = {s: max(r.stats.get("foreign_cores", 0.0) for r in results[s].values()) for s in measured}
    busy = {s: c for s, c in busy.items() if c > BUSY_CORES}
    extra = list(notes)
    if busy:
        extra.append("Other processes used " + ", ".join(f"{c:.2f} cores at {s}×{s}" for s, c in busy.items())
                     + " during the timing: rerun on a quiet machine before trusting the Δ.")
    noisy = []
    for s in measured:  # a Δfps inside the timing noise says nothing about CAC's cost
        spread = max((r.stats.get("time_spread_pct", 0.0) for r in results[s].values()), default=0.0)
        deltas = [abs(r.delta["fps_delta_pct"]) for r in results[s].values() if "fps_delta_pct" in r.delta]
        if deltas and spread > min(deltas):
            noisy.append(f"{s}×{s} (spread up to {spread:.1f}%)")
    if noisy:
        extra.append("The timing spread (IQR / median of the repetitions) exceeds |Δ fps| at " + ", ".join(noisy)
                     + ": that Δ fps is within the noise; more repetitions (preset `bench` or `paper`) narrow it.")
    return Table6(spec.title, preset, model, sizes, measured, out, with_paper, checks, extra)


def _t6_cells(row: Table6Row, size: int, with_paper: bool) -> list[str]:
    """``fps, [fps paper,] Mem, [Mem paper]`` of one row at one size."""
    (fps, mem), (pfps, pmem) = row.ours[size], row.paper[size]
    if row.is_delta:
        ours_fps, ours_mem = _pct(fps), _pct(mem)
        paper_fps, paper_mem = _pct(pfps), _pct(pmem)
    else:
        ours_fps, ours_mem = _num(fps, digits=3), _num(mem, digits=1)
        paper_fps, paper_mem = _num(pfps), _num(pmem, digits=0)
    return [ours_fps, paper_fps, ours_mem, paper_mem] if with_paper else [ours_fps, ours_mem]


def _pct(value: Optional[float]) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:+.2f}%"


def _t6_heads(table: Table6) -> list[str]:
    heads = ["Model"]
    for s in table.sizes:
        heads += ([f"{s}×{s} fps", f"{s}×{s} fps (paper)", f"{s}×{s} Mem", f"{s}×{s} Mem (paper)"]
                  if table.with_paper else [f"{s}×{s} fps", f"{s}×{s} Mem"])
    return heads


def table6_markdown(table: Table6, tracking_uri: str = "") -> str:
    """Table 6's layout: fps and Mem (MB) per size for each row, then Δ% against the baseline."""
    lines = [f"# {table.title}", "",
             f"Ours: `{table.model or 'several models'}` at preset `{table.preset}`, the newest FINISHED benchmark "
             "run of each row at each size. fps: images/s from the median time of the interleaved repetitions; "
             "Mem: MB; Δ: relative change against the baseline row, as the benchmark logged it."
             + (f" Tracking: `{public_url(tracking_uri)}`." if tracking_uri else "")]
    if table.with_paper:
        lines.append("Paper: UperNet + Swin-T on one RTX 2080Ti (GPU memory). Ours come from another machine "
                     "and, on a CPU, another memory measure, so compare the Δ row (the cost of CAC), not the levels.")
    unmeasured = [s for s in table.sizes if s not in table.measured]
    if unmeasured:
        lines.append(f"Not measured at preset `{table.preset}`: "
                     + ", ".join(f"{s}×{s}" for s in unmeasured)
                     + " (— in ours; the spec's `presets:` set each preset's sizes, `paper` measures all three).")
    heads = _t6_heads(table)
    lines += ["", "| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for row in table.rows:
        cells = [row.label]
        for s in table.sizes:
            cells += _t6_cells(row, s, table.with_paper)
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines += [""] + table.checks if table.checks else []
    lines += [f"\n{n}" for n in table.notes]
    return "\n".join(lines) + "\n"


def table6_csv(table: Table6) -> str:
    """One line per row and size: ours and the paper's (Δ rows hold percentages)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["row", "is_delta", "size", "measured", "fps", "mem_mb", "paper_fps", "paper_mem_mb", "model",
                "preset"])
    for row in table.rows:
        for s in table.sizes:
            (fps, mem), (pfps, pmem) = row.ours[s], row.paper[s]
            w.writerow([row.label, int(row.is_delta), s, int(s in table.measured), _csv_num(fps), _csv_num(mem),
                        _csv_num(pfps), _csv_num(pmem), table.model, table.preset])
    return out.getvalue()


def table6_latex(table: Table6) -> str:
    per = 4 if table.with_paper else 2
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{tex_escape(table.title)} (ours: {tex_escape(table.model or 'several models')}, preset "
             rf"{tex_escape(table.preset)}" + ("; paper: RTX 2080Ti" if table.with_paper else "") + ")}",
             r"\begin{tabular}{l" + "r" * per * len(table.sizes) + "}", r"\toprule",
             " & ".join([""] + [rf"\multicolumn{{{per}}}{{c}}{{${s} \times {s}$}}" for s in table.sizes]) + r" \\",
             " & ".join(["Model"] + (["fps", "fps (paper)", "Mem", "Mem (paper)"] if table.with_paper
                                     else ["fps", "Mem"]) * len(table.sizes)) + r" \\", r"\midrule"]
    for row in table.rows:
        cells = [row.label]
        for s in table.sizes:
            cells += _t6_cells(row, s, table.with_paper)
        lines.append(" & ".join(tex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- where CAC helps, per class; what the context changes; calibration --------------------------------
EXPLAIN_METRICS = (("val/ece_p", "ECE p"), ("val/ece_pp", "ECE p_p"), ("val/changed_pixels", "changed"),
                   ("val/fixed_by_pp", "fixed by p_p"), ("val/broken_by_pp", "broken by p_p"))


@dataclass(frozen=True)
class ClassDelta:
    """One class: its share of the train pixels (%, None when unknown) and the mean over seeds of a
    per-class IoU difference (points of IoU, %) with its paired t-interval."""

    name: str
    frequency: Optional[float]
    delta: Optional[PairedCI]


def per_class_deltas(row: Mapping[int, Mapping[str, float]], base: Mapping[int, Mapping[str, float]],
                     frequency: Mapping[str, float], classes: Sequence[str],
                     confidence: float = 0.95) -> list[ClassDelta]:
    """``row[s][k] - base[s][k]`` per class ``k`` over the seeds ``s`` both have a finite IoU for,
    mean and paired CI (:func:`cac.exp.stats.paired_ci`), sorted by the mean difference, largest
    first (classes without a pair last)."""
    out = []
    for k in classes:
        mine = {s: v[k] for s, v in row.items() if _finite(v.get(k))}
        theirs = {s: v[k] for s, v in base.items() if _finite(v.get(k))}
        diffs = paired_differences(mine, theirs)
        out.append(ClassDelta(k, frequency.get(k), paired_ci(diffs, confidence) if diffs else None))
    return sorted(out, key=lambda d: (d.delta is None, -(d.delta.mean if d.delta else 0.0), d.name))


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(float(value))


def _ci_text(ci: Optional[PairedCI]) -> str:
    if ci is None:
        return "no pairs"
    text = f"{ci.mean:+.2f}"
    return text + (f" [{ci.low:+.2f}, {ci.high:+.2f}]" if ci.has_interval else " (n/a: 1 pair)") + f" ({ci.n_pairs})"


def class_delta_markdown(title: str, deltas: Sequence[ClassDelta], what: str) -> str:
    """A Markdown section: class, train pixel share, Δ IoU [95% CI] (pairs), sorted as given."""
    lines = [f"### {title}", "", what, "", "| Class | Train pixels (%) | Δ IoU [95% CI] (pairs) |", "|---|---|---|"]
    for d in deltas:
        freq = "—" if d.frequency is None else f"{d.frequency:.2f}"
        lines.append(f"| {_md_escape(d.name)} | {freq} | {_ci_text(d.delta)} |")
    return "\n".join(lines) + "\n"


def class_delta_csv(sections: Mapping[str, Sequence[ClassDelta]]) -> str:
    """``comparison, class, train_pixels_pct, delta, ci_low, ci_high, pairs`` for every section."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["comparison", "class", "train_pixels_pct", "delta", "ci_low", "ci_high", "pairs"])
    for name, deltas in sections.items():
        for d in deltas:
            ci = d.delta
            writer.writerow([name, d.name, _csv_num(d.frequency), _csv_num(ci.mean if ci else None),
                             _csv_num(ci.low if ci and ci.has_interval else None),
                             _csv_num(ci.high if ci and ci.has_interval else None), ci.n_pairs if ci else 0])
    return buf.getvalue()


def explain_metrics_markdown(spec: Spec, results: Mapping[str, Mapping[str, Mapping[int, float]]],
                             preset: Optional[str] = None) -> str:
    """Per row (of those at ``preset``), mean ± std over seeds of each of :data:`EXPLAIN_METRICS`
    (``results[metric][row][seed]``)."""
    heads = [name for _, name in EXPLAIN_METRICS]
    lines = ["### Calibration and what the context changes (val, %)", "",
             "ECE: expected calibration error of the softmax's top probability, 15 equal-width bins. changed: "
             "share of labelled val pixels whose argmax differs between p and p_p; fixed / broken by p_p: of the "
             "changed pixels, the share p_p gets right and p got wrong, and the reverse.", "",
             "| Row | Description | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for row in (spec.rows if preset is None else spec.rows_for(preset)):
        cells = [fmt_summary(summarize([v for _, v in sorted(results.get(m, {}).get(row.label, {}).items())]))
                 for m, _ in EXPLAIN_METRICS]
        lines.append(f"| {row.label} | {_md_escape(row.description)} | "
                     + " | ".join("—" if c == NO_RUNS else c for c in cells) + " |")
    return "\n".join(lines) + "\n"
