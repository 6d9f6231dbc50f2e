"""Safe checkpoints: atomic writes, weights-only reads, and clear errors for truncated or foreign files.

Every module of the library stamps its checkpoints with :data:`CHECKPOINT_KEY` (library version and
module class). :func:`read_checkpoint` checks a file before anything trusts it; :class:`SafeCheckpointIO`
is the Lightning plugin that the ``gpcps`` command installs so that training, resuming and testing all
go through it.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import zipfile
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpcps_lightning._lightning_internals import fit_loop_counters, restart_fit_loop
from gpcps_lightning._utils import atomic_path, import_object, public_class_path

__all__ = [
    "CHECKPOINT_KEY",
    "SafeCheckpointIO",
    "atomic_write_bytes",
    "capture_rng_state",
    "read_checkpoint",
    "restart_after_finished_epoch",
    "restore_rng_state",
]

#: Key of the library's metadata in every checkpoint its modules write.
CHECKPOINT_KEY = "gpcps_lightning"


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The bytes go to a temporary file in the same folder (see :func:`gpcps_lightning._utils.atomic_path`),
    are flushed to disk, and the temporary file is then renamed over ``path``.

    Args:
        data: The file's content.
        path: Destination; its folder is created if needed.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def capture_rng_state() -> dict[str, Any]:
    """The global random-number states of torch (CPU and the current CUDA device), NumPy and Python.

    Only the current CUDA device's state is taken: asking for every device's would create a CUDA
    context on each GPU in every process of a multi-GPU run.

    Returned as tensors, numbers and lists only, so that checkpoints holding it load with
    ``weights_only=True``.
    """
    # The legacy global NumPy generator is the one seed_everything seeds and user code draws from.
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (the CUDA state on the current device, if any)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def restart_after_finished_epoch(trainer: L.Trainer) -> bool:
    """Start a new epoch when a run with ``max_steps`` resumes from a checkpoint of a finished epoch.

    With ``Trainer(max_steps=...)``, Lightning (2.6) resumes every checkpoint as if its epoch were
    unfinished, so that a run stopped by ``max_steps`` mid-epoch continues that epoch. A checkpoint
    written once an epoch had run to its end (at the epoch's end, or the ``last.ckpt`` of a run stopped by
    ``max_epochs``) is then resumed wrongly: the next epoch starts with the old epoch's batch count and
    runs one batch, or none, so the resumed run takes fewer steps than an uninterrupted one (Lightning
    issue 19617). Where the restored loop state shows such a finished epoch, this clears the restart flag
    and resets the fit loop again, which is what Lightning does without ``max_steps``: the next epoch runs
    in full. Call it after the checkpoint's loop state is restored and before the first epoch starts
    (``on_train_start``).

    Args:
        trainer: The fitting Trainer.

    Returns:
        Whether the fit loop was reset.
    """
    counters = fit_loop_counters(trainer)
    if not counters.restarting or trainer.max_steps == -1:
        return False
    # The epoch loop ran to the epoch's last batch and returned (``processed``); the checkpoint may have
    # been written in ``on_train_epoch_end``, before Lightning counted the epoch ``completed``.
    epoch_ran_out = (
        counters.epoch_ready == counters.epoch_started == counters.epoch_processed
        and counters.epoch_completed in (counters.epoch_processed, counters.epoch_processed - 1)
        and counters.is_last_batch
        and counters.batch_completed == counters.batch_processed
    )
    if not epoch_ran_out:
        return False
    # Clear the restart flag (FitLoop's own setter would force it back on under max_steps) and reset the
    # loop, which then takes the path of a resume without max_steps.
    restart_fit_loop(trainer)
    return True


def _describe_load_error(path: str, err: BaseException) -> str:
    text = str(err)
    # A refused Python object is reported as an "Unsupported global"; garbage bytes fail differently.
    if "Weights only load failed" in text and "Unsupported global" in text:
        return (
            f"Checkpoint {path} holds Python objects other than tensors and plain data, so it was not "
            "loaded with weights_only=True. Load it with weights_only=False only if you trust where it "
            "came from."
        )
    reason = text.splitlines()[0] if text else ""
    if "Weights only load failed" in text:
        # PyTorch's advice to load with weights_only=False is wrong for a damaged file: keep its finding.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.DOTALL)
        reason = " ".join(found.group(1).split()) if found else "unreadable pickle data"
    return (
        f"Checkpoint {path} cannot be read ({type(err).__name__}: {reason}). "
        "The file is truncated or corrupted (an interrupted copy or download?) or is not a PyTorch "
        "checkpoint. Use another checkpoint (e.g. last.ckpt or the best one) or copy it again."
    )


#: How files written by ``torch.save`` begin: a zip archive (the format since PyTorch 1.6) or a pickle
#: (protocol 2 or later, the legacy format).
_TORCH_FILE_STARTS = (b"PK", b"\x80")


def _not_a_torch_file(path: str, head: bytes) -> str | None:
    """The error message for a file that ``torch.save`` cannot have written, judged by its first bytes."""
    if not head or head.startswith(_TORCH_FILE_STARTS):
        return None  # an empty file is a truncated copy: the general message says so
    text = head.decode("utf-8", "replace").rstrip("\ufffd")  # the 64 bytes may cut a character
    if text.strip() and all(c.isprintable() or c in "\t\r\n" for c in text) and "\ufffd" not in text:
        start = f"the text {text.strip().splitlines()[0][:24]!r} (a text file?)"
    else:
        start = f"the bytes {head[:8]!r}"
    return (
        f"Checkpoint {path} cannot be read: it is not a PyTorch checkpoint, which torch.save writes as a "
        f"zip archive (or a pickle), but starts with {start}. Pass the .ckpt file that a training run "
        "wrote, e.g. runs/<name>/checkpoints/best.ckpt."
    )


def read_checkpoint(
    path: str | os.PathLike[str] | io.BytesIO,
    *,
    expected_class: type | None = None,
    weights_only: bool = True,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint and check that it is a complete gpcps_lightning checkpoint.

    Args:
        path: Checkpoint file (or an in-memory buffer).
        expected_class: If given, the module class the checkpoint must have been written by (or a subclass).
        weights_only: Refuse arbitrary pickled objects (PyTorch's safe loading). Checkpoints written by
            the library need nothing else.
        map_location: Where to put the tensors.

    Returns:
        The checkpoint dictionary.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is truncated, corrupted, unsafe to load, not a Lightning checkpoint, not
            written by gpcps_lightning, or written by another module class than ``expected_class``.
    """
    name = "<in-memory checkpoint>" if isinstance(path, io.BytesIO) else str(path)
    if not isinstance(path, io.BytesIO) and not get_filesystem(str(path)).exists(str(path)):
        raise FileNotFoundError(f"Checkpoint file not found: {name}. Check the path.")
    try:
        if isinstance(path, io.BytesIO):
            start = path.tell()
            head = path.read(64)
            path.seek(start)
            problem = _not_a_torch_file(name, head)
            if problem is None:
                checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
        else:
            with get_filesystem(str(path)).open(str(path), "rb") as f:
                head = f.read(64)
                problem = _not_a_torch_file(name, head)
                if problem is None:
                    f.seek(0)
                    checkpoint = torch.load(f, map_location=map_location, weights_only=weights_only)
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
        KeyError,  # a damaged legacy (pickle) file can fail in the unpickler's memo or stack
        IndexError,
    ) as err:
        raise ValueError(_describe_load_error(name, err)) from err
    except OSError as err:
        # A file cut short inside the zip's directory fails with EINVAL on a seek; errors of opening the
        # file (permissions, a folder) already say what is wrong.
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(_describe_load_error(name, err)) from err
    if problem is not None:
        raise ValueError(problem)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{name} is not a Lightning checkpoint (it has no 'state_dict'). Pass a .ckpt file written by "
            "a gpcps_lightning training run."
        )
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "class" not in meta:
        raise ValueError(
            f"{name} was not written by a gpcps_lightning module (no '{CHECKPOINT_KEY}' entry). Load it with "
            "the LightningModule class that wrote it."
        )
    # Stamps name the class publicly (``gpcps_lightning.GPCPSModule``); older ones name the module it
    # was defined in (``gpcps_lightning.module.GPCPSModule``), which moved: both mean the same class.
    meta["class"] = public_class_path(meta["class"])
    if expected_class is not None:
        wanted = public_class_path(f"{expected_class.__module__}.{expected_class.__qualname__}")
        if meta["class"] != wanted and not _is_subclass_name(meta["class"], expected_class):
            short = meta["class"].rsplit(".", 1)[-1]
            raise ValueError(
                f"{name} holds a {meta['class']} checkpoint, not a {wanted} one. Load it with "
                f"{short}.load_from_checkpoint(...) (or pass the matching --model.class_path)."
            )
    return checkpoint


