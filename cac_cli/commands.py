"""The whole ``cac-exp`` command line — every sub-command, argument and help text — importable without
torch or mmseg (which take seconds to import): ``cac-exp --help``, ``cac-exp run --help`` and a usage
error answer from here. Each sub-command names its handler as ``"module:function"``, imported only
when the command runs (:mod:`cac.cli`).

A few lists the help shows live in registries of the heavy layers (the presets, the datasets, the
generated data's sizes); their built-in names are repeated here for the help text, and
``tests/test_layout.py`` checks that the two agree.
"""
from __future__ import annotations

import argparse

__all__ = ["COMMANDS", "top_parser", "build_parser", "EXECUTORS", "DEFAULT_MEM_GB", "PRESETS", "DATASETS",
           "SCENE_SIZES", "CAC_PROFILES"]

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

EXECUTORS = ("inline", "local", "slurm")
DEFAULT_MEM_GB = 4  # what a CPU job asks Slurm for unless --mem-gb says (an embedded run needs 1-2 GB)
PRESETS = ("quick", "bench", "paper")  # cac.mmseg.presets' built-in presets (more may be registered)
DATASETS = ("ade20k", "cocostuff", "cityscapes", "pascal-context")  # cac.data.real.REAL_DATASETS
SCENE_SIZES = ("quick", "bench")  # cac.data.context_scenes.PRESETS
CAC_PROFILES = ("paper", "official")
_PRESET_HELP = "{} (default: {}), or any preset registered in Python"
_URI_HELP = "the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"


def top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``cac-exp`` parser without its sub-commands, and the action they are added to."""
    parser = argparse.ArgumentParser(prog="cac-exp", description="Context-Aware Classifier experiments")
    return parser, parser.add_subparsers(dest="command", required=True)


def _preset(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--preset", default=default, metavar="PRESET",
                   help=_PRESET_HELP.format(" | ".join(PRESETS), default))


class _KeyValues(argparse.Action):
    """``KEY=VALUE ...`` into a dict, as mmseg's tools read ``--cfg-options``: mmengine's own
    ``DictAction`` (values parsed as it parses them), imported when the flag is used."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from mmengine.config import DictAction

        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME|PATH",
                   help="replace every row's base model: a registered name, an mmseg config file, or mmseg::<config>")


def add_run_options(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """The flags users know from mmseg's ``tools/train.py`` (and a dataset subset)."""
    p.add_argument("--cfg-options", nargs="+", action=_KeyValues, default={}, metavar="KEY=VALUE",
                   help="override the resolved config, as mmseg's tools do (part of the run's identity)")
    add_model_option(p)
    p.add_argument("--expected-train", type=int, help="train on a dataset subset of this many images")
    p.add_argument("--expected-val", type=int, help="validate on a dataset subset of this many images")
    if training:
        p.add_argument("--amp", action="store_true", help="mixed precision (mmengine's AmpOptimWrapper)")
        p.add_argument("--no-pretrained", action="store_true",
                       help="random init instead of the config's pretrained backbone (recorded)")
        p.add_argument("--smoke", action="store_true",
                       help="check that a config trains, evaluates and checkpoints on a CPU: every image size "
                            "divided by 8, 2 iterations, batch 2, no worker processes (a run of its own)")
        p.add_argument("--batch-per-gpu", type=int, metavar="N",
                       help="per-GPU batch N; gradient accumulation keeps the total batch (16 at preset paper); "
                            "iterations (the schedule, intervals, logged steps, --cfg-options) stay optimizer steps "
                            "(part of the run's identity)")


def add_dispatch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="inline",
                   help="inline: this process (default); local: submitit jobs on this machine; slurm: a Slurm cluster")
    p.add_argument("--jobs", type=int, default=1, help="jobs running at once (local), Slurm array throttle")
    p.add_argument("--gpus-per-run", type=int, default=0, help="GPUs (and DDP processes) per job")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time-min", type=int, default=24 * 60, help="a job's time limit; it is requeued after")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs a job asks for and trains with (default: CPU jobs split this machine's cores over --jobs)")
    p.add_argument("--mem-gb", type=int,
                   help=f"memory a Slurm job asks for (default: {DEFAULT_MEM_GB} for CPU jobs, the cluster's for GPU jobs)")
    p.add_argument("--retries", type=int, default=2, help="resubmissions of a job whose process died")
    p.add_argument("--submitit-folder", help="submitit's logs (default: <work dir root>/submitit)")
    p.add_argument("--slurm", nargs="+", action=_KeyValues, default={}, metavar="KEY=VALUE",
                   help="more sbatch options, e.g. account=abc qos=high constraint=a100")


