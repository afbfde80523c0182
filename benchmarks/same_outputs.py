"""Whether this tree's CAC outputs are bitwise those of another commit: ``ContextAwareClassifier.predict``
(the test-time output), ``soft_pool`` (Eq. 4) and ``cosine_logits`` (Eq. 6) on the same seeded inputs
(D = 512, N = 150, 64² features), float32 and float64, with and without autograd; and one training
step's loss terms (Eq. 8) and gradients (f, C, the projectors) under ``profile: paper`` and
``official`` (D = 64, N = 19, labels with ignored pixels and absent classes).

    .venv/bin/python benchmarks/same_outputs.py --against 7531630

The other commit's ``cac`` package is exported with ``git archive`` into a temporary folder and run in
a subprocess of this interpreter (same torch); each side saves its outputs and this script compares
them: bitwise equal, or the largest absolute difference.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside either tree (its own ``cac`` first on sys.path): writes {name: tensor} to argv[1].
PROBE = """
import sys, torch
from cac.core.classifier import ContextAwareClassifier
from cac.core.functional import cosine_logits, soft_pool
out = {}
for dtype in (torch.float32, torch.float64):
    g = torch.Generator().manual_seed(0)
    d, n, side = 512, 150, 64
    feats = torch.randn(2, d, side, side, generator=g).to(dtype)
    weight, bias = torch.randn(n, d, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    logits = (torch.randn(2, n, side, side, generator=g) * 3).to(dtype)
    torch.manual_seed(0)
    cac = ContextAwareClassifier(d, n).to(dtype).eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            key = f"{str(dtype)[6:]} grad={grad}"
            out[f"predict {key}"] = cac.predict(feats, weight, bias).detach()
            out[f"soft_pool {key}"] = soft_pool(feats, logits).detach()
            out[f"cosine_logits {key}"] = cosine_logits(feats, weight, 15.0).detach()
from cac.core.classifier import CACOptions, cac_losses, plain_cross_entropy
for profile in ("paper", "official"):
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(1)
        d, n = 64, 19
        feats = torch.randn(2, d, 24, 40, generator=g).to(dtype).requires_grad_(True)
        weight = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
        bias = torch.randn(n, generator=g).to(dtype)
        labels = torch.randint(0, 7, (2, 96, 160), generator=g)
        labels[:, :, :16] = 255
        torch.manual_seed(0)
        options = CACOptions.from_dict({"profile": profile})
        cac = ContextAwareClassifier(d, n, options).to(dtype)
        losses = cac_losses(cac(feats, weight, bias, labels), labels, options,
                            ce=lambda logits, acc: {"loss_ce": plain_cross_entropy(logits, labels)})
        key = f"{profile} {str(dtype)[6:]}"
        for name, value in losses.items():
            out[f"train {key} {name}"] = value.detach()
        named = [("f", feats), ("C", weight)] + [(k, p) for k, p in cac.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(sum(losses.values()), [p for _, p in named])
        for (name, _), grad in zip(named, grads):
            out[f"grad {key} {name}"] = grad
torch.save(out, sys.argv[1])
"""


def outputs(tree: Path, file: Path) -> dict:
    import torch

    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r})\n" + PROBE, str(file)],
                   check=True, cwd=tree)
    return torch.load(file, weights_only=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="a commit (or any git revision) of this repository")
    args = ap.parse_args(argv)
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        other.mkdir()
        archive = subprocess.run(["git", "archive", args.against, "cac"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
        theirs = outputs(other, Path(tmp) / "theirs.pt")
        ours = outputs(ROOT, Path(tmp) / "ours.pt")
    print(f"CAC outputs of this tree ({here}) vs {args.against}:")
    for name in ours:
        if name not in theirs:
            print(f"  {name:<44} only here")
            continue
        a, b = ours[name], theirs[name]
        same = a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
        diff = "" if same else f"largest |difference| {(a.double() - b.double()).abs().max().item():.3g}"
        print(f"  {name:<44} {'bitwise equal' if same else diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
