"""Fig. 2 of the paper: mIoU against #params and against inference time for Table 1's models, with an
arrow from each baseline to its + CAC, drawn from tracked runs.

mIoU is the tracked ``val/mIoU`` of the Table 1 spec (training runs, else ``cac-exp eval`` runs), mean
over seeds; #params is counted from the same rows' resolved configs at the same preset (what was
trained); inference time is the median whole-image time at 512x512 of the newest FINISHED run of the
same row label in the benchmark spec ``experiments/fig2_speed.yaml`` (``cac-exp run`` on it). A model
whose two rows lack any of these is left out of that panel and named in the caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from cac.exp.spec import Row, Spec

__all__ = ["ModelPair", "model_pairs", "fig2_data", "plot_fig2", "fig2_figure", "SPEED_SPEC", "SPEED_SIZE"]

SPEED_SPEC = "fig2_speed"
SPEED_SIZE = 512


@dataclass(frozen=True)
class ModelPair:
    """One Table 1 model: its baseline row, its + CAC row, and what Fig. 2 plots of each."""

    name: str
    base: str
    cac: str
    miou: Optional[tuple[float, float]] = None  # (baseline, + CAC), mean over seeds
    params_m: Optional[tuple[float, float]] = None
    time_ms: Optional[tuple[float, float]] = None


def model_pairs(spec: Spec) -> list[tuple[Row, Row]]:
    """(baseline row, + CAC row) of each model, in spec order: a row without CAC and the first row
    with CAC over the same model."""
    pairs = []
    for row in spec.rows:
        if row.cac is not None:
            continue
        partner = next((r for r in spec.rows if r.cac is not None and r.model == row.model), None)
        if partner is not None:
            pairs.append((row, partner))
    return pairs


def _mean(values: Mapping[int, float]) -> Optional[float]:
    return sum(values.values()) / len(values) if values else None


def fig2_data(spec: Spec, preset: str, uri: str, speed: Optional[Spec] = None,
              results: Optional[Mapping[str, Mapping[int, float]]] = None) -> list[ModelPair]:
    """Each model's mIoU, #params and time (None where a row lacks it). ``results``: the spec's
    ``{row: {seed: val/mIoU}}`` when the caller has them (the Table 1 report does)."""
    from cac.exp.param_counts import count_spec_params
    from cac.exp.results import collect, collect_evaluations

    if results is None:
        results = dict(collect(spec, preset, uri))
        for label, values in collect_evaluations(spec, preset, uri).items():
            results.setdefault(label, {})
            if not results[label]:
                results[label] = values
    pairs = model_pairs(spec)
    with_runs = [(b, c) for b, c in pairs if results.get(b.label) and results.get(c.label)]
    labels = [r.label for pair in with_runs for r in pair]
    params = {r["row"]: r["params"] / 1e6 for r in count_spec_params(str(spec.path), preset, rows=labels)} \
        if labels else {}
    times = _speed_times(speed, preset, uri) if speed is not None else {}
    out = []
    for base, cac in pairs:
        both = lambda table: (table[base.label], table[cac.label]) \
            if base.label in table and cac.label in table else None  # noqa: E731
        miou = both({k: _mean(v) for k, v in results.items() if v})
        out.append(ModelPair(base.description, base.label, cac.label, miou,
                             both(params) if miou else None, both(times) if miou else None))
    return out


def _speed_times(speed: Spec, preset: str, uri: str) -> dict[str, float]:
    """``{row label: median ms}`` at :data:`SPEED_SIZE` from the newest tracked benchmark runs."""
    from cac.bench.table6 import tracked_results

    results, _models = tracked_results(speed, preset, uri)
    return {label: r.stats["time_ms_median"] for label, r in results.get(SPEED_SIZE, {}).items()
            if "time_ms_median" in r.stats}


def plot_fig2(pairs: Sequence[ModelPair], title: str, caption: str):
    """Two panels, mIoU against #params and against time: an arrow from each baseline to its + CAC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, attr, xlabel in ((axes[0], "params_m", "#params (M)"),
                             (axes[1], "time_ms", f"inference time at {SPEED_SIZE}x{SPEED_SIZE} (ms)")):
        drawn = [p for p in pairs if p.miou and getattr(p, attr)]
        for i, pair in enumerate(drawn):
            (x0, x1), (y0, y1) = getattr(pair, attr), pair.miou
            colour = f"C{i % 10}"
            ax.scatter([x0], [y0], color=colour, marker="o", s=22, label=pair.name)
            ax.scatter([x1], [y1], color=colour, marker="*", s=70)
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="->", color=colour, lw=1.2))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val mIoU (%)")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no model with runs", ha="center", va="center", transform=ax.transAxes)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="center right", fontsize=7, title="o baseline, * + CAC",
                   title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, -0.02, caption, fontsize=7, wrap=True, ha="left", va="top")
    fig.tight_layout(rect=(0, 0, 0.8 if handles else 1, 1))
    return fig


def fig2_caption(pairs: Sequence[ModelPair], preset: str) -> str:
    no_runs = [p.name for p in pairs if p.miou is None]
    no_time = [p.name for p in pairs if p.miou is not None and p.time_ms is None]
    parts = [f"Preset {preset}: mIoU of the tracked runs (mean over seeds), #params of the same resolved "
             f"configs, time from `{SPEED_SPEC}` runs at this preset."]
    if no_runs:
        parts.append("Left out (no runs of both rows): " + ", ".join(no_runs) + ".")
    if no_time:
        parts.append("Left out of the time panel (no tracked timing): " + ", ".join(no_time) + ".")
    return " ".join(parts)


def fig2_figure(spec: Spec, preset: str, uri: str, out_dir: Path, speed: Optional[Spec] = None,
                results: Optional[Mapping[str, Mapping[int, float]]] = None) -> list[Path]:
    """``fig2_<spec>_<preset>.{png,pdf}`` and a JSON sidecar of the plotted values; [] when no model
    has runs of both rows."""
    import json

    from analysis.figures import save_figure

    pairs = fig2_data(spec, preset, uri, speed, results)
    if not any(p.miou for p in pairs):
        return []
    caption = fig2_caption(pairs, preset)
    fig = plot_fig2(pairs, f"Fig. 2 — {spec.title.split(':')[0]} ({spec.dataset}), + CAC vs baseline", caption)
    stem = out_dir / f"fig2_{spec.name}_{preset}"
    paths = save_figure(fig, stem)
    sidecar = stem.with_suffix(".json")
    sidecar.write_text(json.dumps({"caption": caption, "models": [p.__dict__ for p in pairs]}, indent=1) + "\n")
    return paths + [sidecar]
