"""Equivalence checks of CAC's fused and precision-policy paths on a device (CUDA in `gpu_check`).

The tests pin these on CPU in float64; on a GPU the code takes other branches (``upsampled_cross_entropy``
chunks whole images through ``F.interpolate``; p goes through ``conv_seg``'s cuDNN convolution; the
products follow cuDNN's TF32 setting), so ``gpu_check`` runs :func:`check` on the device:

- the fused upsample + CE against ``F.interpolate`` + ``F.cross_entropy``: values and gradients, float64
  and float32, ``align_corners`` both ways, ignored pixels, odd sizes, both chunkings;
- the classifier's p, p_p, p_y (training) and the test-time output against the same module in float64
  on the CPU, with the device's TF32 policy on (the default) and off.

    python benchmarks/fused_check.py [--device cuda]

Prints the largest differences and returns them; a figure-printing script, not a test.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cac.core.classifier import ContextAwareClassifier  # noqa: E402
from cac.core.functional import upsampled_cross_entropy  # noqa: E402


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def fused_ce_diffs(device: str) -> dict[str, float]:
    """Largest |fused - unfused| of the per-pixel loss and of the logits' gradient, per case."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for align_corners in (False, True):
            for chunking in ("rows", "images"):
                x = torch.randn(3, 19, 13, 11, generator=g, dtype=dtype).to(device).requires_grad_(True)
                labels = torch.randint(0, 19, (3, 97, 83), generator=g)
                labels[0, :7] = 255
                labels[2, 40:50, 10:60] = 255
                labels = labels.to(device)
                ref = F.cross_entropy(F.interpolate(x, size=(97, 83), mode="bilinear", align_corners=align_corners),
                                      labels, reduction="none", ignore_index=255)
                got = upsampled_cross_entropy(x, labels, align_corners=align_corners, chunking=chunking)
                w = torch.rand(ref.shape, generator=g, dtype=dtype).to(device)
                (g_ref,) = torch.autograd.grad(ref, x, w)
                (g_got,) = torch.autograd.grad(got, x, w)
                key = f"{str(dtype).split('.')[-1]} ac={align_corners} {chunking}"
                out[key] = max(_max_diff(got, ref), _max_diff(g_got, g_ref))
    return out


def classifier_diffs(device: str) -> dict[str, float]:
    """Largest |device fp32 - CPU fp64| of p, p_p, p_y and the test-time output, TF32 policy on and off."""
    torch.manual_seed(0)
    ref_model = ContextAwareClassifier(64, 19).double().eval()
    model = copy.deepcopy(ref_model).float().to(device)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 64, 33, 29, generator=g, dtype=torch.float64)
    weight = torch.randn(19, 64, generator=g, dtype=torch.float64) * 0.1
    bias = torch.randn(19, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, 19, (2, 33, 29), generator=g)
    labels[:, :4] = 255
    args64 = (feats, weight, bias)
    args32 = tuple(t.float().to(device) for t in args64)
    with torch.no_grad():
        want = ref_model(*args64, labels=labels)
        want_pred = ref_model.predict(*args64)
    out = {}
    try:
        saved = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # flags set through torch's fp32_precision API: measured as they are
        saved = None
    try:
        for tf32 in (True, False) if saved is not None else (None,):
            if tf32 is not None:
                torch.backends.cudnn.allow_tf32 = tf32
            with torch.no_grad():
                got = model(*args32, labels=labels.to(device))
                pred = model.predict(*args32)
            tag = {True: "tf32", False: "fp32", None: "as set"}[tf32]
            for name, a, b in (("p", got.p, want.p), ("p_p", got.p_p, want.p_p), ("p_y", got.p_y, want.p_y),
                               ("predict", pred, want_pred)):
                out[f"{name} {tag}"] = _max_diff(a, b)
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32 = saved
    return out


def check(device: str) -> dict[str, dict[str, float]]:
    """Both checks on ``device``, printed and returned."""
    result = {"fused_ce": fused_ce_diffs(device), "classifier": classifier_diffs(device)}
    for part, diffs in result.items():
        print(f"equivalence {part}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    check(ap.parse_args(argv).device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
