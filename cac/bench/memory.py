"""Peak memory of one model's inference, measured alone in a fresh interpreter.

CUDA: ``torch.cuda.max_memory_allocated`` over build + one inference (weights + activations). CPU: the
peak resident set (``VmHWM``, reset after the build) over one inference, minus the resident set before
the model was built. glibc's mmap threshold is fixed at 64 KiB in the probe (``PROBE_ENV``) so freed
tensors leave the resident set: repeated probes then agree to ~0.1 MB instead of ~20 MB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from cac.bench.models import build_eval_model, inference_fn
from cac.bench.timing import set_flush_denormal
from cac.errors import CacError

__all__ = ["PROBE_ENV", "rss_kib", "reset_peak_rss", "measure_memory", "probe_memory"]

# The memory probes run with a fixed glibc mmap threshold: every allocation above 64 KiB is its own
# mapping, returned to the OS when freed, so the resident peak follows live tensor memory rather than
# whatever the allocator's heap happened to keep from earlier, larger requests.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}


_MiB = 1024.0 * 1024.0


def rss_kib(key: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise CacError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory(model_cfg: dict, size: int, batch_size: int, device: str) -> dict[str, Any]:
    """Peak memory of building ``model_cfg`` and one inference at ``size``, in this process (which
    should hold nothing else: ``probe_memory`` runs it in a fresh one)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model = build_eval_model(model_cfg, device)
        inference_fn(model, size, batch_size)()
        torch.cuda.synchronize()
        return {"mem_mb": (torch.cuda.max_memory_allocated() - start) / _MiB,
                "mem_method": "cuda max_memory_allocated (weights + activations)"}
    before = rss_kib("VmRSS")
    model = build_eval_model(model_cfg, device)
    # Construction temporaries (Swin's init) are not inference memory: restart the peak after it.
    exact = reset_peak_rss()
    inference_fn(model, size, batch_size)()
    peak = rss_kib("VmHWM")
    return {"mem_mb": (peak - before) / 1024.0, "weights_mb": _weights_bytes(model) / _MiB,
            "mem_method": "cpu peak RSS over one inference minus RSS before the build (mmap threshold "
                          + os.environ.get("MALLOC_MMAP_THRESHOLD_", "dynamic") + ")"
                          + ("" if exact else " (peak not reset after the build)")}


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def probe_memory(model_cfg: dict, size: int, batch_size: int, device: str, timeout: float = 3600) -> dict:
    """``measure_memory`` in a fresh interpreter (``python -m cac.bench.memory``), so the peak is this
    model's alone."""
    job = json.dumps(dict(model_cfg=model_cfg, size=size, batch_size=batch_size, device=device))
    proc = subprocess.run([sys.executable, "-m", "cac.bench.memory"], input=job, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **PROBE_ENV})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise CacError(f"memory probe at {size}px failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


def _probe_main() -> int:
    """``python -m cac.bench.memory`` reads a JSON job on stdin and prints ``measure_memory``'s JSON."""
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(sys.stdin.read())
    set_flush_denormal(True)
    out = measure_memory(job["model_cfg"], job["size"], job["batch_size"], job["device"])
    print(json.dumps(out))
    return 0



if __name__ == "__main__":
    sys.exit(_probe_main())
