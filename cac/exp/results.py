"""Tracked results of a spec, read back from MLflow (the raw material of the reports)."""
from __future__ import annotations

from typing import Optional

from cac.exp.credentials import public_url
from cac.exp.spec import Spec, load_spec
from cac.exp.stats import fmt_summary, summarize
from cac.exp.tracking import find_runs, resolve_tracking_uri

__all__ = ["matched_runs", "collect", "collect_evaluations", "print_tracked", "base_model_name", "versions_note",
           "run_versions"]


def matched_runs(spec: Spec, preset: str, uri: str) -> dict[str, dict[int, object]]:
    """``{row label: {seed: mlflow Run}}``: the FINISHED runs of ``spec`` at ``preset`` whose config
    hash and data version are the row's current ones, so a changed row (or regenerated data) never
    mixes with its old results; runs of another base model (``Spec.with_model``) never mix either."""
    from cac.exp.runner import make_unit

    rows = {r.label: r for r in spec.rows_for(preset)}
    out: dict[str, dict[int, object]] = {label: {} for label in rows}
    expected: dict[tuple[str, int], tuple[str, str]] = {}
    for run in find_runs(uri, spec.name, {"preset": preset}, statuses=["FINISHED"]):
        label, seed = run.data.tags.get("row"), run.data.tags.get("seed")
        if label not in rows or seed is None:
            continue
        key = (label, int(seed))
        if key not in expected:
            unit = make_unit(spec, rows[label], int(seed), preset)
            expected[key] = (unit.cfg_hash, unit.extra_tags["data_version"])
        if (run.data.tags.get("config_hash"), run.data.tags.get("data_version")) == expected[key]:
            out[label][int(seed)] = run
    _add_shared(spec, preset, uri, out)
    return out


def _add_shared(spec: Spec, preset: str, uri: str, out: dict[str, dict[int, object]]) -> None:
    """Rows x seeds this spec did not train itself but another spec did, with the same identity
    (Table 3 (a) is Table 2 (d)): the shared run counts in both tables."""
    from cac.exp.runner import make_unit, shared_run

    for row in spec.rows_for(preset):
        for seed in spec.seeds_for(preset):
            if seed not in out[row.label]:
                run = shared_run(make_unit(spec, row, seed, preset), uri)
                if run is not None:
                    out[row.label][seed] = run


def collect(spec: Spec, preset: str, uri: str, metric: str = "val/mIoU",
            runs: Optional[dict] = None) -> dict[str, dict[int, float]]:
    """``{row label: {seed: metric}}`` from :func:`matched_runs` (or the ``runs`` it gave; runs without
    the metric left out)."""
    runs = runs if runs is not None else matched_runs(spec, preset, uri)
    return {label: {seed: run.data.metrics[metric] for seed, run in by_seed.items() if metric in run.data.metrics}
            for label, by_seed in runs.items()}


def versions_note(runs: dict) -> list[str]:
    """One sentence when the runs of a table were made with different versions, devices or source
    trees (``env.*`` and git tags, :mod:`cac.exp.provenance`), naming which rows had which; else none."""
    from cac.exp.provenance import version_spread

    spread = version_spread((label, run.data.tags) for label, by_seed in runs.items() for run in by_seed.values())
    return [f"The rows were made with different versions: {'; '.join(spread)}."] if spread else []


def run_versions(runs: dict) -> dict[str, str]:
    """The ``env.*`` and source tags the runs share (their common provenance)."""
    tags = [run.data.tags for by_seed in runs.values() for run in by_seed.values()]
    keys = {k for t in tags for k in t if k.startswith("env.") or k.startswith("mlflow.source.git.")}
    return {k: tags[0][k] for k in sorted(keys) if all(t.get(k) == tags[0].get(k) for t in tags)} if tags else {}


def base_model_name(spec: Spec, preset: str) -> str:
    """What report titles name: the base model(s) of the spec's rows at ``preset``."""
    from cac.mmseg.zoo import resolve_model

    names = []
    for row in spec.rows_for(preset):
        name = resolve_model(spec.model_for(row, preset)).name
        if name not in names:
            names.append(name)
    return ", ".join(names)


def collect_evaluations(spec: Spec, preset: str, uri: str, metric: str = "val/mIoU") -> dict[str, dict[int, float]]:
    """``{row label: {0: metric}}`` from the newest FINISHED evaluation run (``cac-exp eval``) of each
    row at ``preset`` on the current data version: the fallback of reports for rows with no training
    run (Table 1 from released checkpoints)."""
    from cac.exp.evaluate import eval_experiment
    from cac.exp.runner import make_unit

    wanted = {r.label: make_unit(spec, r, 0, preset) for r in spec.rows_for(preset)}
    newest: dict[str, object] = {}
    for run in find_runs(uri, eval_experiment(spec.name), {"preset": preset, "kind": "eval"}, statuses=["FINISHED"]):
        label = run.data.tags.get("row")
        unit = wanted.get(label)
        if unit is None or metric not in run.data.metrics:
            continue
        if run.data.tags.get("data_version") != unit.extra_tags["data_version"]:
            continue
        if label not in newest or run.info.start_time > newest[label].info.start_time:
            newest[label] = run
    return {label: {0: run.data.metrics[metric]} for label, run in newest.items()}


def print_tracked(spec_path: str, preset: str = "quick", tracking_uri: Optional[str] = None,
                  out: Optional[str] = None, model: Optional[str] = None) -> int:
    spec = load_spec(spec_path).with_model(model)
    uri = resolve_tracking_uri(tracking_uri)
    runs = matched_runs(spec, preset, uri)
    results = collect(spec, preset, uri, runs=runs)
    if out:  # a small DVC-trackable record of what the table stands on
        import json
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"spec": spec.name, "preset": preset, "val/mIoU": results,
                                         "base_model": base_model_name(spec, preset),
                                         "provenance": run_versions(runs)},
                                        indent=1, sort_keys=True) + "\n")
    print(f"{spec.title} — preset {preset} (val mIoU, %; tracking {public_url(uri)})")
    print(f"{'row':>10}  {'description':<44} {'ours':>22}  {'paper':>6}")
    for row in spec.rows_for(preset):
        paper = row.paper.get("ss") if isinstance(row.paper, dict) else row.paper
        values = [results[row.label][s] for s in sorted(results[row.label])]
        print(f"{row.label:>10}  {row.description[:44]:<44} {fmt_summary(summarize(values)):>22}  "
              f"{'' if paper is None else f'{paper:6.2f}'}")
    common = run_versions(runs)
    if common:
        print("made with: " + ", ".join(f"{k.replace('env.', '').replace('mlflow.source.git.', 'git ')} "
                                        f"{v[:12] if k.endswith('commit') else v}" for k, v in common.items()))
    for line in versions_note(runs):
        print(line)
    return 0
