"""The ``gpcps`` command line (filled in by the command-line work; the name is reserved)."""

from __future__ import annotations

import sys

from gpcps_lightning import __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpcps`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("--version", "-V"):
        print(f"gpcps_lightning {__version__}")
        return 0
    print("gpcps: the command line is not available yet; use the Python API (GPCPSModule).", file=sys.stderr)
    return 2
