"""Tracked results of a spec, read back from MLflow (the raw material of the reports)."""
from __future__ import annotations

import statistics
from typing import Optional

from .spec import Spec, load_spec
from .tracking import find_runs, resolve_tracking_uri

__all__ = ["matched_runs", "collect", "print_tracked"]


def matched_runs(spec: Spec, preset: str, uri: str) -> dict[str, dict[int, object]]:
    """``{row label: {seed: mlflow Run}}``: the FINISHED runs of ``spec`` at ``preset`` whose config
    hash and data version are the row's current ones, so a changed row (or regenerated data) never
    mixes with its old results."""
    from .runner import data_version, make_unit

    rows = {r.label: r for r in spec.rows}
    version = data_version(preset, spec.dataset)
    out: dict[str, dict[int, object]] = {label: {} for label in rows}
    expected: dict[tuple[str, int], str] = {}
    for run in find_runs(uri, spec.name, {"preset": preset}, statuses=["FINISHED"]):
        label, seed = run.data.tags.get("row"), run.data.tags.get("seed")
        if label not in rows or seed is None:
            continue
        key = (label, int(seed))
        if key not in expected:
            expected[key] = make_unit(spec, rows[label], int(seed), preset).cfg_hash
        if run.data.tags.get("config_hash") == expected[key] and run.data.tags.get("data_version") == version:
            out[label][int(seed)] = run
    return out


def collect(spec: Spec, preset: str, uri: str, metric: str = "val/mIoU") -> dict[str, dict[int, float]]:
    """``{row label: {seed: metric}}`` from :func:`matched_runs` (runs without the metric left out)."""
    return {label: {seed: run.data.metrics[metric] for seed, run in runs.items() if metric in run.data.metrics}
            for label, runs in matched_runs(spec, preset, uri).items()}


def _fmt(values: list[float]) -> str:
    if not values:
        return "no runs"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {std:4.2f} (n={len(values)})"


def print_tracked(spec_path: str, preset: str = "quick", tracking_uri: Optional[str] = None,
                  out: Optional[str] = None) -> int:
    spec = load_spec(spec_path)
    uri = resolve_tracking_uri(tracking_uri)
    if spec.task == "benchmark":
        from .benchmark import print_tracked_benchmark

        return print_tracked_benchmark(spec, preset, uri)
    results = collect(spec, preset, uri)
    if out:  # a small DVC-trackable record of what the table stands on
        import json
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"spec": spec.name, "preset": preset, "val/mIoU": results},
                                        indent=1, sort_keys=True) + "\n")
    print(f"{spec.title} — preset {preset} (val mIoU, %; tracking {uri})")
    print(f"{'row':>10}  {'description':<44} {'ours':>22}  {'paper':>6}")
    for row in spec.rows:
        paper = row.paper.get("ss") if isinstance(row.paper, dict) else row.paper
        values = [results[row.label][s] for s in sorted(results[row.label])]
        print(f"{row.label:>10}  {row.description[:44]:<44} {_fmt(values):>22}  "
              f"{'' if paper is None else f'{paper:6.2f}'}")
    return 0
