"""The `remamber` command: one subcommand per pipeline step; Snakemake rules call these."""

from __future__ import annotations

import argparse
import sys

from remamber import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remamber", description=__doc__)
    parser.add_argument("--version", action="version", version=f"remamber {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
