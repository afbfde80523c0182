"""Table 6: inference speed (fps) and peak memory of a segmentor with and without CAC.

``cac-exp run ablations/table6.yaml [--preset quick|bench|paper]`` lands here (``task: benchmark``).
The pieces: :mod:`cac.bench.models` (what is built and run), :mod:`cac.bench.timing`,
:mod:`cac.bench.memory`; this module measures, tracks and prints the table.
Each row's real mmseg model is built from the model's shipped config (``resolve_config(..., "paper")``)
with SyncBN -> BN, no pretrained weights (random init, the same seed for every row, so rows share
every weight they have in common) and whole-image inference. The spec's ``benchmark:`` block, with
the preset's overrides, gives the sizes, warm-up, repetitions, batch size and device.

Protocol, per size:

- **time**: every row runs ``model.test_step`` (data preprocessor, whole-image inference, resize to
  the original shape, argmax) ``warmup`` times, then ``repeats`` times *interleaved*: the order of the
  rows rotates every repetition, so drift and other jobs on the machine hit all rows alike.
  fps = batch size / median seconds per call.
- **memory**: each row once more, alone in a fresh subprocess, so no model's allocations hide in
  another's. CUDA: ``torch.cuda.max_memory_allocated`` over build + one inference (weights +
  activations). CPU: the peak resident set (``VmHWM``, reset after the build) over one inference,
  minus the resident set before the model was built: weights + activations, without the interpreter
  and its libraries. glibc's mmap threshold is fixed at 64 KiB in the probe (``PROBE_ENV``) so freed
  tensors leave the resident set: repeated probes then agree to ~0.1 MB instead of ~20 MB.
- **cross-checks** (+CAC rows): the *paired* Δ, the median over rounds of the time ratio within a
  round; and the *classifier share*, the wrapped head's own ``conv_seg`` against CAC's classifier on
  the same captured features, interleaved. The +CAC model differs from the plain one in nothing else,
  so ``baseline + extra ms`` estimates the +CAC time. The same step checks that the oracle branch
  (``proj_y``, p_y) never runs at inference.
- **contention**: the CPU time other processes used during the timing, in cores (``/proc/stat``), is
  printed and logged (``foreign_cores``); above ~0.25 the Δ are not to be trusted.

Every row x size x preset is one MLflow run (experiment = spec name), tagged spec, row, preset, size,
device and model; it holds the settings as params and fps, time_ms_median, mem_mb (+ Δ% against the
baseline row) as metrics. ``CAC_BENCH_MODEL=<zoo name>`` runs the same spec on another Table 1 model.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional

from cac.exp.credentials import public_url

from cac.bench.memory import probe_memory
from cac.bench.models import (MODEL_ENV, BenchSettings, baseline_label, bench_model_cfg, bench_model_name,
                              bench_settings, build_eval_model, classifier_cost, inference_fn)
from cac.bench.timing import ForeignLoad, device_sync, set_flush_denormal, summarise_times, time_interleaved
from cac.errors import CacError
from cac.exp.spec import Row, Spec, select_rows

__all__ = ["BUSY_CORES", "PAPER_MODEL", "PAPER_TABLE6", "PAPER_TABLE6_DELTA", "SizeResult", "add_deltas", "format_table",
           "measure_size", "run_benchmark", "tracked_results", "print_tracked_benchmark"]

PAPER_MODEL = "upernet-swin-t"


# The paper's Table 6 (UperNet + Swin-T, one RTX 2080Ti): {size: {row: (fps, Mem in MB)}}.
PAPER_TABLE6: dict[int, dict[str, tuple[float, float]]] = {
    512: {"Baseline": (20.38, 2794.0), "Ours": (19.96, 2796.0)},
    1280: {"Baseline": (4.13, 5650.0), "Ours": (4.05, 5654.0)},
    2560: {"Baseline": (1.04, 10286.0), "Ours": (1.02, 10290.0)},
}


# Its Δ row as printed: {size: (fps Δ%, Mem Δ%)}.
PAPER_TABLE6_DELTA: dict[int, tuple[float, float]] = {512: (-2.05, 0.07), 1280: (-1.94, 0.07), 2560: (-2.00, 0.04)}


BUSY_CORES = 0.25  # other processes' load (in cores) above which a timing is flagged


@dataclass
class SizeResult:
    """One row at one size: what is printed and logged."""

    row: str
    size: int
    times_s: list[float]
    stats: dict[str, float]
    memory: dict[str, Any] = field(default_factory=dict)
    classifier: Optional[dict[str, float]] = None
    delta: dict[str, float] = field(default_factory=dict)  # vs the baseline row, in %

    @property
    def fps(self) -> float:
        return self.stats["fps"]

    @property
    def mem_mb(self) -> Optional[float]:
        return self.memory.get("mem_mb")


def add_deltas(results: dict[str, SizeResult], baseline: Optional[str]) -> None:
    """fps_delta_pct, mem_delta_pct and (paired, from the classifier share) the estimated Δ fps."""
    if baseline not in results:
        return
    base = results[baseline]
    for label, res in results.items():
        if label == baseline:
            continue
        res.delta["fps_delta_pct"] = (res.fps / base.fps - 1.0) * 100
        if res.mem_mb is not None and base.mem_mb:
            res.delta["mem_delta_pct"] = (res.mem_mb / base.mem_mb - 1.0) * 100
        # Paired: the median over repetitions of this row's time over the baseline's in the same round.
        ratios = [t / b for t, b in zip(res.times_s, base.times_s)]
        res.delta["fps_delta_paired_pct"] = (1.0 / statistics.median(ratios) - 1.0) * 100
        if res.classifier is not None:
            extra = res.classifier["classifier_extra_ms"]
            base_ms = base.stats["time_ms_median"]
            res.delta["fps_delta_from_classifier_pct"] = (base_ms / (base_ms + extra) - 1.0) * 100


def _paper_delta(size: int) -> tuple[float, float]:
    """The paper's Δ% (fps, Mem) at ``size`` as printed (its fps were rounded before printing)."""
    return PAPER_TABLE6_DELTA[size]


