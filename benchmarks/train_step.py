"""Training cost of CAC: time and peak memory of one train iteration (data preprocessor, forward,
backward, SGD step) with and without CAC, on the real mmseg models at a small crop.

    flock /tmp/cac-cpu.lock .venv/bin/python benchmarks/train_step.py \
        [--models fcn-mv2 upernet-swin-t] [--crop 256] [--batch 2] [--warmup 2] [--repeats 7] \
        [--variants baseline +CAC "+CAC official" official +SSA +GMMSeg +ProtoSeg] [--no-mem] [--profile]

Variants (``VARIANTS``): ``baseline`` (no CAC), ``+CAC`` (ours, the paper profile), ``+CAC official``
(ours with ``profile: official``: the official code's choices), ``official`` (the official heads'
training computation, re-derived in ``benchmarks/official_cac.py``, on the same model and weights) and,
on request, ``+SSA`` (``profile: ssa``: SSA-Seg, CAC's successor), ``+GMMSeg`` and ``+ProtoSeg`` (the
other pixel classifiers of ``ablations/classifiers.yaml``).
``ours ÷ official`` compares the two computations of the same loss (``+CAC official`` ÷ ``official``).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_cac, also when imported from elsewhere

import torch  # noqa: E402

from cac.bench.memory import PROBE_ENV, reset_peak_rss, rss_kib  # noqa: E402
from cac.bench.timing import ForeignLoad, set_flush_denormal, time_interleaved  # noqa: E402
from cac.synthetic import seg_batch  # noqa: E402

PER_IMAGE = 15
# variant -> CAC options for resolve_config (None: the plain model), or another classifier (a dict
# with a ``type``). GMMSeg as its ADE20K config (8 components) with 1000 memory slots, as
# ablations/classifiers_cost.yaml: the official 32000 hold 9.8 GB at 150 classes x 8 x 64 dims, which
# every step writes into and every fifth step's EM reads whole)
VARIANTS: dict[str, Any] = {"baseline": None, "+CAC": True, "+CAC official": {"profile": "official"},
                            "official": {"profile": "official"}, "+SSA": {"profile": "ssa"},
                            "+GMMSeg": {"type": "gmmseg", "num_components": 8, "mem_size": 1000}, "+ProtoSeg": {"type": "protoseg"}}
# what runs without --variants: CAC's rows (SSA-Seg, CAC's successor, on request)
DEFAULT_VARIANTS = ["baseline", "+CAC", "+CAC official", "official"]


def variant_name(cac: bool | str) -> str:
    """``False``/``True`` (the historical flag) or a name of ``VARIANTS``."""
    name = {False: "baseline", True: "+CAC"}[cac] if isinstance(cac, bool) else cac
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {cac!r}; known: {list(VARIANTS)}")
    return name


def train_model_cfg(model: str, cac: bool | str, crop: int) -> dict:
    """The shipped config's model, CPU-ready: BN, no pretrained weights, padding to the crop.
    ``cac``: ``False`` (baseline), ``True`` (+CAC) or a name of ``VARIANTS``."""
    from cac.mmseg.config import resolve_config
    from cac.mmseg.cfgtree import replace_norm, strip_pretrained

    name = variant_name(cac)
    chosen = VARIANTS[name]
    other = isinstance(chosen, dict) and "type" in chosen
    cfg = resolve_config(model, "paper", cac=False if other else chosen, classifier=chosen if other else None)
    m = strip_pretrained(replace_norm(cfg["model"], "SyncBN", "BN"))
    m["data_preprocessor"]["size"] = (crop, crop)
    if name == "official":
        from official_cac import official_model_cfg  # registers OfficialCACHead

        m = official_model_cfg(m)
    return m


def make_train_batch(crop: int, batch: int, classes: int = 150, seed: int = 0) -> dict:
    """uint8 images and scene-like ``gt_sem_seg`` (``PER_IMAGE`` classes per image in 16² blocks, ~10% ignored)."""
    return seg_batch(crop, batch, classes, per_image=PER_IMAGE, block=16, seed=seed)


def build_train(model: str, cac: bool | str, crop: int) -> tuple[Any, Any]:
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


def probe_memory(model: str, cac: bool | str, crop: int, batch: int) -> float:
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


def bench_model(model: str, crop: int, batch: int, warmup: int, repeats: int, mem: bool, profile: bool,
                variants: list[str] = ("baseline", "+CAC")) -> dict:
    """Median ms (and peak MB) of each variant's step, timed interleaved in one run; ``paired``: the
    median over rounds of each variant's time ÷ the baseline's in the same round."""
    data = make_train_batch(crop, batch)
    built = {v: build_train(model, v, crop) for v in variants}
    fns = {k: step_fn(net, optim, data) for k, (net, optim) in built.items()}
    with ForeignLoad() as load:
        times = time_interleaved(fns, warmup, repeats)
    out: dict = {"model": model, "foreign": load.cores, "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                 "times": times}
    if profile and {"baseline", "+CAC"} <= set(fns):
        profile_diff(fns)
    del built, fns
    if mem:
        out["mb"] = {v: probe_memory(model, v, crop, batch) for v in variants}
    return out


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s time ÷ ``den``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def print_ratios(r: dict, num: str, den: str) -> None:
    if num not in r["ms"] or den not in r["ms"]:
        return
    mem = f", memory {r['mb'][num] / r['mb'][den]:.3f}x" if "mb" in r else ""
    print(f"    {num} ÷ {den}: time {r['ms'][num] / r['ms'][den]:.3f}x (paired {paired(r['times'], num, den):.3f}x)"
          f"{mem}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fcn-mv2", "upernet-swin-t"])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help="rows timed side by side (baseline first gives the ratios to it)")
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
    print(f"{'model':<16} {'variant':<14} {'ms':>9} {'÷ base':>7} {'paired':>7} {'peak MB':>9} {'÷ base':>7}")
    for model in args.models:
        r = bench_model(model, args.crop, args.batch, args.warmup, args.repeats, args.mem, args.profile,
                        args.variants)
        base = "baseline" if "baseline" in r["ms"] else None
        for v, ms in r["ms"].items():
            ratio = f"{ms / r['ms'][base]:>6.3f}x {paired(r['times'], v, base):>6.3f}x" if base else f"{'—':>7} {'—':>7}"
            mb = r.get("mb", {}).get(v)
            mem = (f"{mb:>9.1f} " + (f"{mb / r['mb'][base]:>6.3f}x" if base else f"{'—':>7}")) if mb else f"{'—':>9} {'—':>7}"
            print(f"{model:<16} {v:<14} {ms:>9.1f} {ratio} {mem}", flush=True)
        print_ratios(r, "+CAC official", "official")  # ours ÷ official: the same loss, two computations
        print_ratios(r, "+CAC", "official")
        print(f"    others: {r['foreign']:.2f}", flush=True)
    print("others: cores' worth of CPU other processes used during the timing (> 0.25: rerun on a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
