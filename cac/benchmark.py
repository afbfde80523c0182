"""Table 6: inference speed (fps) and peak memory of a segmentor with and without CAC.

``cac-exp run ablations/table6.yaml [--preset quick|bench|paper]`` lands here (``task: benchmark``).
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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional

from .errors import CacError
from .spec import Row, Spec, select_rows

__all__ = ["PAPER_TABLE6", "PAPER_TABLE6_DELTA", "MODEL_ENV", "BenchSettings", "SizeResult", "ForeignLoad",
           "bench_settings", "bench_model_cfg", "build_eval_model", "make_batch", "time_interleaved",
           "summarise_times", "classifier_cost", "measure_size", "probe_memory", "format_table", "run_benchmark",
           "tracked_results", "print_tracked_benchmark", "PROBE_ENV", "rss_kib", "reset_peak_rss",
           "set_flush_denormal"]

MODEL_ENV = "CAC_BENCH_MODEL"
PAPER_MODEL = "upernet-swin-t"

# The paper's Table 6 (UperNet + Swin-T, one RTX 2080Ti): {size: {row: (fps, Mem in MB)}}.
PAPER_TABLE6: dict[int, dict[str, tuple[float, float]]] = {
    512: {"Baseline": (20.38, 2794.0), "Ours": (19.96, 2796.0)},
    1280: {"Baseline": (4.13, 5650.0), "Ours": (4.05, 5654.0)},
    2560: {"Baseline": (1.04, 10286.0), "Ours": (1.02, 10290.0)},
}

# Its Δ row as printed: {size: (fps Δ%, Mem Δ%)}.
PAPER_TABLE6_DELTA: dict[int, tuple[float, float]] = {512: (-2.05, 0.07), 1280: (-1.94, 0.07), 2560: (-2.00, 0.04)}

# The memory probes run with a fixed glibc mmap threshold: every allocation above 64 KiB is its own
# mapping, returned to the OS when freed, so the resident peak follows live tensor memory rather than
# whatever the allocator's heap happened to keep from earlier, larger requests.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}

_DEFAULTS = dict(sizes=[512, 1280, 2560], warmup=3, repeats=10, batch_size=1, device="auto")
_MiB = 1024.0 * 1024.0
_BUSY_CORES = 0.25  # other processes' load (in cores) above which a timing is flagged


# -- settings and configs -------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSettings:
    sizes: tuple[int, ...]
    warmup: int
    repeats: int
    batch_size: int
    device: str  # resolved: "cpu" or "cuda"


def resolve_device(name: str) -> str:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CacError("benchmark.device is cuda but no CUDA device is available (use auto or cpu)")
    return name


def bench_settings(spec: Spec, preset: str) -> BenchSettings:
    """The spec's ``benchmark:`` block with the preset's overrides, over the defaults."""
    from .presets import get_preset

    get_preset(preset)  # an unknown preset is refused even though it only scales the benchmark
    m = {**_DEFAULTS, **spec.benchmark_for(preset)}
    return BenchSettings(tuple(m["sizes"]), m["warmup"], m["repeats"], m["batch_size"], resolve_device(m["device"]))


def bench_model_name(spec: Spec, row: Row, preset: str) -> str:
    """The row's model, or the Table 1 model ``CAC_BENCH_MODEL`` names."""
    from .zoo import get_model

    return get_model(os.environ.get(MODEL_ENV) or spec.model_for(row, preset)).name


def bench_model_cfg(spec: Spec, row: Row, preset: str) -> dict:
    """The row's model config: the shipped config (any preset), SyncBN -> BN, no pretrained weights,
    whole-image inference. Presets scale the benchmark, never the model."""
    from .config import resolve_config
    from .presets import _replace_norm, _strip_pretrained

    cfg = resolve_config(bench_model_name(spec, row, preset), "paper",
                         cac=row.cac if row.cac is not None else False,
                         overrides=spec.overrides_for(row, preset), dataset=spec.dataset)
    model = _strip_pretrained(_replace_norm(cfg["model"], "SyncBN", "BN"))
    model["test_cfg"] = {**(model.get("test_cfg") or {}), "mode": "whole"}
    return model


def baseline_label(spec: Spec, rows: list[Row]) -> Optional[str]:
    """The row Δ is measured against: the spec's ``baseline``, else the first row without CAC."""
    if spec.baseline in [r.label for r in rows]:
        return spec.baseline
    return next((r.label for r in rows if r.cac is None), None)


# -- building and running models ------------------------------------------------------------------
def build_eval_model(model_cfg: dict, device: str, seed: int = 0):
    """Random init from ``seed``, on ``device``, in eval mode."""
    import torch

    from .params import build_model

    torch.manual_seed(seed)
    return build_model(model_cfg).to(device).eval()


