"""``cac-exp``'s entry point. The whole command line (help, usage errors) is answered from the light
:mod:`cac_cli.commands`; a command that parses imports :mod:`cac.cli` (torch, mmseg: seconds) and
runs there."""
from __future__ import annotations

import sys
from typing import Optional

from cac_cli.commands import build_parser

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    build_parser().parse_args(argv)  # --help and usage errors print and exit here, before any heavy import
    from cac.cli import main as run_command

    return run_command(argv)
