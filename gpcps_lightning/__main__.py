"""``python -m gpcps_lightning``: the ``gpcps`` command."""

from __future__ import annotations

from gpcps_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
