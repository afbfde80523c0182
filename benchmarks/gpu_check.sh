#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): Table 6 at 512/1280/2560 (TF32 at torch's defaults, and
# a control with TF32 off), the CAC/baseline train-step ratio in fp32 and AMP, 50 paper-preset
# iterations of UperNet-Swin-T +-CAC on a tiny ADE20K at batch 16 and at --batch-per-gpu 4, a resume
# at iteration 10 (cac's loop vs mmengine's replay), and a profile of the top CUDA kernels and the
# host syncs of a train step.
#   benchmarks/gpu_check.sh            on a GPU node with cac installed; it prints its run time at the end
#                                      (three of its sections took 162 s on an H100 at b2686eb; the rest
#                                      have not run on a GPU yet: give the first run a 10-minute limit)
#   benchmarks/gpu_check.sh --dry      anywhere: every section on the CPU at toy sizes
# Extra arguments go to gpu_check.py (--out DIR, --sections ...). PYTHON picks the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
