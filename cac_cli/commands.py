"""The ``cac-exp`` sub-commands and their one-line help: all ``cac-exp --help`` needs, importable
without torch or mmseg (which take seconds to import)."""
from __future__ import annotations

import argparse

__all__ = ["COMMANDS", "top_parser"]

COMMANDS: dict[str, str] = {
    "run": "train a spec's rows x seeds, tracked in MLflow",
    "config": "print a row's resolved mmengine config",
    "params": "parameter count of each row (no data, no weights)",
    "results": "print a spec's tracked results (mean ± std per row)",
    "demo": "run ablations/table3.yaml at the quick preset and print its table",
    "data": "generate context-scenes; prepare/verify ADE20K, COCO-Stuff, Cityscapes, Pascal-Context",
    "sweep": "Optuna sweep of CAC options, every trial a tracked run",
    "eval": "evaluate a checkpoint as a spec row's model (an MLflow eval run)",
    "import-official": "convert an official CAC (mmseg 0.x) checkpoint",
    "sync": "deliver what run journals hold for a tracking store that was away",
    "ui": "open MLflow's UI on the runs (or --sweep: optuna-dashboard on a sweep's storage)",
}


def top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``cac-exp`` parser without its sub-commands, and the action they are added to."""
    parser = argparse.ArgumentParser(prog="cac-exp", description="Context-Aware Classifier experiments")
    return parser, parser.add_subparsers(dest="command", required=True)
