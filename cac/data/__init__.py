"""Data for the experiments: the generated context-scenes benchmark and the real ones.

Kept free of mmseg so data can be generated and checked without it; the mmseg dataset class lives in
:mod:`cac.data.datasets` (imported by ``import cac`` when mmseg is installed).
"""
from cac.data.context_scenes import (CLASSES, GENERATOR_VERSION, PALETTE, PRESETS, SCENES, data_version,
                             default_root, ensure, generate)
from cac.data.real import DatasetError, data_dir, prepare_ade20k, prepare_cocostuff, verify

__all__ = ["CLASSES", "GENERATOR_VERSION", "PALETTE", "PRESETS", "SCENES", "data_version",
           "default_root", "ensure", "generate", "DatasetError", "data_dir", "prepare_ade20k",
           "prepare_cocostuff", "verify"]
