"""Predicted GPU peak memory of a train step, from a shape-only replay on the meta device.

    .venv/bin/python benchmarks/memory_model.py [--models upernet-swin-t fcn-mv2] [--batch 16 4] \
        [--crop 512] [--variants baseline +CAC "+CAC official"] [--json OUT]

Every tensor is a meta tensor (shape and dtype, no data), so a paper-scale step (batch 16, 512², 150
classes, the shipped config with its auxiliary head) replays on a CPU in seconds. torch's
``MemTracker`` (``torch.distributed._tools.mem_tracker``) follows every storage through two steps of
forward, backward and the SGD update (momentum, weight decay, as trained) and reports the peak by
kind: parameters, gradients, optimizer state, activations kept for backward, temporaries.

Meta is not CPU, so CAC takes the paths it takes on CUDA: p through the head's ``conv_seg``, the fused
upsample + CE in groups of whole images. Not modelled: cuDNN/cuBLAS workspaces, the caching
allocator's rounding and fragmentation, the CUDA context, AMP (autocast has no meta backend). mmseg's
``accuracy`` indexes with a boolean mask, whose size depends on data; during the replay it is replaced
by a shape-only stand-in (a scalar without gradient, as the real one). How close this comes to
``torch.cuda.max_memory_allocated`` on an H100 is in RESULTS.md. A figure-printing script, not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

GIB = float(2 ** 30)


@contextlib.contextmanager
def shape_only_accuracy() -> Iterator[None]:
    """mmseg's ``accuracy`` replaced by a scalar of the right dtype and device while the replay runs."""
    import mmseg.models.decode_heads.decode_head as decode_head
    import mmseg.models.losses as losses

    def accuracy(pred: torch.Tensor, target: torch.Tensor, topk: Any = 1, thresh: Any = None,
                 ignore_index: Any = None) -> torch.Tensor:
        return pred.new_zeros(())

    saved = decode_head.accuracy, losses.accuracy
    decode_head.accuracy = losses.accuracy = accuracy
    try:
        yield
    finally:
        decode_head.accuracy, losses.accuracy = saved


def meta_batch(batch: int, crop: int) -> tuple[torch.Tensor, list]:
    """Preprocessed inputs and data samples with ``gt_sem_seg``, as meta tensors."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    inputs = torch.empty(batch, 3, crop, crop, device="meta")
    samples = []
    for _ in range(batch):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.empty(1, crop, crop, dtype=torch.long, device="meta"))
        sample.set_metainfo(dict(img_shape=(crop, crop), pad_shape=(crop, crop), ori_shape=(crop, crop)))
        samples.append(sample)
    return inputs, samples


def predicted_peak(model: str, variant: str, batch: int, crop: int) -> dict[str, float]:
    """GiB at the peak of two train steps of ``model`` (a ``train_step.VARIANTS`` name), by kind."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from cac.mmseg.params import build_model
    from train_step import train_model_cfg

    net = build_model(train_model_cfg(model, variant, crop)).train().to("meta")
    optim = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    inputs, samples = meta_batch(batch, crop)
    tracker = MemTracker()
    tracker.track_external(net, optim)
    with shape_only_accuracy(), tracker:
        for step in range(2):  # the second step has gradients and momentum buffers, as every later one
            losses = net.loss(inputs, samples)
            sum(v for k, v in losses.items() if "loss" in k).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            if step == 0:
                tracker.reset_mod_stats()  # per-module statistics only; the device peak runs on
    (per_device,) = tracker.get_tracker_snapshot("peak").values()
    kinds = {str(k).split(".")[-1].lower(): v / GIB for k, v in per_device.items()}
    return {"weights+grads+optimizer": kinds["param"] + kinds["buffer"] + kinds["grad"] + kinds["opt"],
            "activations": kinds["act"], "temporaries": kinds["temp"], "total": kinds["total"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["upernet-swin-t", "fcn-mv2"])
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 4])
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=["baseline", "+CAC", "+CAC official"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    from mmseg.utils import register_all_modules

    register_all_modules()
    rows = []
    print(f"predicted peak memory of a train step (meta replay; GiB), crop {args.crop}, 150 classes")
    print(f"{'model':<16} {'batch':>5} {'variant':<14} {'weights+opt':>11} {'activations':>11} "
          f"{'temporaries':>11} {'total':>8} {'÷ baseline':>10}")
    for model in args.models:
        for batch in args.batch:
            base = None
            for variant in args.variants:
                peak = predicted_peak(model, variant, batch, args.crop)
                base = peak["total"] if variant == "baseline" else base
                ratio = peak["total"] / base if base else float("nan")
                rows.append(dict(model=model, batch=batch, crop=args.crop, variant=variant, ratio=ratio, **peak))
                print(f"{model:<16} {batch:>5} {variant:<14} {peak['weights+grads+optimizer']:>11.3f} "
                      f"{peak['activations']:>11.3f} {peak['temporaries']:>11.3f} {peak['total']:>8.3f} "
                      f"{ratio:>9.3f}×")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
