"""GPU check: what CAC costs on one GPU, in one short script (about 5 minutes on an H100).

    benchmarks/gpu_check.sh [--dry] [--out DIR] [--sections table6 train_step paper]

1. Table 6: whole-image inference of UperNet + Swin-T with and without CAC at 512, 1280 and 2560
   (batch 1, random init, 150 classes): fps from CUDA-event times (interleaved rows, median) and
   ``torch.cuda.max_memory_allocated`` over build + one inference (each model alone).
2. Train step (preprocessor, forward, backward, SGD step) of FCN-MV2 and UperNet-Swin-T with and
   without CAC at crop 512, fp32 and AMP (mmengine's AmpOptimWrapper): the CAC/baseline time ratio
   paired per round, and the peak memory of each.
3. The paper preset end to end: UperNet-Swin-T +-CAC, 50 iterations of mmengine's Runner on the tiny
   ADE20K (``cac-exp data tiny ade20k``), random init, the paper's total batch 16: it/s and peak memory.

``--dry`` runs every section on the CPU at toy sizes (64 px, 2 iterations): the test suite uses it.
Figures are printed and written to ``OUT/gpu_check.json``; no MLflow (a bare GPU node needs none).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

SECTIONS = ("table6", "train_step", "paper")


def cuda_event_times(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call from CUDA events, the order of the functions rotating every round."""
    labels = list(fns)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for rep in range(warmup + repeats):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[label]()
            end.record()
            end.synchronize()
            if rep >= warmup:
                times[label].append(start.elapsed_time(end) / 1e3)
    return times


def timed(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, list[float]]:
    if device == "cuda":
        return cuda_event_times(fns, warmup, repeats)
    from cac.bench.timing import time_interleaved

    return time_interleaved(fns, warmup, repeats)


def peak_mb(device: str, fn: Callable[[], Any]) -> float | None:
    """Peak allocated MB over ``fn`` (CUDA only; the CPU's RSS is not comparable)."""
    if device != "cuda":
        fn()
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _pct(a: float, b: float) -> float:
    return (a / b - 1.0) * 100.0


def section_table6(device: str, dry: bool) -> dict:
    from cac.bench.models import bench_model_cfg, build_eval_model, inference_fn
    from cac.exp.spec import load_spec

    spec = load_spec(str(ROOT / "ablations" / "table6.yaml"))
    rows = {r.label: r for r in spec.rows}
    sizes, warmup, repeats = ([64], 1, 2) if dry else ([512, 1280, 2560], 3, 10)
    cfgs = {label: bench_model_cfg(spec, row, "paper") for label, row in rows.items()}
    memory: dict[str, dict[int, float | None]] = {label: {size: None for size in sizes} for label in rows}
    for label, cfg in cfgs.items():  # each model alone: weights + activations of one inference
        for size in sizes if device == "cuda" else []:  # the CPU's RSS is not comparable: not measured
            def build_and_infer(cfg=cfg, size=size) -> None:
                model = build_eval_model(cfg, device)
                inference_fn(model, size, 1)()
                del model
            build_and_infer()  # cuDNN's autotuner tries workspace-hungry algorithms on a new shape: not counted
            memory[label][size] = peak_mb(device, build_and_infer)
    built = {label: build_eval_model(cfg, device) for label, cfg in cfgs.items()}
    out: dict = {"sizes": {}}
    for size in sizes:
        times = timed({label: inference_fn(m, size, 1) for label, m in built.items()}, warmup, repeats, device)
        fps = {label: 1.0 / statistics.median(t) for label, t in times.items()}
        out["sizes"][size] = {label: {"fps": fps[label], "mem_mb": memory[label][size]} for label in rows}
        base, ours = out["sizes"][size]["Baseline"], out["sizes"][size]["Ours"]
        base["fps_delta_pct"], ours["fps_delta_pct"] = 0.0, _pct(ours["fps"], base["fps"])
        if base["mem_mb"]:
            ours["mem_delta_pct"] = _pct(ours["mem_mb"], base["mem_mb"])
        print(f"table6 {size:>5}px  fps {base['fps']:8.2f} -> {ours['fps']:8.2f} ({ours['fps_delta_pct']:+.2f}%)"
              + (f"  mem MB {base['mem_mb']:9.1f} -> {ours['mem_mb']:9.1f} ({ours['mem_delta_pct']:+.2f}%)"
                 if base["mem_mb"] else ""), flush=True)
    del built
    return out


def section_train_step(device: str, dry: bool) -> dict:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    from train_step import build_train, make_train_batch, step_fn

    crop, batch, warmup, repeats = (64, 2, 0, 1) if dry else (512, 4, 3, 10)
    precisions = ["fp32"] + (["amp"] if device == "cuda" else [])  # mmengine's AMP wrapper needs a GPU
    out: dict = {}
    for model in ("fcn-mv2", "upernet-swin-t"):
        for precision in precisions:
            nets = {}
            for label, cac in (("baseline", False), ("+CAC", True)):
                net, optim = build_train(model, cac, crop)
                net = net.to(device)
                sgd = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
                optim = AmpOptimWrapper(optimizer=sgd) if precision == "amp" else OptimWrapper(sgd)
                nets[label] = (net, optim)
            data = make_train_batch(crop, batch)
            fns = {label: step_fn(net, optim, data) for label, (net, optim) in nets.items()}
            for fn in fns.values() if device == "cuda" else []:  # optimizer state exists, cuDNN autotuned
                fn()
            mem = {label: peak_mb(device, fn) for label, fn in fns.items()}
            times = timed(fns, warmup, repeats, device)
            paired = statistics.median(c / b for c, b in zip(times["+CAC"], times["baseline"]))
            med = {label: statistics.median(t) * 1e3 for label, t in times.items()}
            key = f"{model} {precision}"
            out[key] = {"base_ms": med["baseline"], "cac_ms": med["+CAC"], "ratio": paired,
                        "base_mb": mem["baseline"], "cac_mb": mem["+CAC"], "crop": crop, "batch": batch}
            print(f"train_step {key:<22} {med['baseline']:8.1f} ms -> {med['+CAC']:8.1f} ms  ratio {paired:.3f}"
                  + (f"  peak MB {mem['baseline']:9.1f} -> {mem['+CAC']:9.1f}" if mem["baseline"] else ""), flush=True)
            del nets, fns
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