def _fmt(value: Optional[float], spec: str, width: int) -> str:
    """Right-aligned ``value`` in ``spec`` (``.2f``, ``+.2f``); a dash when there is none."""
    if value is None:
        return f"{'—':>{width}}"
    sign, rest = ("+", spec[1:]) if spec.startswith("+") else ("", spec)
    return format(value, f">{sign}{width}{rest}")


def format_table(results: dict[int, dict[str, SizeResult]], rows: list[str], baseline: Optional[str],
                 model: str, title: str = "") -> str:
    """Table 6's layout: fps and Mem (MB) per size for each row, then Δ% against ``baseline``; for the
    paper's model, the paper's figures beside ours."""
    sizes = sorted(results)
    with_paper = model == PAPER_MODEL and all(s in PAPER_TABLE6 for s in sizes)
    w = 9
    group = 2 * w + (2 * w + 3 if with_paper else 0)
    lines = [title] if title else []
    lines.append(f"{'':<12}" + "".join(f"{f'{s}x{s}':^{group}}|" for s in sizes))
    sub = f"{'fps':>{w}}{'Mem':>{w}}" + (f" |{'fps*':>{w}}{'Mem*':>{w}}" if with_paper else "")
    lines.append(f"{'Model':<12}" + "".join(f"{sub}|" for _ in sizes))
    for label in rows:
        cells = []
        for s in sizes:
            r = results[s].get(label)
            cell = _fmt(r.fps if r else None, ".3f", w) + _fmt(r.mem_mb if r else None, ".1f", w)
            if with_paper:
                paper = PAPER_TABLE6[s].get(label)
                cell += " |" + _fmt(paper[0] if paper else None, ".2f", w) + _fmt(paper[1] if paper else None, ".0f", w)
            cells.append(cell)
        lines.append(f"{label:<12}" + "".join(f"{c}|" for c in cells))
    others = [r for r in rows if r != baseline] if baseline else []
    for label in others:
        cells = []
        for s in sizes:
            d = results[s][label].delta if label in results[s] else {}
            cell = _pct(d.get("fps_delta_pct"), w) + _pct(d.get("mem_delta_pct"), w)
            if with_paper:  # the paper's Δ belongs to its own + CAC row only
                fps_d, mem_d = _paper_delta(s) if label in PAPER_TABLE6[s] else (None, None)
                cell += " |" + _pct(fps_d, w) + _pct(mem_d, w)
            cells.append(cell)
        lines.append(f"{'Δ' if len(others) == 1 else 'Δ ' + label:<12}" + "".join(f"{c}|" for c in cells))
    for label in others:
        checks = []
        for s in sizes:
            r = results[s].get(label)
            if r is None or "fps_delta_paired_pct" not in r.delta:
                continue
            text = f"{s}: paired Δfps {r.delta['fps_delta_paired_pct']:+.2f}%"
            if r.classifier is not None:
                c = r.classifier
                text += (f"; classifier {c['cac_classifier_ms']:.1f} ms vs conv_seg {c['conv_seg_ms']:.1f} ms"
                         f" = Δfps {r.delta['fps_delta_from_classifier_pct']:+.2f}%")
            checks.append(text)
        if checks:
            lines.append(f"cross-checks ({label}): " + " | ".join(checks))
    if with_paper:
        lines.append("* the paper's Table 6 (RTX 2080Ti)")
    busy = {s: max(r.stats.get("foreign_cores", 0.0) for r in results[s].values()) for s in sizes}
    busy = {s: c for s, c in busy.items() if c > BUSY_CORES}
    if busy:
        lines.append("! other processes used " + ", ".join(f"{c:.2f} cores at {s}" for s, c in busy.items())
                     + " during the timing: rerun on a quiet machine before trusting the Δ")
    return "\n".join(lines)