def make_batch(size: int, batch_size: int, seed: int = 0) -> dict:
    """A ``test_step`` batch: ``batch_size`` random uint8 ``size``² images and their data samples."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(batch_size)]
    return dict(inputs=images, data_samples=_samples(size, batch_size))


def _samples(size: int, batch_size: int) -> list:
    from mmseg.structures import SegDataSample

    out = []
    for _ in range(batch_size):
        s = SegDataSample()
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                            padding_size=[0, 0, 0, 0]))
        out.append(s)
    return out


def inference_fn(model, size: int, batch_size: int) -> Callable[[], None]:
    """One whole-image inference through ``test_step``. The data samples are fresh each call: the
    results written into them (full-size logits) would otherwise stay alive between calls."""
    import torch

    images = make_batch(size, batch_size)["inputs"]

    def run() -> None:
        with torch.inference_mode():
            model.test_step(dict(inputs=images, data_samples=_samples(size, batch_size)))
    return run


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function. The call order rotates every repetition, so whatever else
    the machine does falls on every function alike; the ``warmup`` rounds are not timed."""
    labels = list(fns)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for rep in range(warmup + repeats):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            sync()
            t0 = time.perf_counter()
            fns[label]()
            sync()
            if rep >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times


def summarise_times(seconds: list[float], batch_size: int) -> dict[str, float]:
    """fps from the median; min and spread (IQR / median) to judge the noise."""
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [med, med, med]
    return {"fps": batch_size / med, "time_ms_median": med * 1e3, "time_ms_min": min(seconds) * 1e3,
            "time_spread_pct": (q[2] - q[0]) / med * 100}


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy since boot, CPU seconds this process has used)."""
    import resource

    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system | irq softirq steal (not idle, iowait)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


class ForeignLoad:
    """``with ForeignLoad() as load: ...`` -> ``load.cores``: the cores' worth of CPU time other
    processes used meanwhile (NaN where ``/proc/stat`` is missing). Interleaving spreads such load
    over the rows, but a large one still makes small differences unmeasurable."""

    cores = float("nan")

    def __enter__(self) -> "ForeignLoad":
        self._t0 = time.perf_counter()
        try:
            self._busy0, self._own0 = _cpu_seconds()
        except OSError:
            self._busy0 = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._busy0 is None:
            return
        busy, own = _cpu_seconds()
        wall = time.perf_counter() - self._t0
        self.cores = max(0.0, (busy - self._busy0) - (own - self._own0)) / wall if wall > 0 else 0.0


def _cac_heads(model) -> list:
    from .head import CACHead

    return [m for m in model.modules() if isinstance(m, CACHead)]


def classifier_cost(model, size: int, batch_size: int, repeats: int, device: str) -> Optional[dict[str, float]]:
    """Median ms of the head's ``conv_seg`` and of CAC's classifier on the same captured features.

    ``None`` for a model without ``CACHead``. Also checks that the oracle projector never runs.
    """
    import torch

    heads = _cac_heads(model)
    if not heads:
        return None
    head = heads[-1]
    conv, cls = head.head.conv_seg, head.classifier
    captured: list[tuple] = []
    oracle_calls: list[int] = []

    def capture(*args: Any) -> Any:  # CACHead calls classifier.predict directly: no module hook fires
        captured.append(args)
        return type(cls).predict(cls, *args)
    cls.predict = capture
    hooks = [cls.proj_y.register_forward_hook(lambda *a: oracle_calls.append(1))] if cls.proj_y is not None else []
    try:
        inference_fn(model, size, batch_size)()
    finally:
        del cls.predict
        for h in hooks:
            h.remove()
    if oracle_calls:
        raise CacError("the oracle projector theta_y ran at inference; p_y must be a training-only branch")
    feats, weight, bias = captured[-1][:3]

    def run_conv() -> None:
        with torch.inference_mode():
            conv(feats)

    def run_cac() -> None:
        with torch.inference_mode():
            cls.predict(feats, weight, bias)
    times = time_interleaved({"conv_seg": run_conv, "cac": run_cac}, warmup=2, repeats=max(repeats, 10),
                             sync=_sync(device))
    conv_ms, cac_ms = (statistics.median(times[k]) * 1e3 for k in ("conv_seg", "cac"))
    return {"conv_seg_ms": conv_ms, "cac_classifier_ms": cac_ms, "classifier_extra_ms": cac_ms - conv_ms}


# -- memory: one model alone in a fresh process ---------------------------------------------------
def rss_kib(key: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise CacError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory(model_cfg: dict, size: int, batch_size: int, device: str) -> dict[str, Any]:
    """Peak memory of building ``model_cfg`` and one inference at ``size``, in this process (which
    should hold nothing else: ``probe_memory`` runs it in a fresh one)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model = build_eval_model(model_cfg, device)
        inference_fn(model, size, batch_size)()
        torch.cuda.synchronize()
        return {"mem_mb": (torch.cuda.max_memory_allocated() - start) / _MiB,
                "mem_method": "cuda max_memory_allocated (weights + activations)"}
    before = rss_kib("VmRSS")
    model = build_eval_model(model_cfg, device)
    # Construction temporaries (Swin's init) are not inference memory: restart the peak after it.
    exact = reset_peak_rss()
    inference_fn(model, size, batch_size)()
    peak = rss_kib("VmHWM")
    return {"mem_mb": (peak - before) / 1024.0, "weights_mb": _weights_bytes(model) / _MiB,
            "mem_method": "cpu peak RSS over one inference minus RSS before the build (mmap threshold "
                          + os.environ.get("MALLOC_MMAP_THRESHOLD_", "dynamic") + ")"
                          + ("" if exact else " (peak not reset after the build)")}


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def probe_memory(model_cfg: dict, size: int, batch_size: int, device: str, timeout: float = 3600) -> dict:
    """``measure_memory`` in a fresh interpreter (``python -m cac.benchmark``), so the peak is this
    model's alone."""
    job = json.dumps(dict(model_cfg=model_cfg, size=size, batch_size=batch_size, device=device))
    proc = subprocess.run([sys.executable, "-m", "cac.benchmark"], input=job, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **PROBE_ENV})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise CacError(f"memory probe at {size}px failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


# -- results, MLflow, the table -------------------------------------------------------------------
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
            if with_paper:
                fps_d, mem_d = _paper_delta(s)
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
    busy = {s: c for s, c in busy.items() if c > _BUSY_CORES}
    if busy:
        lines.append("! other processes used " + ", ".join(f"{c:.2f} cores at {s}" for s, c in busy.items())
                     + " during the timing: rerun on a quiet machine before trusting the Δ")
    return "\n".join(lines)


def _pct(value: Optional[float], width: int) -> str:
    return f"{'—':>{width}}" if value is None else format(value, f">+{width - 1}.2f") + "%"


def _row_params(spec: Spec, row: Row, model: str, cfg: dict, settings: BenchSettings, size: int) -> dict:
    import torch

    from .classifier import CACOptions
    from .tracking import flatten

    params = {"model": model, "cac": "off" if row.cac is None else "on", "size": size, "dataset": spec.dataset,
              **{f"bench.{k}": v for k, v in asdict(settings).items() if k != "sizes"},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    if row.cac is not None:
        params.update({f"cac.{k}": v for k, v in CACOptions.from_dict(row.cac).to_dict().items()})
    if settings.device == "cuda":
        params["gpu"] = torch.cuda.get_device_name()
    params.update(flatten(cfg, "cfg.model."))
    return params


def _log_run(uri: str, spec: Spec, row: Row, preset: str, model: str, cfg: dict, settings: BenchSettings,
             res: SizeResult) -> str:
    from .tracking import RunTracker, git_commit

    tags = {"spec": spec.name, "row": row.label, "preset": preset, "size": res.size, "device": settings.device,
            "model": model, "task": "benchmark"}
    tracker = RunTracker.open(uri, spec.name, tags, f"{spec.name} {row.label} {res.size}px {preset}")
    try:
        tracker.set_tags({"git_commit": git_commit(), "description": row.description,
                          "mem_method": res.memory.get("mem_method", "")})
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


# -- the command ----------------------------------------------------------------------------------
def _print_plan(spec: Spec, preset: str, rows: list[Row], settings: BenchSettings, uri: str,
                echo: Callable[[str], None]) -> None:
    echo(f"spec {spec.path} ({spec.title})")
    echo(f"preset {preset}; device {settings.device}; sizes {list(settings.sizes)}; warmup {settings.warmup}; "
         f"repeats {settings.repeats} (interleaved); batch {settings.batch_size}; tracking {uri}")
    base = baseline_label(spec, rows)
    for row in rows:
        cac = "off" if row.cac is None else ("on " + json.dumps(row.cac) if row.cac else "on")
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
        times = time_interleaved(fns, settings.warmup, settings.repeats, _sync(settings.device))
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

    from .tracking import resolve_tracking_uri

    if spec.task != "benchmark":
        raise CacError(f"{spec.path}: task is {spec.task!r}, not benchmark")
    settings = bench_settings(spec, preset)
    selected = select_rows(spec, rows)
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
    from .tracking import find_runs

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
        echo(f"{spec.title} — preset {preset}: no tracked benchmark runs in {uri}")
        return 0
    order = [r.label for r in spec.rows if r.label in models]
    names = sorted(set(models.values()))
    echo(format_table(results, order, baseline_label(spec, [r for r in spec.rows if r.label in models]),
                      names[0] if len(names) == 1 else "",
                      title=f"{spec.title} — {', '.join(names)}, preset {preset}, tracked in {uri} "
                            f"(fps: images/s; Mem: MB)"))
    return 0


def set_flush_denormal(on: bool) -> bool:
    """Set flush-to-zero for subnormals; returns the previous setting (False where unsupported)."""
    import torch

    previous = (torch.tensor([1e-30]) * 1e-10).item() == 0.0  # a subnormal product is flushed iff on
    torch.set_flush_denormal(on)
    return previous


def _probe_main() -> int:
    """``python -m cac.benchmark`` reads a JSON job on stdin and prints ``measure_memory``'s JSON."""
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(sys.stdin.read())
    set_flush_denormal(True)
    out = measure_memory(job["model_cfg"], job["size"], job["batch_size"], job["device"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main())
