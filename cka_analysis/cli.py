"""The ``cka-prune`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cka-prune",
        description="Remove whole residual blocks chosen with Centered Kernel Alignment (CKA).",
    )
    parser.add_argument("--version", action="version", version=f"cka-prune {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 0
