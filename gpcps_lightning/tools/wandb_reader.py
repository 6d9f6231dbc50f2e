"""Read back what a W&B run wrote locally (offline or online), without a W&B server or login.

:func:`read_wandb_run` parses the run's ``run-<id>.wandb`` transaction log with the protobuf classes that
ship with ``wandb`` (``wandb sync`` reads the same file): history rows, config and summary.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

__all__ = ["read_wandb_run"]


def _wandb_records(path: Path) -> list[bytes]:
    # The .wandb transaction log is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then
    # 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    # 4 last); block tails shorter than a chunk header are zero padding.
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{os.fspath(path)!r} is not a W&B transaction log (.wandb file).")
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left - 7
            continue
        if pos + length > len(data):
            break  # a chunk still being written: stop at the last complete record
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{os.fspath(path)!r}: unknown chunk type {kind} at byte {pos - length - 7}.")
    return records


def read_wandb_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read back what a W&B run (offline or online) wrote locally: history rows, config and summary.

    Parses the run's ``run-<id>.wandb`` transaction log with the protobuf classes that ship with
    ``wandb``, so it works without a W&B server or login (``wandb sync`` reads the same file).

    Args:
        run_dir: The run folder, e.g. ``<save_dir>/wandb/offline-run-<date>-<id>``.

    Returns:
        ``{"history": [row, ...], "config": {...}, "summary": {...}, "finished": bool}`` with JSON-decoded
        values (nested keys joined with ``/``); ``finished`` says whether the run's exit record was written
        (a run still being written is read up to its last complete record).

    Raises:
        FileNotFoundError: If the folder holds no ``.wandb`` file.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"No .wandb file in {os.fspath(run_dir)!r}: is it a W&B run folder?")

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    finished = False
    for raw in _wandb_records(files[0]):
        record = pb.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            finished = True
    return {"history": history, "config": config, "summary": summary, "finished": finished}
