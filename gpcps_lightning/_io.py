"""Small file-writing helpers shared by the callbacks and the exporters."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path next to ``path``, then move it into place.

    The temporary file lives in the target's folder (created if needed), so the final ``os.replace`` is
    atomic: a crash leaves either the old file or the complete new one, never half a file. On error the
    temporary file is removed and the target is left untouched.

    Args:
        path: The file to write.

    Yields:
        The temporary path to write to (it does not exist yet).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"Nothing was written for {os.fspath(target)!r}.")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