def _pct(value: Optional[float], width: int) -> str:
    return f"{'—':>{width}}" if value is None else format(value, f">+{width - 1}.2f") + "%"


def _row_params(spec: Spec, row: Row, model: str, cfg: dict, settings: BenchSettings, size: int) -> dict:
    import torch

    from cac.core.classifier import CACOptions
    from cac.exp.tracking import flatten

    params = {"model": model, "cac": "off" if row.cac is None else "on", "size": size, "dataset": spec.dataset,
              **{f"bench.{k}": v for k, v in asdict(settings).items() if k != "sizes"},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    if row.cac is not None:
        params.update({f"cac.{k}": v for k, v in CACOptions.from_dict(row.cac).to_dict().items()})
    params["classifier"] = row.kind
    if row.classifier is not None:
        from cac.core.classifiers import split_classifier

        kind, options = split_classifier(spec.classifier_for(row, "paper"))
        params.update({f"{kind.name}.{k}": v for k, v in options.to_dict().items()})
    if settings.device == "cuda":
        params["gpu"] = torch.cuda.get_device_name()
    params.update(flatten(cfg, "cfg.model."))
    return params


def _log_run(uri: str, spec: Spec, row: Row, preset: str, model: str, cfg: dict, settings: BenchSettings,
             res: SizeResult) -> str:
    from cac.exp.tracking import RunTracker, git_commit

    tags = {"spec": spec.name, "row": row.label, "preset": preset, "size": res.size, "device": settings.device,
            "model": model, "task": "benchmark"}
    tracker = RunTracker.open(uri, spec.name, tags, f"{spec.name} {row.label} {res.size}px {preset}")
    try:
        from cac.exp.provenance import run_tags

        tracker.set_tags({"git_commit": git_commit(), "description": row.description,
                          "mem_method": res.memory.get("mem_method", ""), **run_tags("cac-exp run (benchmark)")})
        tracker.log_params(_row_params(spec, row, model, cfg, settings, res.size))
        metrics = {**res.stats, **res.delta, **(res.classifier or {}),
                   **{k: v for k, v in res.memory.items() if isinstance(v, (int, float))}}
        tracker.log_metrics(metrics, step=0)
        for i, t in enumerate(res.times_s):  # every timed repetition, to judge the noise later
            tracker.log_metrics({"time_ms": t * 1e3}, step=i)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return tracker.run_id


def _print_plan(spec: Spec, preset: str, rows: list[Row], settings: BenchSettings, uri: str,
                echo: Callable[[str], None]) -> None:
    echo(f"spec {spec.path} ({spec.title})")
    echo(f"preset {preset}; device {settings.device}; sizes {list(settings.sizes)}; warmup {settings.warmup}; "
         f"repeats {settings.repeats} (interleaved); batch {settings.batch_size}; tracking {public_url(uri)}")
    base = baseline_label(spec, rows)
    for row in rows:
        cac = "off" if row.cac is None else ("on " + json.dumps(row.cac) if row.cac else "on")
        if row.classifier is not None:
            cac = f"off, classifier {json.dumps(spec.classifier_for(row, preset))}"
        role = " (baseline)" if row.label == base else ""
        source = f" (from {MODEL_ENV})" if os.environ.get(MODEL_ENV) else ""
        echo(f"  {row.label:>10}{role}: {bench_model_name(spec, row, preset)}{source} cac {cac}")
    n = len(rows) * len(settings.sizes)
    echo(f"  {n} runs: {n * (settings.warmup + settings.repeats)} timed-or-warm-up inferences, "
         f"{n} memory probes (fresh processes)")


def measure_size(built: Mapping[str, Any], cfgs: Mapping[str, dict], size: int, settings: BenchSettings,
                 baseline: Optional[str]) -> dict[str, SizeResult]:
    """Time (interleaved), classifier share and memory of every built model at one size."""
    fns = {label: inference_fn(m, size, settings.batch_size) for label, m in built.items()}
    with ForeignLoad() as load:
        times = time_interleaved(fns, settings.warmup, settings.repeats, device_sync(settings.device))
        costs = {label: classifier_cost(m, size, settings.batch_size, settings.repeats, settings.device)
                 for label, m in built.items()}
    results = {label: SizeResult(label, size, times[label],
                                 {**summarise_times(times[label], settings.batch_size), "foreign_cores": load.cores},
                                 memory=probe_memory(cfgs[label], size, settings.batch_size, settings.device),
                                 classifier=costs[label])
               for label in built}
    add_deltas(results, baseline)
    return results


def _done_line(spec: Spec, res: SizeResult, run_id: str) -> str:
    deltas = "".join(f", {k.replace('_pct', '')} {res.delta[k]:+.2f}%" for k in ("fps_delta_pct", "mem_delta_pct")
                     if k in res.delta)
    return (f"done  {spec.name} {res.row} {res.size}px: {res.fps:.3f} fps ({res.stats['time_ms_median']:.1f} ms, "
            f"spread {res.stats['time_spread_pct']:.1f}%), {res.mem_mb:.1f} MB{deltas}; "
            f"other processes {res.stats['foreign_cores']:.2f} cores (run {run_id})")


def run_benchmark(spec: Spec, preset: str = "quick", *, rows: Optional[str] = None,
                  tracking_uri: Optional[str] = None, dry_run: bool = False,
                  echo: Callable[[str], None] = print) -> int:
    """Benchmark a ``task: benchmark`` spec's rows at every size; log to MLflow, print Table 6."""
    import torch

    from cac.exp.tracking import resolve_tracking_uri

    if spec.task != "benchmark":
        raise CacError(f"{spec.path}: task is {spec.task!r}, not benchmark")
    settings = bench_settings(spec, preset)
    selected = select_rows(spec, rows, preset)
    uri = resolve_tracking_uri(tracking_uri)
    if dry_run:
        _print_plan(spec, preset, selected, settings, uri, echo)
        return 0
    base = baseline_label(spec, selected)
    models = {r.label: bench_model_name(spec, r, preset) for r in selected}
    cfgs = {r.label: bench_model_cfg(spec, r, preset) for r in selected}
    echo(f"{spec.title} — preset {preset}, {settings.device} ({torch.get_num_threads()} threads), "
         f"warmup {settings.warmup}, repeats {settings.repeats} interleaved, batch {settings.batch_size}")
    # Random init can leave subnormal activations that x86 CPUs process ~100x slower; trained weights
    # do not, so flush them for every row alike.
    old_flush = set_flush_denormal(True)
    try:
        built = {label: build_eval_model(cfg, settings.device) for label, cfg in cfgs.items()}
        results: dict[int, dict[str, SizeResult]] = {}
        for size in settings.sizes:
            results[size] = measure_size(built, cfgs, size, settings, base)
            for row in selected:
                res = results[size][row.label]
                run_id = _log_run(uri, spec, row, preset, models[row.label], cfgs[row.label], settings, res)
                echo(_done_line(spec, res, run_id))
    finally:
        set_flush_denormal(old_flush)
    names = sorted(set(models.values()))
    echo("")
    echo(format_table(results, [r.label for r in selected], base, names[0] if len(names) == 1 else "",
                      title=f"{spec.title} — {', '.join(names)}, {settings.device}, preset {preset} "
                            f"(fps: images/s; Mem: MB)"))
    return 0


def tracked_results(spec: Spec, preset: str, uri: str) -> tuple[dict[int, dict[str, SizeResult]], dict[str, str]]:
    """The newest FINISHED run of each row at each size, rebuilt from MLflow: ``({size: {row: result}},
    {row: model})`` (the Δ% as they were computed and logged in that run)."""
    from cac.exp.tracking import find_runs

    newest: dict[tuple[str, int], Any] = {}
    for run in find_runs(uri, spec.name, {"preset": preset, "task": "benchmark"}, statuses=["FINISHED"]):
        key = (run.data.tags.get("row"), int(run.data.tags.get("size", 0)))
        if key not in newest or run.info.start_time > newest[key].info.start_time:
            newest[key] = run
    results: dict[int, dict[str, SizeResult]] = {}
    models: dict[str, str] = {}
    for (label, size), run in newest.items():
        m = run.data.metrics
        classifier = ({k: m[k] for k in ("conv_seg_ms", "cac_classifier_ms", "classifier_extra_ms")}
                      if "cac_classifier_ms" in m else None)
        results.setdefault(size, {})[label] = SizeResult(
            label, size, times_s=[],
            stats={k: m[k] for k in ("fps", "time_ms_median", "time_ms_min", "time_spread_pct", "foreign_cores")
                   if k in m},
            memory={"mem_mb": m["mem_mb"]} if "mem_mb" in m else {},
            classifier=classifier,
            delta={k: v for k, v in m.items() if k.startswith(("fps_delta", "mem_delta"))})
        models[label] = run.data.tags.get("model", "")
    return results, models


def print_tracked_benchmark(spec: Spec, preset: str, uri: str, echo: Callable[[str], None] = print) -> int:
    """Table 6 from the tracked runs (``cac-exp results`` on a benchmark spec)."""
    results, models = tracked_results(spec, preset, uri)
    if not results:
        echo(f"{spec.title} — preset {preset}: no tracked benchmark runs in {public_url(uri)}")
        return 0
    order = [r.label for r in spec.rows if r.label in models]
    names = sorted(set(models.values()))
    echo(format_table(results, order, baseline_label(spec, [r for r in spec.rows if r.label in models]),
                      names[0] if len(names) == 1 else "",
                      title=f"{spec.title} — {', '.join(names)}, preset {preset}, tracked in {public_url(uri)} "
                            f"(fps: images/s; Mem: MB)"))
    return 0
