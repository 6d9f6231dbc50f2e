"""Small helpers the rest of the package shares; nothing here imports the package itself.

- :func:`atomic_path`: write a file so that a crash never leaves half of it.
- :func:`import_object`: the object named by a dotted path such as ``gpcps_lightning.GPCPSModule``.
- :func:`public_class_path`: the stable name records and checkpoints give a class (legacy paths included).
- :func:`sha256_file`: the hex SHA-256 of a file, read in chunks.
- :func:`code_version`: the git commit of the loaded code, stamped ``-dirty`` when it has changes.
- :func:`size_pair`: an ``int`` or ``(height, width)`` size as a checked ``(height, width)`` pair.
- :func:`resize_to_original_sizes`: probabilities at the training size back at each image's own size.
- :func:`traceback_requested`: whether the commands should show tracebacks (``GPCPS_TRACEBACK=1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "atomic_path",
    "code_version",
    "import_object",
    "public_class_path",
    "resize_to_original_sizes",
    "sha256_file",
    "size_pair",
    "traceback_requested",
]

#: Environment variable that makes the ``gpcps`` commands show the traceback of the errors they report.
TRACEBACK_ENV = "GPCPS_TRACEBACK"


def traceback_requested() -> bool:
    """Whether ``GPCPS_TRACEBACK`` asks the commands for full tracebacks.

    The ``gpcps`` commands print the library's own errors (a bad file, option or checkpoint) as their
    message alone; with ``GPCPS_TRACEBACK=1`` (or ``gpcps --traceback``) they let the exception through.

    Returns:
        ``True`` when ``GPCPS_TRACEBACK`` is set to anything but ``""``, ``0``, ``false`` or ``no``.
    """
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- files
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


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time.

    Args:
        path: The file.
        chunk: Bytes read at a time (the digest does not depend on it).

    Returns:
        The 64-character lower-case hex digest, as ``sha256sum`` prints it.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- imports
def import_object(path: str) -> Any:
    """The object a dotted path names, as ``from package.module import Name`` would import it.

    Args:
        path: ``"package.module.Name"``; the last part may also be a submodule.

    Returns:
        The object.

    Raises:
        ImportError: If ``path`` has no module part, the module cannot be imported, or it has no such
            attribute; the message names ``path``.
    """
    # Messages in Python's own style (no final period): callers quote them inside their own.
    module_name, _, name = str(path).rpartition(".")
    if not module_name or not all(part.isidentifier() for part in str(path).split(".")):
        raise ImportError(f"{path!r} is not a dotted path of the form 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import {path!r}: {err}") from err
    try:
        return getattr(module, name)
    except AttributeError:
        pass
    try:  # a submodule that its package does not import itself
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name != path:  # the submodule exists, but one of its own imports failed
            raise
    raise ImportError(f"cannot import {path!r}: module {module_name!r} has no attribute {name!r}")


def public_class_path(path: str) -> str:
    """The stable name of a class path: ``gpcps_lightning.<Name>`` for a class the package exports.

    A class of ``gpcps_lightning.__all__`` keeps its public name wherever it is defined, so that records
    stay comparable when the code moves: the legacy ``gpcps_lightning.module.GPCPSModule`` and
    ``gpcps_lightning.baselines.CPSModule``, the ``gpcps_lightning.methods.*`` modules and
    ``gpcps_lightning.data.*`` all map to ``gpcps_lightning.<Name>``. Other paths are returned unchanged.
    The mapping reads the path as a string and imports nothing, so the legacy modules, which no longer
    exist, are not needed for old records and checkpoint stamps.

    Args:
        path: A dotted class path, as records store it.
    """
    # The package is loaded whenever this runs (importing any submodule loads it first); looking it up
    # rather than importing it keeps this bottom layer free of imports of the package.
    package = sys.modules["gpcps_lightning"]

    module, _, name = path.rpartition(".")
    if not (module == "gpcps_lightning" or module.startswith("gpcps_lightning.")):
        return path
    if name in getattr(package, "__all__", ()) and isinstance(getattr(package, name, None), type):
        return f"gpcps_lightning.{name}"
    return path


# --------------------------------------------------------------------------- code version
def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(package_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The git commit of the code that is loaded, and whether its checkout has uncommitted changes.

    The commit is that of the checkout holding ``package_dir`` (by default the folder of the imported
    ``gpcps_lightning``), not of the working directory. A package that git does not track there (an
    installed wheel, even inside someone's checkout) is ``"unknown"``. Uncommitted changes to tracked
    files of the checkout, or untracked files in the package folder, stamp the commit ``-dirty``.

    Args:
        package_dir: The package folder to look up.

    Returns:
        ``{"commit": "abc1234" | "abc1234-dirty" | "unknown", "dirty": bool | None, "changed_files": [...]}``
        with the changed files relative to the checkout (at most 50).
    """
    # This file lives in the package folder, so the default needs no import of the package.
    folder = Path(package_dir if package_dir is not None else Path(__file__).parent).resolve()
    unknown: dict[str, Any] = {"commit": "unknown", "dirty": None, "changed_files": []}
    tracked = _git(folder, "ls-files", "--", ".")
    commit = _git(folder, "rev-parse", "--short", "HEAD")
    if not tracked or not tracked.strip() or commit is None:
        return unknown
    changes = (_git(folder, "status", "--porcelain", "--untracked-files=no") or "").splitlines()
    untracked = (_git(folder, "status", "--porcelain", "--untracked-files=all", "--", ".") or "").splitlines()
    changed = sorted({line[3:] for line in changes + [u for u in untracked if u.startswith("??")]})
    dirty = bool(changed)
    return {
        "commit": commit.strip() + ("-dirty" if dirty else ""),
        "dirty": dirty,
        "changed_files": changed[:50],
    }


# --------------------------------------------------------------------------- sizes
def size_pair(size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """``size`` as ``(height, width)``: an int means a square, a pair is taken as it is.

    Args:
        size: An int or a ``(height, width)`` pair.
        name: The option's name, for the error message.

    Returns:
        ``(height, width)`` as Python ints.

    Raises:
        ValueError: If ``size`` is neither an int nor a pair, or not positive.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"`{name}` must be an int or a (height, width) pair, got {size!r}.")
    if min(pair) < 1:
        raise ValueError(f"`{name}` must be positive, got {size!r}.")
    return pair


def resize_to_original_sizes(probabilities: Tensor, sizes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Resize each image's probabilities (bilinear, ``align_corners=False``) to that image's own size.

    Probabilities are resized, not binary masks, so that thresholding happens at the original size. An
    image already at its size is returned as it is (a same-size bilinear resize is the identity). The
    dtype is kept: callers that want float32 convert first.

    Args:
        probabilities: One image per row, at the network's size.
        sizes: Each image's ``(height, width)``.

    Returns:
        One tensor of shape (C, h_i, w_i) per image.

    Raises:
        ValueError: If ``probabilities`` is not 4-D or the number of sizes differs from the batch size.

    Shape:
        - probabilities: (N, C, H, W)
    """
    if probabilities.ndim != 4:
        raise ValueError(f"`probabilities` must have shape (N, C, H, W), got {tuple(probabilities.shape)}.")
    if len(sizes) != probabilities.shape[0]:
        raise ValueError(f"Got {len(sizes)} original sizes for a batch of {probabilities.shape[0]} images.")
    out = []
    for i, size in enumerate(sizes):
        h, w = int(size[0]), int(size[1])
        p = probabilities[i : i + 1]
        if tuple(p.shape[-2:]) != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        out.append(p[0])
    return out
