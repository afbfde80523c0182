"""Loading mmengine's own checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``; mmengine's checkpoints also hold the
message hub, optimizer and config objects, which that unpickler refuses, so ``resume`` breaks. cac
re-registers mmengine's loader for local paths: it tries the safe weights-only load first and falls
back to a full load only for a local file, which is a checkpoint this machine's runs wrote.
"""
from __future__ import annotations

import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader


@CheckpointLoader.register_scheme(prefixes="", force=True)
def load_local_checkpoint(filename: str, map_location=None):
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except Exception:  # an mmengine training checkpoint: trusted local file
        return torch.load(filename, map_location=map_location, weights_only=False)
