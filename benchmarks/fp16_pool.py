"""Float16 soft pooling (Eq. 4) against float64 on the same fp16-rounded inputs: cac's per-class
power-of-two scaling beside masks normalised before the fp16 product, at 2560² inference (640²
features) and at 128² (32²); and the fp16 path's gradients against float64's.

    .venv/bin/python benchmarks/fp16_pool.py

Printed per size: the largest relative error of the prototypes (|x - ref| / max(|ref|, 1e-3)) for
each way, and the largest gradient error of the fp16 path as a share of the largest gradient entry.
One class covers most of the image (its mass ~ the pixel count), as at real inference sizes.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cac.core.functional import soft_pool  # noqa: E402


def reference(feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Eq. (4) in float64: softmax over classes, mean of f weighted by each class's masks."""
    prob = logits.double().flatten(2).softmax(1)
    return torch.bmm(prob, feats.double().flatten(2).transpose(1, 2)) / prob.sum(2, keepdim=True)


def normalised_first(feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The masks divided by their mass before the fp16 product (the way before the scaling)."""
    prob = logits.float().flatten(2).softmax(1)
    return torch.bmm((prob / prob.sum(2, keepdim=True)).half(), feats.flatten(2).transpose(1, 2))


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()


def measure(side: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(1, 8, side, side, generator=g) * 2).half()
    logits = (torch.randn(1, 6, side, side, generator=g) * 3).half()
    logits[:, 0] += 4
    ref = reference(feats, logits)
    f16, l16 = feats.clone().requires_grad_(), logits.clone().requires_grad_()
    out = soft_pool(f16, l16)
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream.half())
    f64, l64 = feats.double().requires_grad_(), logits.double().requires_grad_()
    reference(f64, l64).backward(upstream.double())
    grad = max(((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item() for a, b in ((f16, f64), (l16, l64)))
    return {"scaled": rel_error(out.detach(), ref), "normalised first": rel_error(normalised_first(feats, logits), ref),
            "grad": grad}


def main() -> int:
    print(f"float16 soft pooling vs float64 (torch {torch.__version__}, CPU); largest relative error")
    print(f"{'inference size':>15} {'features':>9} {'cac (scaled)':>13} {'normalised first':>17} {'fp16 grad / max':>16}")
    for size in (128, 2560):
        m = measure(size // 4)
        print(f"{size:>14}² {size // 4:>8}² {m['scaled']:>12.2%} {m['normalised first']:>16.2%} {m['grad']:>15.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
