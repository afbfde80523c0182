"""Three CPU costs around a training run, each beside what cac does instead, measured in one process:

1. the predicted class of (N, C, H, W) logits: ``argmax(1)`` vs ``max(1).indices``
   (:func:`cac.mmseg.evaluation.predicted_classes`; the same indices);
2. ``gc.collect()`` (mmengine runs one per dataset it builds) with the imported heap as it is, and
   frozen (:func:`cac.exp.runner.heap_frozen`);
3. the text of a large config (the walkthrough's SegFormer-B0) formatted by yapf, as mmengine prints
   it into its log, work dir and checkpoints, vs unformatted (:func:`cac.mmseg.config.runner_config`).

    .venv/bin/python benchmarks/cpu_overheads.py [--repeats 5]

Medians of ``--repeats`` calls (after one warm-up); a figure-printing script, not a test.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(16, 19, 128, 256), (1, 150, 512, 512), (16, 150, 64, 64), (4, 8, 96, 96)]


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    import cac  # noqa: F401  (the imports a run has: torch, mmseg, mmengine)
    import cac.exp.runner  # noqa: F401  (mlflow)
    from cac.exp.runner import heap_frozen
    from cac.mmseg.config import resolve_config, runner_config
    from cac.mmseg.evaluation import predicted_classes

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in SHAPES:
        logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(logits.argmax(1), predicted_classes(logits))
        slow, fast = (median_s(lambda f=f: f(logits), args.repeats) for f in (lambda x: x.argmax(1), predicted_classes))
        print(f"predicted class {str(shape):<20} argmax(1) {slow * 1e3:8.1f} ms   max(1).indices "
              f"{fast * 1e3:8.1f} ms   x{slow / fast:5.1f}")

    whole = median_s(gc.collect, args.repeats)
    with heap_frozen():
        frozen = median_s(gc.collect, args.repeats)
    print(f"gc.collect()    heap as imported {whole * 1e3:8.1f} ms   frozen {frozen * 1e3:8.3f} ms")

    from mmengine.config import Config

    with tempfile.TemporaryDirectory() as tmp:  # README's walkthrough config
        model = Path(tmp) / "my_segformer.py"
        model.write_text("_base_ = ['mmseg::segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024.py']\n")
        cfg = resolve_config(str(model), "quick", cac=True)

    t0 = time.perf_counter()
    Config(dict(cfg)).pretty_text  # the process's first yapf call also loads its grammar
    first = time.perf_counter() - t0
    formatted = median_s(lambda: Config(dict(cfg)).pretty_text, args.repeats)
    plain = median_s(lambda: runner_config(cfg).pretty_text, args.repeats)
    print(f"config text     SegFormer-B0 +CAC: yapf-formatted {formatted * 1e3:8.1f} ms (the process's first: "
          f"{first * 1e3:.0f} ms)   unformatted {plain * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
