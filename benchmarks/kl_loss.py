"""The distillation loss alone: ``cac.functional.entropy_kl_loss`` (class-wise + entropy, Eq. 11)
against a plain per-class Python loop, the way the official code computes it (for each class present:
mask its pixels, compute the entropy-weighted soft cross-entropy there, average; then average over
the classes).

    flock /tmp/cac-cpu.lock .venv/bin/python benchmarks/kl_loss.py [--classes 150 171] [--batch 4]
        [--size 128] [--repeats 20] [--per-image 15] [--backward]

Prints, per class count, the classes present, both timings (median of interleaved repetitions), the
speed-up, and the largest difference between the two losses (and their gradients with --backward).
A figure-printing script, not a test. The loop is a timing baseline, not a reference: it makes the
same reduction choices as ``entropy_kl_loss`` (sums over the batch, mean over the classes present,
the same clamp), so that both sides time the same loss, and therefore cannot show a deviation from
Eq. (11). ``tests/test_functional.py`` checks ``entropy_kl_loss`` (values and gradients) against a
literal transcription of Eqs. (7), (9), (10) and (11); ``tests/test_benchmark.py`` only checks that
this loop and the vectorised loss agree, so the timings compare like with like.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cac.bench.timing import ForeignLoad, time_interleaved  # noqa: E402
from cac.core.functional import entropy_kl_loss  # noqa: E402
from cac.synthetic import kl_inputs  # noqa: E402

IGNORE = 255


def classwise_kl_loop(student: Tensor, teacher: Tensor, labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Eq. (11) one class at a time: ``mean_k [sum_{y_i=k} H_i l_i / sum_{y_i=k} H_i]`` over present k.

    ``l_i = -sum_j softmax(teacher)_ij log softmax(student)_ij``, ``H_i`` the teacher's entropy. A
    ``unique`` and a boolean gather per class, as a per-class loop does; nothing is shared between
    classes. The timing baseline only (see the module docstring): not a correctness reference.
    """
    n = student.shape[1]
    s = student.permute(0, 2, 3, 1).reshape(-1, n).float()
    t = teacher.detach().permute(0, 2, 3, 1).reshape(-1, n).float()
    y = labels.reshape(-1)
    per_class = []
    for k in torch.unique(y).tolist():  # a host sync, then one iteration per class present
        if k == ignore_index or not 0 <= k < n:
            continue
        sel = y == k
        log_s = s[sel].log_softmax(dim=1)
        log_t = t[sel].log_softmax(dim=1)
        p_t = log_t.exp()
        loss = -(p_t * log_s).sum(dim=1)
        ent = -(p_t * log_t).sum(dim=1)
        per_class.append((ent * loss).sum() / ent.sum().clamp_min(1e-6))
    if not per_class:
        return student.sum() * 0.0
    return torch.stack(per_class).mean().to(student.dtype)


def _step(fn: Callable[..., Tensor], student: Tensor, teacher: Tensor, labels: Tensor,
          backward: bool) -> Callable[[], None]:
    def run() -> None:
        s = student.detach().requires_grad_(backward)
        loss = fn(s, teacher, labels)
        if backward:
            loss.backward()
    return run


def compare(classes: int, batch: int, size: int, per_image: int, repeats: int, backward: bool) -> dict:
    """Agreement and median times of the vectorised loss and the loop on one input."""
    student, teacher, labels = kl_inputs(batch, classes, size, per_image)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    vec, loop = entropy_kl_loss(s1, teacher, labels), classwise_kl_loop(s2, teacher, labels)
    vec.backward()
    loop.backward()
    fns = {"vectorised": _step(entropy_kl_loss, student, teacher, labels, backward),
           "loop": _step(classwise_kl_loop, student, teacher, labels, backward)}
    with ForeignLoad() as load:
        times = time_interleaved(fns, warmup=2, repeats=repeats)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    valid = labels[labels != IGNORE]
    return {"classes": classes, "present": int(valid.unique().numel()), "loss": vec.item(),
            "loss_diff": abs(vec.item() - loop.item()), "grad_diff": float((s1.grad - s2.grad).abs().max()),
            "vectorised_ms": med["vectorised"], "loop_ms": med["loop"], "speedup": med["loop"] / med["vectorised"],
            "foreign": load.cores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[150, 171])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="logits are size x size (the loss runs at feature size)")
    ap.add_argument("--per-image", type=int, default=15, help="classes present in each image")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--backward", action="store_true", help="time forward + backward (training) instead of forward")
    args = ap.parse_args(argv)
    what = "forward + backward" if args.backward else "forward"
    print(f"entropy_kl_loss (class-wise + entropy, Eq. 11) vs a per-class loop; B={args.batch}, "
          f"{args.size}x{args.size} logits, {args.per_image} classes per image, ~10% ignored; {what}, "
          f"median of {args.repeats} interleaved; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'N':>5} {'present':>8} {'loss':>9} {'|Δloss|':>9} {'|Δgrad|max':>11} {'vectorised':>11} {'loop':>9} "
          f"{'speed-up':>9} {'others':>7}")
    for n in args.classes:
        r = compare(n, args.batch, args.size, args.per_image, args.repeats, args.backward)
        print(f"{n:>5} {r['present']:>8} {r['loss']:>9.5f} {r['loss_diff']:>9.2e} {r['grad_diff']:>11.2e} "
              f"{r['vectorised_ms']:>9.2f}ms {r['loop_ms']:>7.2f}ms {r['speedup']:>8.2f}x {r['foreign']:>7.2f}")
    print("others: cores' worth of CPU other processes used during the timing (> 0.25: rerun on a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
