"""Training cost of CAC: time and peak memory of one train iteration (data preprocessor, forward,
backward, SGD step) with and without CAC, on the real mmseg models at a small crop.

    flock /tmp/cac-cpu.lock .venv/bin/python benchmarks/train_step.py \
        [--models fcn-mv2 upernet-swin-t] [--crop 256] [--batch 2] [--warmup 2] [--repeats 7] \
        [--no-mem] [--profile]

Models come from their shipped configs (150 ADE20K classes, auxiliary heads included, as trained),
with SyncBN -> BN, random init (the same seed for both rows) and the data preprocessor padding to the
crop. Labels are scene-like (15 classes per image in 16x16 blocks, ~10% ignored). Steps of the two
models are interleaved (order alternating), fps from the median; the paired ratio is the median over
rounds of (+CAC time / baseline time) in the same round. Memory: each model alone in a fresh process,
peak RSS over one step after a warm-up step, minus the RSS before the build (weights, gradients,
momentum and activations). A figure-printing script, not a test.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cac.bench.memory import PROBE_ENV, reset_peak_rss, rss_kib  # noqa: E402
from cac.bench.timing import ForeignLoad, set_flush_denormal, time_interleaved  # noqa: E402
from cac.synthetic import seg_batch  # noqa: E402

PER_IMAGE = 15


def train_model_cfg(model: str, cac: bool, crop: int) -> dict:
    """The shipped config's model, CPU-ready: BN, no pretrained weights, padding to the crop."""
    from cac.mmseg.config import resolve_config
    from cac.mmseg.cfgtree import replace_norm, strip_pretrained

    cfg = resolve_config(model, "paper", cac=cac)
    m = strip_pretrained(replace_norm(cfg["model"], "SyncBN", "BN"))
    m["data_preprocessor"]["size"] = (crop, crop)
    return m


def make_train_batch(crop: int, batch: int, classes: int = 150, seed: int = 0) -> dict:
    """uint8 images and scene-like ``gt_sem_seg`` (``PER_IMAGE`` classes per image in 16² blocks, ~10% ignored)."""
    return seg_batch(crop, batch, classes, per_image=PER_IMAGE, block=16, seed=seed)


def build_train(model: str, cac: bool, crop: int) -> tuple[Any, Any]:
    """The model in train mode and an SGD optimizer wrapper (momentum, weight decay, as trained)."""
    from mmengine.optim import OptimWrapper

    from cac.mmseg.params import build_model

    torch.manual_seed(0)
    net = build_model(train_model_cfg(model, cac, crop)).train()
    optim = OptimWrapper(torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4))
    return net, optim


def step_fn(net: Any, optim: Any, batch: dict) -> Callable[[], None]:
    """One ``train_step``: preprocessor, loss forward, backward, SGD update."""
    def run() -> None:
        net.train_step(batch, optim)
    return run


def probe_memory(model: str, cac: bool, crop: int, batch: int) -> float:
    """MB of peak RSS over one train step (after a warm-up step), in a fresh process."""
    cmd = [sys.executable, __file__, "--probe", json.dumps(dict(model=model, cac=cac, crop=crop, batch=batch))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **PROBE_ENV})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1])["mem_mb"]


def _probe(job: dict) -> None:
    set_flush_denormal(True)
    before = rss_kib("VmRSS")
    net, optim = build_train(job["model"], job["cac"], job["crop"])
    data = make_train_batch(job["crop"], job["batch"])
    run = step_fn(net, optim, data)
    run()  # gradients and momentum buffers exist from here on, as in any later step
    reset_peak_rss()
    run()
    print(json.dumps({"mem_mb": (rss_kib("VmHWM") - before) / 1024.0}))


def profile_diff(fns: dict[str, Callable[[], None]], top: int = 15) -> None:
    """Per-op self CPU time of one step of each model, largest differences first."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for label, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        totals[label] = collections.Counter({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
    base, cac = totals["baseline"], totals["+CAC"]
    print(f"    profile (ms, one step): baseline {sum(base.values()):.0f}, +CAC {sum(cac.values()):.0f}")
    keys = sorted(set(base) | set(cac), key=lambda k: -abs(cac[k] - base[k]))[:top]
    for k in keys:
        print(f"      {k:<42} {base[k]:9.1f} {cac[k]:9.1f} {cac[k] - base[k]:+9.1f}")


def bench_model(model: str, crop: int, batch: int, warmup: int, repeats: int, mem: bool, profile: bool) -> dict:
    data = make_train_batch(crop, batch)
    built = {"baseline": build_train(model, False, crop), "+CAC": build_train(model, True, crop)}
    fns = {k: step_fn(net, optim, data) for k, (net, optim) in built.items()}
    with ForeignLoad() as load:
        times = time_interleaved(fns, warmup, repeats)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = statistics.median(c / b for c, b in zip(times["+CAC"], times["baseline"]))
    out = {"model": model, "base_ms": med["baseline"], "cac_ms": med["+CAC"], "ratio": med["+CAC"] / med["baseline"],
           "paired": paired, "foreign": load.cores}
    if profile:
        profile_diff(fns)
    del built, fns
    if mem:
        out["base_mb"] = probe_memory(model, False, crop, batch)
        out["cac_mb"] = probe_memory(model, True, crop, batch)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fcn-mv2", "upernet-swin-t"])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-mem", dest="mem", action="store_false", help="skip the memory probes")
    ap.add_argument("--profile", action="store_true", help="print the ops whose time differs most")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    if args.probe:
        _probe(json.loads(args.probe))
        return 0
    set_flush_denormal(True)  # random init can leave subnormals that slow x86 ~100x; trained nets do not
    print(f"train iteration (preprocess + forward + backward + SGD), crop {args.crop}, batch {args.batch}, "
          f"150 classes; warm-up {args.warmup}, median of {args.repeats} interleaved; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<16} {'baseline ms':>12} {'+CAC ms':>9} {'ratio':>7} {'paired':>7} {'base MB':>9} {'+CAC MB':>9} "
          f"{'mem ratio':>9} {'others':>7}")
    for model in args.models:
        r = bench_model(model, args.crop, args.batch, args.warmup, args.repeats, args.mem, args.profile)
        mem = (f"{r['base_mb']:>9.1f} {r['cac_mb']:>9.1f} {r['cac_mb'] / r['base_mb']:>8.3f}x" if args.mem
               else f"{'—':>9} {'—':>9} {'—':>9}")
        print(f"{model:<16} {r['base_ms']:>12.1f} {r['cac_ms']:>9.1f} {r['ratio']:>6.3f}x {r['paired']:>6.3f}x {mem} "
              f"{r['foreign']:>7.2f}", flush=True)
    print("others: cores' worth of CPU other processes used during the timing (> 0.25: rerun on a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