def _is_subclass_name(qualified: str, expected_class: type) -> bool:
    try:
        found = import_object(qualified)
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, expected_class)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes atomically (local files) and reads with clear errors.

    Writing: the checkpoint is serialised in memory, written to a temporary file in the target folder,
    flushed, and renamed over the target, so a crash never leaves a half-written ``.ckpt``. Remote
    paths (``s3://`` ...) fall back to Lightning's own transactional write.
    Reading: :func:`read_checkpoint` (weights-only by default) turns truncated, corrupted and foreign
    files into a ``ValueError`` that names the file.

    Args:
        weights_only: Load checkpoints with PyTorch's weights-only unpickler.
    """

    def __init__(self, weights_only: bool = True) -> None:
        super().__init__()
        self.weights_only = weights_only

    def save_checkpoint(  # noqa: D102
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(buffer.getvalue(), path)

    def load_checkpoint(  # noqa: D102
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not get_filesystem(str(path)).exists(str(path)):
            # Reached through a Trainer's ckpt_path (the command's --ckpt_path), unlike read_checkpoint.
            raise FileNotFoundError(f"Checkpoint file not found: {path}. Check the path (and --ckpt_path).")
        safe = self.weights_only if weights_only is None else weights_only
        return read_checkpoint(path, weights_only=safe, map_location=map_location)