def _expected(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expected-train", type=int, help="override the official training count")
    p.add_argument("--expected-val", type=int, help="override the official validation count")


def _data(data: argparse.ArgumentParser) -> None:
    """The sub-commands of ``cac-exp data`` (handlers in :mod:`cac.exp.data_cli`)."""
    sub = data.add_subparsers(dest="data_command", required=True)
    handler = "cac.exp.data_cli:cmd_{}".format

    p = sub.add_parser("context-scenes", help="generate the embedded benchmark (seconds)")
    p.add_argument("--out", help="target folder (default: data/context-scenes/<preset>, "
                                 "or $CAC_DATA_ROOT/context-scenes/<preset>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="quick",
                   help=f"{' | '.join(SCENE_SIZES)} (a non-embedded preset such as paper: nothing to do)")
    p.set_defaults(handler=handler("context_scenes"))

    p = sub.add_parser("ade20k", help="unpack ADEChallengeData2016.zip into mmseg's layout and verify")
    p.add_argument("--archive", required=True, help="the official ADEChallengeData2016.zip")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/ade/ADEChallengeData2016 "
                                 "(default: data/ or $CAC_DATA_ROOT)")
    _expected(p)
    p.set_defaults(handler=handler("ade20k"))

    p = sub.add_parser("cocostuff", help="unpack COCO 2017 images, convert stuffthingmaps, verify")
    p.add_argument("--train-zip", required=True, help="the official train2017.zip")
    p.add_argument("--val-zip", required=True, help="the official val2017.zip")
    p.add_argument("--annotations-zip", required=True, help="stuffthingmaps_trainval2017.zip")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/coco_stuff164k (default: data/ or $CAC_DATA_ROOT)")
    p.add_argument("--nproc", type=int, default=2, help="processes for the label conversion")
    _expected(p)
    p.set_defaults(handler=handler("cocostuff"))

    p = sub.add_parser("cityscapes", help="unpack leftImg8bit, draw gtFine polygons as labelTrainIds, verify")
    p.add_argument("--gtfine-zip", required=True, help="the official gtFine_trainvaltest.zip")
    p.add_argument("--leftimg-zip", required=True, help="the official leftImg8bit_trainvaltest.zip")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/cityscapes (default: data/ or $CAC_DATA_ROOT)")
    p.add_argument("--nproc", type=int, default=2, help="processes for the label conversion")
    _expected(p)
    p.set_defaults(handler=handler("cityscapes"))

    p = sub.add_parser("pascal-context", help="VOC2010 images + converted 59-class masks and split lists, verify")
    p.add_argument("--voc-archive", required=True,
                   help="the official VOCtrainval_03-May-2010.tar (or a folder holding JPEGImages/)")
    p.add_argument("--context", required=True,
                   help="the converted annotations, as mmseg's pascal_context.py writes them: an archive or folder "
                        "with SegmentationClassContext/*.png and ImageSets/SegmentationContext/{train,val}.txt")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/VOCdevkit/VOC2010 (default: data/ or $CAC_DATA_ROOT)")
    _expected(p)
    p.set_defaults(handler=handler("pascal_context"))

    p = sub.add_parser("tiny", help="random images in a real dataset's official layout, sizes and label conventions "
                                    "(smoke tests)")
    p.add_argument("name", choices=DATASETS)
    p.add_argument("--out", help="data folder (default: data/ or $CAC_DATA_ROOT), as for the real dataset")
    p.add_argument("--train", type=int, default=6)
    p.add_argument("--val", type=int, default=2)
    p.add_argument("--size", type=int, default=96,
                   help="images' longer side in pixels, aspects as in the dataset (Cityscapes: height, twice as wide)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=handler("tiny"))

    p = sub.add_parser("verify", help="check a prepared real dataset's image and annotation counts")
    p.add_argument("name", choices=DATASETS)
    p.add_argument("--root", help="the dataset's data_root (default: mmseg's, under data/)")
    _expected(p)
    p.set_defaults(handler=handler("verify"))


def build_parser() -> argparse.ArgumentParser:
    """The whole ``cac-exp`` parser (no heavy import: handlers are named, not imported)."""
    parser, sub = top_parser()
    command = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}

    p = command["run"]
    p.add_argument("spec")
    _preset(p, "quick")
    p.add_argument("--rows", help='comma-separated row labels, e.g. "(a),(f)"')
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the spec's")
    p.add_argument("--tracking-uri", help=_URI_HELP)
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan only (writes nothing)")
    p.add_argument("--launcher", default="none", choices=["none", "pytorch"])
    p.add_argument("--ms", action="store_true", help="also evaluate multi-scale (0.5-1.75) + flip, logged as val/mIoU_ms")
    add_run_options(p)
    add_dispatch_options(p)
    p.set_defaults(handler="cac.cli:cmd_run")

    p = command["config"]
    p.add_argument("spec")
    p.add_argument("--row", required=True)
    _preset(p, "quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write it to this file")
    add_run_options(p)
    p.set_defaults(handler="cac.cli:cmd_config")

    p = command["params"]
    p.add_argument("spec")
    _preset(p, "paper")
    p.add_argument("--json", action="store_true")
    add_model_option(p)
    p.set_defaults(handler="cac.cli:cmd_params")

    p = command["results"]
    p.add_argument("spec")
    _preset(p, "quick")
    p.add_argument("--tracking-uri", help=_URI_HELP)
    p.add_argument("--out", help="also write the per-row, per-seed values as JSON")
    add_model_option(p)
    p.set_defaults(handler="cac.cli:cmd_results")

    p = command["demo"]
    p.add_argument("--tracking-uri", help=_URI_HELP)
    p.add_argument("--out", default="reports")
    p.set_defaults(handler="cac.cli:cmd_demo")

    _data(command["data"])

    p = command["sweep"]
    p.add_argument("spec")
    p.add_argument("--trials", type=int, required=True, help="total trials the study should reach")
    _preset(p, "quick")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///optuna.db; journal:///file)")
    p.add_argument("--tracking-uri", help=_URI_HELP)
    p.add_argument("--out", default="reports", help="where the best parameters and figures go")
    add_run_options(p)
    add_dispatch_options(p)
    p.set_defaults(handler="cac.exp.sweep:cmd_sweep")

    p = command["eval"]
    p.add_argument("spec")
    p.add_argument("--row", required=True)
    _preset(p, "quick")
    p.add_argument("--checkpoint", required=True, help="a local .pth or an http(s) URL")
    p.add_argument("--ms", action="store_true", help="also multi-scale (0.5-1.75) + flip: val/mIoU_ms")
    p.add_argument("--tracking-uri", help=_URI_HELP)
    p.add_argument("--profile", choices=CAC_PROFILES,
                   help="CAC profile of the model to load into (imported official checkpoints record theirs)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of this file (runs code from it: only for files you trust)")
    add_run_options(p, training=False)
    p.set_defaults(handler="cac.exp.evaluate:cmd_eval")

    p = command["import-official"]
    p.add_argument("checkpoint", help="the official .pth (local path or http(s) URL)")
    p.add_argument("--spec", default="experiments/table1_ade20k.yaml", help="the spec whose row it is")
    p.add_argument("--row", required=True, help='e.g. "fcn-mv2+cac", "upernet-swin-t+cac"')
    _preset(p, "paper")
    p.add_argument("--out", required=True, help="where to write the converted checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of this file (runs code from it: only for files you trust)")
    p.set_defaults(handler="cac.exp.evaluate:cmd_import")

    p = command["sync"]
    p.add_argument("--tracking-uri", help="the store to deliver to (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--work-dir", help="where the units' work dirs are (default: $CAC_WORK_DIR or work_dirs)")
    p.set_defaults(handler="cac.cli:cmd_sync")

    p = command["ui"]
    p.add_argument("--tracking-uri", help=_URI_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--sweep", metavar="SPEC", help="open optuna-dashboard on this sweep's storage instead")
    p.add_argument("--storage", help="the sweep's Optuna storage (default: sqlite:///optuna.db)")
    p.add_argument("--model", help="the sweep's --model, if it was run with one (its study is the model's own)")
    p.set_defaults(handler="cac.exp.ui:cmd_ui")
    return parser
