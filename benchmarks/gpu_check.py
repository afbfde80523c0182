"""GPU check: what CAC costs on one GPU, in one short script (about 5 minutes on an H100).

    benchmarks/gpu_check.sh [--dry] [--out DIR] [--sections table6 train_step paper]

1. Table 6: whole-image inference of UperNet + Swin-T with and without CAC at 512, 1280 and 2560
   (batch 1, random init, 150 classes): fps from CUDA-event times (interleaved rows, median) and
   ``torch.cuda.max_memory_allocated`` over build + one inference (each model alone).
2. Train step (preprocessor, forward, backward, SGD step) of FCN-MV2 and UperNet-Swin-T with and
   without CAC at crop 512, fp32 and AMP (mmengine's AmpOptimWrapper): the CAC/baseline time ratio
   paired per round, and the peak memory of each.
3. The paper preset end to end: UperNet-Swin-T +-CAC, 50 iterations of mmengine's Runner on the tiny
   ADE20K (``cac-exp data tiny ade20k``), random init, the paper's total batch 16: it/s and peak memory;
   again at ``--batch-per-gpu 4`` (4 images per micro-batch, 4 micro-batches per iteration: 50
   optimizer steps of 16 images; an iteration is an optimizer step either way).
4. ``table6_fp32``: Table 6 again with TF32 off for cuDNN and matmuls (the control: every layer and
   CAC's products in strict fp32, as on the paper's 2080Ti); ``table6`` runs at torch's defaults.
5. ``resume``: UperNet-Swin-T + CAC at preset paper, batch 16: 10 iterations and a
   checkpoint, then resumed at 10 by cac's loop and by mmengine's: seconds to the first resumed
   iteration, and the images loaded when it began (counted at the dataset: a replay loads the k
   skipped batches first).
6. ``profile``: ``torch.profiler``'s top CUDA kernels of one train step (UperNet-Swin-T, crop 512,
   batch 4) and of one 2560 inference, baseline vs +CAC, and the host syncs per train step
   (``torch.cuda.set_sync_debug_mode``; mmengine's hooks not included).
7. ``memory_model``: ``benchmarks/memory_model.py``'s prediction (a shape-only replay on the meta
   device) of the peak memory of sections 2 and 3's fp32 settings, to set beside their measurement.

``--dry`` runs every section on the CPU at toy sizes (64 px, a few iterations): the test suite uses it.
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

SECTIONS = ("table6", "table6_fp32", "train_step", "paper", "resume", "profile", "memory_model")


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

    from fused_check import check
    from train_step import build_train, make_train_batch, step_fn

    crop, batch, warmup, repeats = (64, 2, 0, 1) if dry else (512, 4, 3, 10)
    precisions = ["fp32"] + (["amp"] if device == "cuda" else [])  # mmengine's AMP wrapper needs a GPU
    out: dict = {"equivalence": check(device)}  # the fused CE and the classifier against the unfused path
    for model in ("fcn-mv2", "upernet-swin-t"):
        for precision in precisions:
            nets = {}
            # ours (paper profile; official profile) and the official heads' computation (benchmarks/official_cac.py)
            for label, cac in (("baseline", False), ("+CAC", True), ("+CAC official", "+CAC official"),
                               ("official", "official")):
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
            vs_official = statistics.median(c / o for c, o in zip(times["+CAC official"], times["official"]))
            out[key] = {"base_ms": med["baseline"], "cac_ms": med["+CAC"], "ratio": paired,
                        "base_mb": mem["baseline"], "cac_mb": mem["+CAC"], "crop": crop, "batch": batch,
                        "cac_official_ms": med["+CAC official"], "official_ms": med["official"],
                        "cac_official_mb": mem["+CAC official"], "official_mb": mem["official"],
                        "ratio_vs_official": vs_official}
            print(f"train_step {key:<22} {med['baseline']:8.1f} ms -> {med['+CAC']:8.1f} ms  ratio {paired:.3f}"
                  + (f"  peak MB {mem['baseline']:9.1f} -> {mem['+CAC']:9.1f}" if mem["baseline"] else ""), flush=True)
            print(f"train_step {key:<22} official {med['official']:8.1f} ms, ours (official profile) "
                  f"{med['+CAC official']:8.1f} ms: ours / official {vs_official:.3f}"
                  + (f"  peak MB {mem['official']:9.1f} vs {mem['+CAC official']:9.1f}" if mem["official"] else ""),
                  flush=True)
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

            def before_train(self, runner) -> None:
                if warmup == 0:  # every iteration is timed
                    self.t0 = time.perf_counter()

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


PAPER_ROWS = ("upernet-swin-t", "upernet-swin-t+cac")


def _tiny_ade(work: Path, dry: bool) -> None:
    from cac.data.tiny import make_tiny

    data = work / "data"
    os.environ["CAC_DATA_ROOT"] = str(data)
    if not (data / "ade").is_dir():
        make_tiny("ade20k", data, train=16, val=2, size=96 if dry else 512)


def _paper_unit(work: Path, dry: bool, label: str, iters: int, batch_per_gpu: int | None = None,
                checkpoint: bool = True):
    """A Table 1 row at preset paper on the tiny ADE20K, ``iters`` iterations (optimizer steps), random
    init; the paper's total batch 16 on one GPU, or ``batch_per_gpu`` with gradient accumulation.
    ``checkpoint=False``: no checkpoint at the end (Swin-T's weights and AdamW state are 0.7 GB)."""
    from cac.exp.options import RunOptions
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec

    _tiny_ade(work, dry)
    options = {"train_cfg.max_iters": iters, "train_cfg.val_interval": iters,
               "default_hooks.checkpoint.interval": iters, "default_hooks.logger.interval": 10,
               "train_dataloader.num_workers": 0 if dry else 4, "train_dataloader.persistent_workers": not dry,
               "val_dataloader.num_workers": 0, "val_dataloader.persistent_workers": False}
    if not checkpoint:
        options.update({"default_hooks.checkpoint.interval": iters + 1, "default_hooks.checkpoint.save_last": False})
    if dry:  # toy crops on the CPU
        options.update({"train_dataloader.dataset.pipeline.2.scale": (128, 64),
                        "train_dataloader.dataset.pipeline.3.crop_size": (64, 64),
                        "model.data_preprocessor.size": (64, 64),
                        "val_dataloader.dataset.pipeline.1.scale": (128, 64), "test_pipeline.1.scale": (128, 64)})
        if batch_per_gpu is None:
            options["train_dataloader.batch_size"] = 2
    spec = load_spec(str(ROOT / "experiments" / "table1_ade20k.yaml"))
    return make_unit(spec, spec.row(label), 0, "paper", work_root=work / "runs",
                     options=RunOptions(cfg_options=options, no_pretrained=True, expected={"train": 16, "val": 2},
                                        batch_per_gpu=batch_per_gpu))


def section_paper(device: str, dry: bool, work: Path) -> dict:
    from mmengine.runner import Runner

    from cac.mmseg.config import runner_config

    steps, warmup_steps = (2, 1) if dry else (50, 10)
    out: dict = {}
    for per_gpu in (None, 2 if dry else 4):
        for label in PAPER_ROWS if per_gpu is None or not dry else PAPER_ROWS[1:]:  # --dry: +CAC only
            key = label if per_gpu is None else f"{label} b{per_gpu}"
            iters, warmup = steps, warmup_steps  # optimizer steps, whatever the per-GPU batch
            if dry and per_gpu:  # one accumulation window, timed: the dry run checks the path, not the speed
                iters, warmup = 1, 0
            # the resume section writes and reads checkpoints; this one times training alone
            cfg = runner_config(_paper_unit(work, dry, label, iters, per_gpu, checkpoint=False).cfg)
            cfg.log_level = "WARNING"
            runner = Runner.from_cfg(cfg)
            clock = _Clock(warmup, device)
            runner.register_hook(clock)
            t0 = time.perf_counter()
            runner.train()
            total = time.perf_counter() - t0
            its = clock.count / clock.seconds if clock.count else float("nan")
            peak = clock.peak if device == "cuda" else None
            hub = runner.message_hub
            miou = hub.get_scalar("val/mIoU").current() if "val/mIoU" in hub.log_scalars else None
            batch, counts = cfg.train_dataloader.batch_size, cfg.optim_wrapper.get("accumulative_counts", 1)
            out[key] = {"iters": iters, "it_per_s": its, "images_per_s": its * batch * counts, "peak_mb": peak,
                        "seconds": total, "batch": batch, "accumulation": counts, "val_mIoU": miou}
            print(f"paper {key:<24} {iters} iters in {total:6.1f} s, {its:6.2f} it/s ({its * batch * counts:6.1f} img/s) after "
                  f"{warmup} warm-up" + (f", peak MB {peak:9.1f}" if peak else "")
                  + f", batch {batch} x {counts} accumulation", flush=True)
            del runner
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    base, ours = out["upernet-swin-t"], out["upernet-swin-t+cac"]
    out["it_ratio"] = ours["it_per_s"] / base["it_per_s"]
    return out


def section_table6_fp32(device: str, dry: bool) -> dict:
    """Table 6 with TF32 off for convolutions and matmuls alike: the control for the default run."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        print("table6 control: TF32 off (cuDNN and matmul)", flush=True)
        out = section_table6(device, dry)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    out["tf32"] = {"cudnn": False, "matmul": False}
    return out


def section_resume(device: str, dry: bool, work: Path) -> dict:
    """10 iterations and a checkpoint, then the first resumed iteration under each loop."""
    from mmengine.runner import Runner
    from resume import counted_loads, first_iteration_clock

    from cac.mmseg.config import runner_config
    from cac.mmseg.loops import LOOP_TYPE

    at = 2 if dry else 10  # batch 16 (--dry: 2): what mmengine's loop replays is 160 images
    unit = _paper_unit(work, dry, "upernet-swin-t+cac", at)
    cfg = runner_config(unit.cfg)
    cfg.log_level = "WARNING"
    Runner.from_cfg(cfg).train()
    ckpt = unit.work_dir / f"iter_{at}.pth"
    out: dict = {"at": at, "batch": cfg.train_dataloader.batch_size}
    for loop in (LOOP_TYPE, "IterBasedTrainLoop"):
        cfg = runner_config(unit.cfg)
        cfg.train_cfg.update(type=loop, max_iters=at + 2)  # stopped after one iteration: no val, no checkpoint
        cfg.default_hooks.checkpoint = None
        cfg.update(resume=True, load_from=str(ckpt), work_dir=str(work / f"resume-{loop}"), log_level="WARNING")
        batch = cfg.train_dataloader.batch_size
        with counted_loads(work / f"loads-{loop}.txt") as loads:
            runner = Runner.from_cfg(cfg)
            clock = first_iteration_clock(loads)
            runner.register_hook(clock)
            t0 = time.perf_counter()
            runner.train()
        # A replay has loaded the k skipped batches and the first one when the first iteration begins;
        # a seeking loop only the first and what its workers prefetch (at most workers x prefetch batches).
        prefetch = cfg.train_dataloader.get("num_workers", 0) * cfg.train_dataloader.get("prefetch_factor", 2)
        loaded = clock.loads_before_first
        out[loop] = {"first_iter_s": clock.t_first - clock.t_start, "train_to_first_iter_s": clock.t_first - t0,
                     "resumed_at": clock.start_iter, "loaded_before_first_iter": loaded,
                     "replayed": loaded >= (at + 1) * batch,
                     "distinguishable": max(1, prefetch) * batch < (at + 1) * batch}
        print(f"resume at {at}: {loop:<30} {out[loop]['first_iter_s']:7.3f} s to the first iteration "
              f"({out[loop]['train_to_first_iter_s']:.3f} s from train()), {loaded} images loaded before it "
              f"(a replay: >= {(at + 1) * batch}), replayed: {out[loop]['replayed']}", flush=True)
        del runner
        gc.collect()
    return out


def _device_ms(event, device: str) -> float:
    """Self time on the device (CUDA) or the CPU of a profiler entry, in ms."""
    if device == "cuda":
        us = getattr(event, "self_device_time_total", None)
        return (us if us is not None else event.self_cuda_time_total) / 1e3
    return event.self_cpu_time_total / 1e3


def top_kernels(fn: Callable[[], Any], device: str, top: int = 10) -> dict:
    """``torch.profiler`` over one call: total self time and the ``top`` entries (CUDA kernels on a GPU,
    CPU ops with ``--dry``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if _device_ms(e, device) > 0]
    total = sum(_device_ms(e, device) for e in events)
    rows = sorted(events, key=lambda e: -_device_ms(e, device))[:top]
    return {"total_ms": total, "top": [{"name": e.key[:90], "calls": e.count, "ms": _device_ms(e, device),
                                        "share": _device_ms(e, device) / total} for e in rows]}


def host_syncs(fn: Callable[[], Any]) -> int:
    """Synchronising CUDA calls made by ``fn`` (``torch.cuda.set_sync_debug_mode("warn")`` warns once each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def section_profile(device: str, dry: bool) -> dict:
    from mmengine.optim import OptimWrapper

    from train_step import build_train, make_train_batch, step_fn

    from cac.bench.models import bench_model_cfg, build_eval_model, inference_fn
    from cac.exp.spec import load_spec

    crop, batch, size = (64, 2, 64) if dry else (512, 4, 2560)
    out: dict = {"train_step": {}, "inference": {}, "crop": crop, "batch": batch, "size": size}
    for label, cac in (("baseline", False), ("+CAC", True)):
        net, _ = build_train("upernet-swin-t", cac, crop)
        net = net.to(device)
        optim = OptimWrapper(torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4))
        fn = step_fn(net, optim, make_train_batch(crop, batch))
        fn()  # optimizer state exists, cuDNN autotuned
        out["train_step"][label] = {**top_kernels(fn, device), "host_syncs": host_syncs(fn) if device == "cuda" else None}
        del net, optim, fn
        gc.collect()
    spec = load_spec(str(ROOT / "ablations" / "table6.yaml"))
    for row in spec.rows:
        model = build_eval_model(bench_model_cfg(spec, row, "paper"), device)
        fn = inference_fn(model, size, 1)
        fn()
        out["inference"][row.label] = top_kernels(fn, device)
        del model, fn
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for part in ("train_step", "inference"):
        for label, prof in out[part].items():
            syncs = prof.get("host_syncs")
            print(f"profile {part} {label}: {prof['total_ms']:.1f} ms self time"
                  + (f", {syncs} host syncs" if syncs is not None else ""), flush=True)
            for row in prof["top"][:5]:
                print(f"    {row['ms']:9.2f} ms {row['share'] * 100:5.1f}% x{row['calls']:<4} {row['name']}", flush=True)
    return out


def section_memory_model(dry: bool) -> dict:
    """Predicted peak MiB (meta replay, fp32) at the train step's and the paper run's batch, baseline and +CAC."""
    from memory_model import predicted_peak

    crop = 64 if dry else 512
    # the train_step section's two models at batch 4, the paper section's model at batch 16
    settings = [("upernet-swin-t", 2)] if dry else [("fcn-mv2", 4), ("upernet-swin-t", 4), ("upernet-swin-t", 16)]
    out: dict = {}
    for model, batch in settings:
        pred = {variant: predicted_peak(model, variant, batch, crop) for variant in ("baseline", "+CAC")}
        peak = {variant: p["total"] * 1024 for variant, p in pred.items()}
        # train_step's peak_mb subtracts what is allocated before the step (weights, momentum): compare
        # it with the activations and temporaries; the paper section's peak is absolute, like "total"
        step = {variant: (p["activations"] + p["temporaries"]) * 1024 for variant, p in pred.items()}
        out[f"{model} b{batch}"] = {"crop": crop, "batch": batch, "base_mb": peak["baseline"],
                                    "cac_mb": peak["+CAC"], "ratio": peak["+CAC"] / peak["baseline"],
                                    "base_step_mb": step["baseline"], "cac_step_mb": step["+CAC"]}
        print(f"memory_model {model} batch {batch}: predicted peak MiB {peak['baseline']:9.1f} -> "
              f"{peak['+CAC']:9.1f} ({peak['+CAC'] / peak['baseline']:.3f}x); above the weights and "
              f"optimizer {step['baseline']:9.1f} -> {step['+CAC']:9.1f}", flush=True)
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
    from cac.exp.provenance import source_tree, versions

    tree = source_tree()  # every figure names the code it was measured on
    commit, dirty = tree.get("mlflow.source.git.commit", "unknown"), tree.get("mlflow.source.git.dirty", "unknown")
    result: dict = {"device": name, "torch": torch.__version__, "dry": args.dry, "commit": commit, "dirty": dirty,
                    "versions": versions(), "sections": {},
                    "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}
    print(f"gpu_check on {name}, torch {torch.__version__}, commit {commit[:12]}"
          f"{' (uncommitted changes)' if dirty == 'true' else ''}{' (dry run)' if args.dry else ''}", flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            t0 = time.perf_counter()
            run = {"table6": lambda: section_table6(device, args.dry),
                   "table6_fp32": lambda: section_table6_fp32(device, args.dry),
                   "train_step": lambda: section_train_step(device, args.dry),
                   "paper": lambda: section_paper(device, args.dry, Path(tmp)),
                   "resume": lambda: section_resume(device, args.dry, Path(tmp)),
                   "profile": lambda: section_profile(device, args.dry),
                   "memory_model": lambda: section_memory_model(args.dry)}[section]
            result["sections"][section] = run()
            result["sections"][section]["seconds"] = time.perf_counter() - t0
            (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["seconds"] = time.perf_counter() - t_all
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"gpu_check: {result['seconds']:.0f} s; figures in {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
