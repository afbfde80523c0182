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

__all__ = ["cmd_context_scenes", "cmd_ade20k", "cmd_cocostuff", "cmd_cityscapes", "cmd_pascal_context",
           "cmd_verify", "cmd_tiny"]


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
def cmd_context_scenes(args: argparse.Namespace) -> int:
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
def cmd_ade20k(args: argparse.Namespace) -> int:
    root = prepare_ade20k(args.archive, args.out, expected=_expected(args))
    print(_summary("ADE20K", verify("ade20k", root, _expected(args))))
    return 0


@_one_line_errors
def cmd_cocostuff(args: argparse.Namespace) -> int:
    root = prepare_cocostuff(args.train_zip, args.val_zip, args.annotations_zip, args.out,
                             expected=_expected(args), nproc=args.nproc)
    print(_summary("COCO-Stuff 164K", verify("cocostuff", root, _expected(args))))
    return 0


@_one_line_errors
def cmd_cityscapes(args: argparse.Namespace) -> int:
    root = prepare_cityscapes(args.gtfine_zip, args.leftimg_zip, args.out, expected=_expected(args), nproc=args.nproc)
    print(_summary("Cityscapes", verify("cityscapes", root, _expected(args))))
    return 0


@_one_line_errors
def cmd_pascal_context(args: argparse.Namespace) -> int:
    root = prepare_pascal_context(args.voc_archive, args.context, args.out, expected=_expected(args))
    print(_summary("Pascal-Context 59", verify("pascal-context", root, _expected(args))))
    return 0


@_one_line_errors
def cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else default_real_root(args.name)
    print(_summary(REAL_DATASETS[args.name].title, verify(args.name, root, _expected(args))))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from cac.data.tiny import make_tiny

    root = make_tiny(args.name, args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(_summary(f"tiny {REAL_DATASETS[args.name].title}",
                   verify(args.name, root, {"train": args.train, "val": args.val})))
    print(f"train on it with --expected-train {args.train} --expected-val {args.val}")
    return 0
