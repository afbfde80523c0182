"""``cac-exp data ...``: generate context-scenes, prepare and verify the real datasets."""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Callable

from cac.errors import CacError

from cac.data import context_scenes
from cac.data.real import (REAL_DATASETS, default_real_root, prepare_ade20k, prepare_cityscapes,
                           prepare_cocostuff, prepare_pascal_context, verify)

__all__ = ["add_data_arguments"]


def _one_line_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a bad argument (ValueError) like any other user error: one line, exit code 2."""
    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as exc:
            raise CacError(str(exc)) from None
    return wrapped


def _expected(args: argparse.Namespace) -> dict[str, int] | None:
    """The ``--expected-train/--expected-val`` overrides, if any were given."""
    counts = {split: n for split, n in (("train", args.expected_train), ("val", args.expected_val))
              if n is not None}
    return counts or None


def _summary(title: str, report: dict) -> str:
    """One line such as ``ADE20K ready at ROOT: 20,210 train / 2,000 val images with annotations``."""
    return (f"{title} ready at {report['root']}: {report['train']['images']:,} train / "
            f"{report['val']['images']:,} val images with annotations")


@_one_line_errors
def _cmd_context_scenes(args: argparse.Namespace) -> int:
    from cac.mmseg.presets import get_preset

    if args.preset not in context_scenes.PRESETS:  # e.g. the pipeline's `preset: paper`
        preset = get_preset(args.preset)
        if preset.embedded:
            raise CacError(f"preset {args.preset!r} names no context-scenes size")
        print(f"preset {args.preset!r} trains on the real datasets (cac-exp data ade20k / cocostuff); "
              "no context-scenes data to generate")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        return 0
    out = Path(args.out) if args.out else context_scenes.default_root(args.preset)
    meta = context_scenes.generate(out, seed=args.seed, preset=args.preset)
    counts = meta["counts"]
    print(f"{meta['data_version']} (seed {meta['seed']}) at {out}: {counts['train']:,} train / "
          f"{counts['val']:,} val images, {len(meta['classes'])} classes, {len(meta['scenes'])} scenes")
    return 0


@_one_line_errors
def _cmd_ade20k(args: argparse.Namespace) -> int:
    root = prepare_ade20k(args.archive, args.out, expected=_expected(args))
    print(_summary("ADE20K", verify("ade20k", root, _expected(args))))
    return 0


@_one_line_errors
def _cmd_cocostuff(args: argparse.Namespace) -> int:
    root = prepare_cocostuff(args.train_zip, args.val_zip, args.annotations_zip, args.out,
                             expected=_expected(args), nproc=args.nproc)
    print(_summary("COCO-Stuff 164K", verify("cocostuff", root, _expected(args))))
    return 0


@_one_line_errors
def _cmd_cityscapes(args: argparse.Namespace) -> int:
    root = prepare_cityscapes(args.gtfine_zip, args.leftimg_zip, args.out, expected=_expected(args), nproc=args.nproc)
    print(_summary("Cityscapes", verify("cityscapes", root, _expected(args))))
    return 0


@_one_line_errors
def _cmd_pascal_context(args: argparse.Namespace) -> int:
    root = prepare_pascal_context(args.voc_archive, args.context, args.out, expected=_expected(args))
    print(_summary("Pascal-Context 59", verify("pascal-context", root, _expected(args))))
    return 0


@_one_line_errors
def _cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else default_real_root(args.name)
    print(_summary(REAL_DATASETS[args.name].title, verify(args.name, root, _expected(args))))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from cac.data.tiny import make_tiny

    root = make_tiny(args.name, args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(_summary(f"tiny {REAL_DATASETS[args.name].title}",
                   verify(args.name, root, {"train": args.train, "val": args.val})))
    print(f"train on it with --expected-train {args.train} --expected-val {args.val}")
    return 0


def _add_expected(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expected-train", type=int, help="override the official training count")
    parser.add_argument("--expected-val", type=int, help="override the official validation count")


def add_data_arguments(data: argparse.ArgumentParser) -> None:
    """The sub-commands of ``cac-exp data``; each sets ``func``."""
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("context-scenes", help="generate the embedded benchmark (seconds)")
    p.add_argument("--out", help="target folder (default: data/context-scenes/<preset>, "
                                 "or $CAC_DATA_ROOT/context-scenes/<preset>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="quick",
                   help=f"{' | '.join(context_scenes.PRESETS)} (a non-embedded preset such as paper: nothing to do)")
    p.set_defaults(func=_cmd_context_scenes)

    p = sub.add_parser("ade20k", help="unpack ADEChallengeData2016.zip into mmseg's layout and verify")
    p.add_argument("--archive", required=True, help="the official ADEChallengeData2016.zip")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/ade/ADEChallengeData2016 "
                                 "(default: data/ or $CAC_DATA_ROOT)")
    _add_expected(p)
    p.set_defaults(func=_cmd_ade20k)

    p = sub.add_parser("cocostuff", help="unpack COCO 2017 images, convert stuffthingmaps, verify")
    p.add_argument("--train-zip", required=True, help="the official train2017.zip")
    p.add_argument("--val-zip", required=True, help="the official val2017.zip")
    p.add_argument("--annotations-zip", required=True, help="stuffthingmaps_trainval2017.zip")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/coco_stuff164k "
                                 "(default: data/ or $CAC_DATA_ROOT)")
    p.add_argument("--nproc", type=int, default=2, help="processes for the label conversion")
    _add_expected(p)
    p.set_defaults(func=_cmd_cocostuff)

    p = sub.add_parser("cityscapes", help="unpack leftImg8bit, draw gtFine polygons as labelTrainIds, verify")
    p.add_argument("--gtfine-zip", required=True, help="the official gtFine_trainvaltest.zip")
    p.add_argument("--leftimg-zip", required=True, help="the official leftImg8bit_trainvaltest.zip")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/cityscapes (default: data/ or $CAC_DATA_ROOT)")
    p.add_argument("--nproc", type=int, default=2, help="processes for the label conversion")
    _add_expected(p)
    p.set_defaults(func=_cmd_cityscapes)

    p = sub.add_parser("pascal-context", help="VOC2010 images + converted 59-class masks and split lists, verify")
    p.add_argument("--voc-archive", required=True,
                   help="the official VOCtrainval_03-May-2010.tar (or a folder holding JPEGImages/)")
    p.add_argument("--context", required=True,
                   help="the converted annotations, as mmseg's pascal_context.py writes them: an archive or folder "
                        "with SegmentationClassContext/*.png and ImageSets/SegmentationContext/{train,val}.txt")
    p.add_argument("--out", help="data folder; the dataset goes to OUT/VOCdevkit/VOC2010 "
                                 "(default: data/ or $CAC_DATA_ROOT)")
    _add_expected(p)
    p.set_defaults(func=_cmd_pascal_context)

    p = sub.add_parser("tiny", help="random images in a real dataset's official layout, sizes and label conventions (smoke tests)")
    p.add_argument("name", choices=list(REAL_DATASETS))
    p.add_argument("--out", help="data folder (default: data/ or $CAC_DATA_ROOT), as for the real dataset")
    p.add_argument("--train", type=int, default=6)
    p.add_argument("--val", type=int, default=2)
    p.add_argument("--size", type=int, default=96, help="images' longer side in pixels, aspects as in the dataset (Cityscapes: height, twice as wide)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny)

    p = sub.add_parser("verify", help="check a prepared real dataset's image and annotation counts")
    p.add_argument("name", choices=list(REAL_DATASETS))
    p.add_argument("--root", help="the dataset's data_root (default: mmseg's, under data/)")
    _add_expected(p)
    p.set_defaults(func=_cmd_verify)
