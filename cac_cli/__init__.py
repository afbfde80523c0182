"""``cac-exp``'s entry point. Help, and a missing or mistyped command, are answered from the light
:mod:`cac_cli.commands`; a command imports :mod:`cac.cli` (torch, mmseg: seconds) and runs there."""
from __future__ import annotations

import sys
from typing import Optional

from cac_cli.commands import COMMANDS, top_parser

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser, sub = top_parser()
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
        parser.parse_args(argv)  # prints the help or the usage error, and exits
    from cac.cli import main as run_command

    return run_command(argv)
