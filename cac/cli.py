"""``cac-exp``: the command line. Every user-facing error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Callable, Optional

from cac.errors import CacError

__all__ = ["main", "build_parser", "command_handler", "cmd_run", "cmd_config", "cmd_params", "cmd_results", "cmd_demo", "cmd_sync"]


def cmd_run(args) -> int:
    from cac.exp.dispatch import dispatch_options, dispatch_units, slurm_script
    from cac.exp.options import run_options
    from cac.exp.runner import WORK_ROOT, run_spec
    from cac.exp.spec import load_spec
    from cac.exp.tracking import resolve_tracking_uri

    spec = load_spec(args.spec)
    _refuse_model_on_benchmark(spec, args)
    if spec.task == "benchmark":
        from cac.bench.table6 import run_benchmark

        return run_benchmark(spec, args.preset, rows=args.rows, tracking_uri=args.tracking_uri, dry_run=args.dry_run)
    options, dispatch = run_options(args), dispatch_options(args)
    execute = None
    if dispatch.executor != "inline":
        uri = resolve_tracking_uri(args.tracking_uri)
        execute = lambda units: dispatch_units(str(spec.path), args.preset, units, options, uri, dispatch)  # noqa: E731
    code = run_spec(args.spec, preset=args.preset, rows=args.rows, seeds=args.seeds,
                    tracking_uri=args.tracking_uri, dry_run=args.dry_run, launcher=args.launcher,
                    multiscale=args.ms, options=options, execute=execute)
    if args.dry_run and dispatch.executor != "inline":
        from cac.exp.dispatch import describe_ask

        print(f"executor {dispatch.executor}: one job per unit to train, {dispatch.jobs} at a time, "
              f"each asks {describe_ask(dispatch)}")
        if dispatch.executor == "slurm":
            from pathlib import Path

            print("sbatch file of each job:\n" + slurm_script(dispatch, Path(dispatch.folder or WORK_ROOT / "submitit")))
    return code


def _refuse_model_on_benchmark(spec, args) -> None:
    if getattr(args, "model", None) and spec.task == "benchmark":
        raise CacError(f"{spec.path}: --model does not apply to a benchmark spec (Table 6 times its own rows' "
                       "models); give the model in the spec's rows instead")


def cmd_config(args) -> int:
    from cac.mmseg.config import dump_config
    from cac.exp.runner import make_unit
    from cac.exp.options import run_options
    from cac.exp.spec import load_spec

    spec = load_spec(args.spec)
    unit = make_unit(spec, spec.row(args.row), args.seed, args.preset, options=run_options(args))
    print(dump_config(unit.cfg, args.out), end="")
    return 0


def cmd_params(args) -> int:
    from cac.exp.param_counts import count_spec_params

    from cac.exp.options import model_option

    rows = count_spec_params(args.spec, preset=args.preset, model=model_option(args))
    if args.json:
        print(json.dumps([{"row": r["row"], "params": r["params"]} for r in rows]))
    else:
        print(f"{'row':<26} {'params':>14} {'M':>9} {'paper M':>8}")
        for r in rows:
            paper = "" if r["paper"] is None else f"{r['paper']:.2f}"
            print(f"{r['row']:<26} {r['params']:>14,} {r['params'] / 1e6:>9.2f} {paper:>8}")
    return 0


def cmd_results(args) -> int:
    from cac.exp.results import print_tracked
    from cac.exp.spec import load_spec
    from cac.exp.tracking import resolve_tracking_uri

    from cac.exp.options import model_option

    spec = load_spec(args.spec)
    _refuse_model_on_benchmark(spec, args)
    if spec.task == "benchmark":
        from cac.bench.table6 import print_tracked_benchmark

        return print_tracked_benchmark(spec, args.preset, resolve_tracking_uri(args.tracking_uri))
    return print_tracked(args.spec, preset=args.preset, tracking_uri=args.tracking_uri, out=args.out,
                         model=model_option(args))


def cmd_demo(args) -> int:
    """Table 3 at the quick preset, then its report (Markdown/CSV/LaTeX table and figures)."""
    from pathlib import Path

    from analysis.make_tables import main as make_tables

    from cac.exp.runner import run_spec

    spec = Path(__file__).resolve().parents[1] / "ablations" / "table3.yaml"
    code = run_spec(str(spec), preset="quick", tracking_uri=args.tracking_uri)
    report = ["--spec", "table3", "--preset", "quick", "--out", args.out]
    if args.tracking_uri:
        report += ["--tracking-uri", args.tracking_uri]
    make_tables(report)
    table = Path(args.out) / "table3.md"
    if table.is_file():
        print()
        print(table.read_text())
        print(f"table: {table.resolve()} (also .csv, .tex); figures: {(Path(args.out) / 'figures').resolve()}")
    return code


def cmd_sync(args) -> int:
    from pathlib import Path

    from cac.exp.journal import sync
    from cac.exp.runner import WORK_ROOT
    from cac.exp.tracking import resolve_tracking_uri, store_client

    return sync([Path(args.work_dir) if args.work_dir else WORK_ROOT], resolve_tracking_uri(args.tracking_uri),
                store_client)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``cac-exp`` parser (:func:`cac_cli.commands.build_parser`: no heavy import)."""
    from cac_cli.commands import build_parser as light

    return light()


def command_handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The function a parsed command names (``"module:function"``), imported now."""
    import importlib

    module, name = args.handler.split(":")
    return getattr(importlib.import_module(module), name)


def _validate(args: argparse.Namespace) -> None:
    """What argparse cannot check, before any work: counts >= 1, a known preset, a tracking store
    that answers (an unreachable server fails here in seconds, not after MLflow's minutes of retries).
    Each problem is a ``CacError``: one line, exit code 2, nothing tracked."""
    for flag in ("seeds", "trials"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CacError(f"--{flag} must be >= 1, got {value}"
                           + (" (it runs seeds 0..N-1)" if flag == "seeds" else " (the total the study should reach)"))
    if getattr(args, "preset", None) is not None and args.command != "data":  # data has its own sizes
        from cac.mmseg.presets import get_preset

        get_preset(args.preset)
    if hasattr(args, "tracking_uri"):
        from cac.exp.tracking import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(args.tracking_uri), create=False)  # a bad spec writes nothing


def _terminate(signum, frame) -> None:
    """SIGTERM (a scheduler, `timeout`) ends like Ctrl-C: the current run is marked KILLED, resumable."""
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        _validate(args)
        return int(command_handler(args)(args) or 0)
    except CacError as err:
        from cac.exp.credentials import scrub

        print(f"cac-exp: error: {scrub(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cac-exp: interrupted; finished runs are kept, unfinished ones resume next time", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