class _Clock:
    """An mmengine hook that times training iterations after a warm-up (CUDA synchronised)."""

    def __new__(cls, warmup: int, device: str):
        from mmengine.hooks import Hook

        class Clock(Hook):
            priority = "VERY_HIGH"  # before mmengine's logger, which resets CUDA's peak-memory counter

            def __init__(self) -> None:
                self.t0, self.count, self.peak = None, 0, 0.0

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
                if device == "cuda":
                    torch.cuda.synchronize()
                    if self.t0 is not None:
                        self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**20)
                if runner.iter + 1 == warmup:
                    self.t0 = time.perf_counter()
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                elif runner.iter + 1 > warmup:
                    self.count += 1
                    self.seconds = time.perf_counter() - self.t0

        return Clock()


def section_paper(device: str, dry: bool, work: Path) -> dict:
    from mmengine.config import Config
    from mmengine.runner import Runner

    from cac.data.tiny import make_tiny
    from cac.exp.options import RunOptions
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec

    data = work / "data"
    os.environ["CAC_DATA_ROOT"] = str(data)
    make_tiny("ade20k", data, train=16, val=2, size=96 if dry else 512)
    iters, warmup = (2, 1) if dry else (50, 10)
    options = {"train_cfg.max_iters": iters, "train_cfg.val_interval": iters,
               "default_hooks.checkpoint.interval": iters, "default_hooks.logger.interval": 10,
               "train_dataloader.num_workers": 0 if dry else 4, "train_dataloader.persistent_workers": not dry,
               "val_dataloader.num_workers": 0, "val_dataloader.persistent_workers": False}
    if dry:  # toy crops on the CPU
        options.update({"train_dataloader.batch_size": 2, "train_dataloader.dataset.pipeline.2.scale": (128, 64),
                        "train_dataloader.dataset.pipeline.3.crop_size": (64, 64),
                        "model.data_preprocessor.size": (64, 64),
                        "val_dataloader.dataset.pipeline.1.scale": (128, 64), "test_pipeline.1.scale": (128, 64)})
    spec = load_spec(str(ROOT / "experiments" / "table1_ade20k.yaml"))
    out: dict = {}
    for label in ("upernet-swin-t", "upernet-swin-t+cac"):
        unit = make_unit(spec, spec.row(label), 0, "paper", work_root=work / "runs",
                         options=RunOptions(cfg_options=options, no_pretrained=True, expected={"train": 16, "val": 2}))
        cfg = Config(unit.cfg)
        cfg.log_level = "WARNING"
        runner = Runner.from_cfg(cfg)
        clock = _Clock(warmup, device)
        runner.register_hook(clock)
        t0 = time.perf_counter()
        runner.train()
        total = time.perf_counter() - t0
        its = clock.count / clock.seconds if clock.count else float("nan")
        peak = clock.peak if device == "cuda" else None
        miou = runner.message_hub.get_scalar("val/mIoU").current() if "val/mIoU" in runner.message_hub.log_scalars else None
        out[label] = {"iters": iters, "it_per_s": its, "peak_mb": peak, "seconds": total,
                      "batch": cfg.train_dataloader.batch_size, "val_mIoU": miou}
        print(f"paper {label:<20} {iters} iters in {total:6.1f} s, {its:6.2f} it/s after {warmup} warm-up"
              + (f", peak MB {peak:9.1f}" if peak else "") + f", batch {cfg.train_dataloader.batch_size}", flush=True)
        del runner
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    base, ours = out["upernet-swin-t"], out["upernet-swin-t+cac"]
    out["it_ratio"] = ours["it_per_s"] / base["it_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, toy sizes: checks the script, measures nothing")
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import cac  # noqa: F401  (registers CACHead and the datasets)

    device = "cpu" if args.dry else "cuda"
    if args.dry:
        from cac.bench.timing import set_flush_denormal

        set_flush_denormal(True)  # random init leaves subnormals that slow x86 CPUs ~100x
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry to check the script on the CPU", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    result: dict = {"device": name, "torch": torch.__version__, "dry": args.dry, "sections": {}}
    print(f"gpu_check on {name}, torch {torch.__version__}{' (dry run)' if args.dry else ''}", flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            t0 = time.perf_counter()
            if section == "table6":
                result["sections"][section] = section_table6(device, args.dry)
            elif section == "train_step":
                result["sections"][section] = section_train_step(device, args.dry)
            else:
                result["sections"][section] = section_paper(device, args.dry, Path(tmp))
            result["sections"][section]["seconds"] = time.perf_counter() - t0
            (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["seconds"] = time.perf_counter() - t_all
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"gpu_check: {result['seconds']:.0f} s; figures in {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
