"""Whether this tree's CAC outputs are bitwise those of another commit: ``ContextAwareClassifier.predict``
(the test-time output), ``soft_pool`` (Eq. 4) and ``cosine_logits`` (Eq. 6) on the same seeded inputs
(D = 512, N = 150, 64² features), float32 and float64, with and without autograd; and one training
step's loss terms (Eq. 8) and gradients (f, C, the projectors) under ``profile: paper`` and
``official`` (D = 64, N = 19, labels with ignored pixels and absent classes).

    .venv/bin/python benchmarks/same_outputs.py --against 7531630
    .venv/bin/python benchmarks/same_outputs.py --record tests/golden/before_ssa.json --of 1bfe319

The other commit's ``cac`` package is exported with ``git archive`` into a temporary folder and run in
a subprocess of this interpreter (same torch, one thread); each side saves its outputs and this script
compares them: bitwise equal, or the largest absolute difference. ``--record`` writes a revision's
outputs as digests (shape, dtype, sha256 of the bytes: equal digests are bitwise equal tensors) with
the platform they were computed on, so a checkout without that revision can still compare with it.
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
torch.set_num_threads(1)  # one reduction order: the digests depend on nothing but the code and the CPU kind
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


def platform() -> dict:
    """What bitwise outputs depend on besides the code: torch's version and the CPU kernels it picks."""
    import platform as plat

    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": plat.machine()}


def digests(tensors: dict) -> dict:
    """``{name: {"shape", "dtype", "sha256"}}``: equal digests are bitwise equal tensors."""
    import hashlib

    return {name: {"shape": list(t.shape), "dtype": str(t.dtype),
                   "sha256": hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()}
            for name, t in tensors.items()}


def outputs_of(revision: str | None) -> dict:
    """The probe's outputs of this tree (``None``) or of a git revision of it."""
    with tempfile.TemporaryDirectory() as tmp:
        if revision is None:
            return outputs(ROOT, Path(tmp) / "ours.pt")
        other = Path(tmp) / "other"
        other.mkdir()
        archive = subprocess.run(["git", "archive", revision, "cac"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
        return outputs(other, Path(tmp) / "theirs.pt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", help="a commit (or any git revision) of this repository")
    ap.add_argument("--record", metavar="FILE", help="write the digests of --of's outputs to FILE (JSON)")
    ap.add_argument("--of", help="the revision --record records (default: this tree)")
    args = ap.parse_args(argv)
    if args.record:
        import json

        commit = None
        if args.of:
            commit = subprocess.run(["git", "rev-parse", args.of], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
        record = {"commit": commit, "platform": platform(), "outputs": digests(outputs_of(args.of))}
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"{len(record['outputs'])} digests of {args.of or 'this tree'} written to {args.record}")
        return 0
    if not args.against:
        ap.error("--against or --record is required")
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    theirs, ours = outputs_of(args.against), outputs_of(None)
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
