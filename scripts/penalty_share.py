#!/usr/bin/env python
"""How big is the gradient penalty's push? Its share of the loss and of the parameter-gradient norm.

    python scripts/penalty_share.py --name paper256 --image-size 256 --batch-size 16 --encoder resnet34 \
        --lr 1e-4 --data-root data/kvasir-seg --out docs/records/penalty-share

Trains GP-CPS (``lambda_grad`` 1e-3 by default) on Kvasir-SEG at 1/8 labeled and measures, on each of the
first ``--measure`` steps (at initialisation) and again on ``--measure`` steps after ``--train`` more steps,
the weighted penalty ``lambda_grad * L_grad`` as a share of the total loss and of the norm of the
parameter gradient (``GPCPSModule(penalty_share_every_n_steps=1)``: ``||d(w L_grad)/dtheta|| /
||d(total)/dtheta||``). Writes one JSON with every measured step, the medians of each window, the
settings, the commit, the versions, the machine, the command and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

from gpcps_lightning import GPCPSModule
from gpcps_lightning.data import KvasirSEGDataModule, SyntheticPolypDataModule
from gpcps_lightning.tools.provenance import code_version, library_versions


class _MeasureWindows(L.Callback):
    """Measure the penalty's share on steps ``[0, measure)`` and ``[measure + train, 2 measure + train)``."""

    def __init__(self, measure: int, train: int) -> None:
        self.measure, self.train = measure, train

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        later = self.measure + self.train
        due = step < self.measure or later <= step < later + self.measure
        pl_module.penalty_share_every_n_steps = 1 if due else 0


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="name of the JSON file written in --out")
    parser.add_argument("--out", default="docs/records/penalty-share")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--network-kwargs", type=json.loads, default=None, metavar="JSON")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda-grad", type=float, default=1e-3)
    parser.add_argument("--fraction", type=float, default=0.125)
    parser.add_argument("--measure", type=int, default=20, help="measured steps per window")
    parser.add_argument("--train", type=int, default=30, help="unmeasured steps between the windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["kvasir", "synthetic"], default="kvasir")
    parser.add_argument("--data-root", default="data/kvasir-seg")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True, verbose=False)
    common: dict[str, Any] = dict(
        image_size=args.image_size,
        batch_size=args.batch_size,
        labeled_fraction=args.fraction,
        num_workers=0,
        seed=args.seed,
    )
    if args.data == "kvasir":
        data: Any = KvasirSEGDataModule(root=args.data_root, **common)
    else:
        data = SyntheticPolypDataModule(root=args.data_root, num_images=40, **common)
    module = GPCPSModule(
        encoder_name=args.encoder,
        network_kwargs=args.network_kwargs,
        lr=args.lr,
        lambda_grad=args.lambda_grad,
        seeds=(2 * args.seed + 1, 2 * args.seed + 2),
    )
    steps = 2 * args.measure + args.train
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_MeasureWindows(args.measure, args.train)],
    )
    clock = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - clock
    history = module.penalty_share_history
    later = args.measure + args.train
    windows = {"initialisation": [h for h in history if h[0] < args.measure]}
    windows[f"after {later} steps"] = [h for h in history if h[0] >= later]
    record = {
        "name": args.name,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data_root", "name")},
        "command": "python scripts/penalty_share.py " + " ".join(_without_paths(argv or sys.argv[1:])),
        "windows": {
            name: {
                "steps": [h[0] for h in rows],
                "loss_share": _summary([h[1] for h in rows]),
                "grad_norm_share": _summary([h[2] for h in rows]),
            }
            for name, rows in windows.items()
        },
        "history": [{"step": s, "loss_share": a, "grad_norm_share": b} for s, a, b in history],
        "code": code_version(),
        "versions": library_versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {_threads()}",
        "wall_time_s": round(seconds, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for name, window in record["windows"].items():
        print(
            f"{args.name} {name}: penalty share of the loss {100 * window['loss_share']['median']:.3f}% "
            f"(median), of the gradient norm {100 * window['grad_norm_share']['median']:.3f}%"
        )
    return 0


def _without_paths(args: list[str]) -> list[str]:
    """The command line with the data and output folders as placeholders (no machine paths in records)."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--data-root", "--out"):
            out[i + 1] = "<" + arg.removeprefix("--") + ">"
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
