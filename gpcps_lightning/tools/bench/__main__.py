"""``python -m gpcps_lightning.tools.bench``; also the worker process of an isolated run."""

from __future__ import annotations

import sys

from gpcps_lightning.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
