"""Reproduce the paper's Tables 1 and 2 under one protocol: ``gpcps reproduce run`` / ``table``.

``run`` trains every (method, labeled fraction, seed) combination, selects the checkpoint on the
validation split, evaluates it once on the test split, and writes one JSON record per run. Finished
runs (a record exists) are skipped; interrupted runs resume from their ``last.ckpt``. ``table`` turns
the records into paper-style markdown tables (mean ± std over seeds) and a plot of test Dice against
the labeled fraction.

Also available as ``python -m gpcps_lightning.reproduce``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "MethodSpec", "main", "make_tables", "run_one"]


@dataclass(frozen=True)
class MethodSpec:
    """A row of the paper's tables: which module, with which arguments."""

    label: str
    class_path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Rows of Table 2 (ablation at 1/8) this method fills, e.g. ("I",).
    ablation_rows: tuple[str, ...] = ()


#: Methods the runner knows. GP-CPS ablation rows II and III are GP-CPS with one weight set to 0;
#: row I is the supervised UNet (the paper reports the same number for both).
METHODS: dict[str, MethodSpec] = {
    "supervised": MethodSpec("UNet (supervised)", "gpcps_lightning.baselines.SupervisedModule", {}, ("I",)),
    "cps": MethodSpec("CPS", "gpcps_lightning.baselines.CPSModule"),
    "mean_teacher": MethodSpec("Mean Teacher", "gpcps_lightning.baselines.MeanTeacherModule"),
    "gpcps_grad": MethodSpec(
        "GP-CPS L_sup + L_grad", "gpcps_lightning.module.GPCPSModule", {"lambda_semi": 0.0}, ("II",)
    ),
    "gpcps_semi": MethodSpec(
        "GP-CPS L_sup + L_semi", "gpcps_lightning.module.GPCPSModule", {"lambda_grad": 0.0}, ("III",)
    ),
    "gpcps": MethodSpec("GP-CPS", "gpcps_lightning.module.GPCPSModule", {}, ("IV",)),
    "gpcps_lazy8": MethodSpec(
        "GP-CPS (lazy, k=8)", "gpcps_lightning.module.GPCPSModule", {"gp_every_n_steps": 8}
    ),
}

#: The paper's Table 1 (Dice %) and Table 2 (1/8), printed beside measured numbers for reference.
PAPER_TABLE1: dict[str, dict[float, float]] = {
    "supervised": {0.5: 78.56, 0.25: 75.63, 0.125: 65.87, 0.0625: 61.24},
    "cps": {0.5: 79.14, 0.25: 75.82, 0.125: 66.95, 0.0625: 62.27},
    "gpcps": {0.5: 83.30, 0.25: 81.30, 0.125: 76.64, 0.0625: 72.13},
}
PAPER_TABLE2: dict[str, float] = {"I": 65.87, "II": 73.05, "III": 66.71, "IV": 76.64}
FRACTION_NAMES = {0.5: "1/2", 0.25: "1/4", 0.125: "1/8", 0.0625: "1/16"}


def _import(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    return getattr(__import__(module_name, fromlist=[name]), name)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    return f"CPU only: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _fraction_name(fraction: float) -> str:
    """How the tables name a labeled fraction: "1/8" for the paper's, else the number."""
    return FRACTION_NAMES.get(fraction, f"{fraction:g}")


def _fraction_key(fraction: float) -> str:
    return _fraction_name(fraction).replace("/", "of")


def record_path(out: Path, method: str, fraction: float, seed: int) -> Path:
    """Where the JSON record of one run lives."""
    return out / "records" / f"{method}_{_fraction_key(fraction)}_seed{seed}.json"


def _make_datamodule(args: argparse.Namespace, fraction: float, seed: int) -> Any:
    common: dict[str, Any] = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        labeled_fraction=fraction,
        num_workers=args.num_workers,
        cache=True,
        seed=seed,
        eval_at_original_size=not args.eval_at_training_size,
    )
    if args.steps_per_epoch is not None:
        common["steps_per_epoch"] = args.steps_per_epoch
    if args.data == "kvasir":
        from gpcps_lightning.data import KvasirSEGDataModule

        return KvasirSEGDataModule(root=args.data_root, download=args.download, **common)
    from gpcps_lightning.data import SyntheticPolypDataModule

    return SyntheticPolypDataModule(root=args.data_root, num_images=args.synthetic_images, **common)


def _make_module(spec: MethodSpec, args: argparse.Namespace, seed: int) -> Any:
    cls = _import(spec.class_path)
    kwargs: dict[str, Any] = dict(spec.kwargs)
    kwargs.update(
        arch=args.arch,
        encoder_name=args.encoder,
        encoder_weights=None if args.encoder_weights in (None, "none", "None") else args.encoder_weights,
        lr=args.lr,
    )
    # Different runs differ in their seeds only: network initialisation included.
    if "seeds" in _init_params(cls):
        kwargs["seeds"] = (2 * seed + 1, 2 * seed + 2)
    elif "network_seed" in _init_params(cls):
        kwargs["network_seed"] = 2 * seed + 1
    return cls(**kwargs)


def _init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls).parameters)


def _metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for r in results:
        merged.update({k: float(v) for k, v in r.items()})
    return merged


def run_one(args: argparse.Namespace, method: str, fraction: float, seed: int) -> dict[str, Any]:
    """Train, select on val, test once, and write the record of one run (or return the existing one).

    Raises:
        ValueError: On an unknown method.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from gpcps_lightning.checkpointing import SafeCheckpointIO

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    out = Path(args.out)
    target = record_path(out, method, fraction, seed)
    if target.exists():
        return json.loads(target.read_text())
    spec = METHODS[method]
    run_dir = out / "runs" / method / _fraction_key(fraction) / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)

    commit = _commit()  # the code that trains: read before training, as the checkout may move on meanwhile
    L.seed_everything(seed, workers=True, verbose=False)
    module = _make_module(spec, args, seed)
    datamodule = _make_datamodule(args, fraction, seed)
    monitor = f"val/dice_{module.selection_head}"
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.max_steps,
        check_val_every_n_epoch=None,
        val_check_interval=args.val_every,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
        logger=CSVLogger(run_dir, name="logs"),
        plugins=[SafeCheckpointIO()],
        enable_progress_bar=args.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = last.exists()
    started = time.perf_counter()
    trainer.fit(module, datamodule, ckpt_path=str(last) if resumed else None)
    train_seconds = time.perf_counter() - started
    best = checkpoint.best_model_path or str(last)
    val = _metrics(trainer.validate(module, datamodule, ckpt_path=best, verbose=False))
    test = _metrics(trainer.test(module, datamodule, ckpt_path=best, verbose=False))
    best_step = int(_read_step(best))
    record: dict[str, Any] = {
        "method": method,
        "label": spec.label,
        "class_path": spec.class_path,
        "kwargs": spec.kwargs,
        "fraction": fraction,
        "seed": seed,
        "commit": commit,
        "machine": _machine(),
        "precision": args.precision,
        "wall_time_s": round(train_seconds, 1),
        # a resumed run's wall time covers the part after the interruption only
        "resumed": resumed,
        "max_steps": args.max_steps,
        "best_step": best_step,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "arch": args.arch,
        "encoder": args.encoder,
        "lr": args.lr,
        "data": args.data,
        "selection_head": module.selection_head,
        "val": {k.removeprefix("val/"): v for k, v in val.items()},
        "test": {k.removeprefix("test/"): v for k, v in test.items()},
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, target)
    return record


def _read_step(path: str) -> int:
    from gpcps_lightning.checkpointing import read_checkpoint

    try:
        return int(read_checkpoint(path).get("global_step", -1))
    except (FileNotFoundError, ValueError):
        return -1


# ------------------------------------------------------------------------- tables
def load_records(folder: str | Path) -> list[dict[str, Any]]:
    """All JSON records under ``folder`` (its ``records/`` subfolder if there is one).

    Raises:
        FileNotFoundError: If no record is found.
        ValueError: If a record cannot be parsed (the file is named).
    """
    root = Path(folder)
    paths = sorted((root / "records" if (root / "records").is_dir() else root).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"No run records (*.json) under {root}. Run `gpcps reproduce run` first.")
    records = []
    for p in paths:
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Run record {p} is not valid JSON ({err}); delete it to rerun that run."
            ) from err
    return records


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _dice(record: dict[str, Any], head: str | None = None) -> float:
    return 100.0 * float(record["test"][f"dice_{head or record['selection_head']}"])


def make_tables(records: list[dict[str, Any]]) -> str:
    """Paper-style markdown: Table 1 (methods x fractions), Table 2 (ablation at 1/8), all heads."""
    fractions = sorted({float(r["fraction"]) for r in records}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    lines = ["### Table 1: test Dice (%) of the selected head, mean ± std over seeds", ""]
    header = "| Method | " + " | ".join(_fraction_name(f) for f in fractions) + " | paper (same fractions) |"
    lines += [header, "|---|" + "---|" * (len(fractions) + 1)]
    for m in methods:
        cells = [
            _mean_std([_dice(r) for r in records if r["method"] == m and r["fraction"] == f])
            for f in fractions
        ]
        paper = PAPER_TABLE1.get(m, {})
        ref = ", ".join(f"{paper[f]:.2f}" for f in fractions if f in paper) or "–"
        lines.append(f"| {METHODS[m].label} | " + " | ".join(cells) + f" | {ref} |")
    ablation = [(row, m) for m in methods for row in METHODS[m].ablation_rows]
    if ablation and any(r["fraction"] == 0.125 for r in records):
        lines += [
            "",
            "### Table 2: ablation at 1/8, test Dice (%)",
            "",
            "| Row | Losses | measured | paper |",
            "|---|---|---|---|",
        ]
        for row, m in sorted(ablation):
            values = [_dice(r) for r in records if r["method"] == m and r["fraction"] == 0.125]
            lines.append(f"| {row} | {METHODS[m].label} | {_mean_std(values)} | {PAPER_TABLE2[row]:.2f} |")
    lines += [
        "",
        "### Every head (test Dice / IoU %, mean over seeds)",
        "",
        "| Method | fraction | head | Dice | IoU | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        for f in fractions:
            group = [r for r in records if r["method"] == m and r["fraction"] == f]
            heads = sorted(
                {k.removeprefix("dice_") for r in group for k in r["test"] if k.startswith("dice_")}
            )
            for h in heads:
                dice = [100 * r["test"][f"dice_{h}"] for r in group if f"dice_{h}" in r["test"]]
                iou = [100 * r["test"][f"iou_{h}"] for r in group if f"iou_{h}" in r["test"]]
                name = _fraction_name(f)
                lines.append(
                    f"| {METHODS[m].label} | {name} | {h} | {statistics.fmean(dice):.2f} | "
                    f"{statistics.fmean(iou):.2f} | {len(group)} |"
                )
    lines += [
        "",
        "### Every run (selected head; wall time of training, validation included)",
        "",
        "| Method | fraction | seed | selected step | val Dice | test Dice | wall time (min) | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (list(METHODS).index(r["method"]), -r["fraction"], r["seed"])):
        head = r["selection_head"]
        minutes = f"{r['wall_time_s'] / 60:.1f}" + (" (resumed part)" if r.get("resumed") else "")
        fraction = _fraction_name(r["fraction"])
        lines.append(
            f"| {METHODS[r['method']].label} | {fraction} | "
            f"{r['seed']} | {r.get('best_step', '–')} | {100 * r['val'][f'dice_{head}']:.2f} | "
            f"{_dice(r):.2f} | {minutes} | {r.get('commit', '–')} |"
        )
    return "\n".join(lines) + "\n"


def make_plot(records: list[dict[str, Any]], path: str | Path) -> None:
    """Plot test Dice (selected head) against the labeled fraction, one line per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in METHODS:
        group = [r for r in records if r["method"] == m]
        if not group:
            continue
        fractions = sorted({float(r["fraction"]) for r in group})
        means, stds = [], []
        for f in fractions:
            values = [_dice(r) for r in group if r["fraction"] == f]
            means.append(statistics.fmean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=METHODS[m].label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labeled fraction of the training set")
    ax.set_ylabel("test Dice (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpcps reproduce", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train, select on val, test once, write JSON records",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = run.add_argument
    add("--methods", nargs="+", default=["supervised", "gpcps"], choices=list(METHODS), help="rows to train")
    add(
        "--fractions",
        nargs="+",
        type=float,
        default=[0.125],
        help="labeled fractions of the 800 train images",
    )
    add(
        "--seeds", nargs="+", type=int, default=[0], help="one run per seed (data order, draws, network init)"
    )
    add("--max-steps", type=int, default=5000, help="training steps per run (paper: 5000)")
    add("--val-every", type=int, default=50, help="validate every N training steps (paper epoch: 50)")
    add("--steps-per-epoch", type=int, default=None, help="epoch length; None: ceil(800 / batch size)")
    add("--image-size", type=int, default=256, help="training size in pixels (paper: 256)")
    add("--batch-size", type=int, default=16, help="labeled and unlabeled images per step, each (paper: 16)")
    add("--arch", default="Unet", help="segmentation-models-pytorch architecture")
    add("--encoder", default="resnet34", help="segmentation-models-pytorch encoder")
    add("--encoder-weights", default=None, help="encoder weights, e.g. imagenet; None: random init")
    add("--lr", type=float, default=1e-4, help="Adam learning rate of every method (paper: 1e-4)")
    add("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    add("--num-workers", type=int, default=None, help="data loader workers; None: the datamodule's default")
    add("--data", choices=["kvasir", "synthetic"], default="kvasir", help="Kvasir-SEG or generated polyps")
    add("--data-root", default="data/kvasir-seg", help="dataset folder")
    add("--download", action="store_true", help="download Kvasir-SEG into --data-root if missing")
    add("--synthetic-images", type=int, default=400, help="size of the generated dataset (--data synthetic)")
    add("--eval-at-training-size", action="store_true", help="score at the training size, not the original")
    add("--out", default="runs/reproduce", help="folder for records/ and runs/")
    add("--progress-bar", action="store_true", help="show Lightning's progress bar")
    table = sub.add_parser("table", help="markdown tables and a plot from the JSON records")
    table.add_argument("records", help="the --out folder of `run` (or a folder of records)")
    table.add_argument("--markdown", default=None, help="write the tables here (default: print)")
    table.add_argument("--plot", default=None, help="write the Dice-vs-fraction plot here (PNG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpcps reproduce``."""
    args = _parser().parse_args(argv)
    if args.command == "table":
        records = load_records(args.records)
        text = make_tables(records)
        if args.markdown:
            Path(args.markdown).write_text(text)
        else:
            print(text)
        if args.plot:
            make_plot(records, args.plot)
        return 0
    for value, name in (
        (args.max_steps, "--max-steps"),
        (args.val_every, "--val-every"),
        (args.batch_size, "--batch-size"),
    ):
        if value < 1:
            raise SystemExit(f"gpcps reproduce: {name} must be a positive integer, got {value}.")
    for fraction in args.fractions:
        if not 0 < fraction < 1 or not math.isfinite(fraction):
            raise SystemExit(f"gpcps reproduce: --fractions must lie in (0, 1), got {fraction}.")
    for fraction in args.fractions:
        for seed in args.seeds:
            for method in args.methods:
                done = record_path(Path(args.out), method, fraction, seed).exists()
                state = "done, skipped" if done else "running"
                print(f"[reproduce] {method} fraction={fraction} seed={seed}: {state}", flush=True)
                record = run_one(args, method, fraction, seed)
                head = record["selection_head"]
                print(
                    f"[reproduce] {method} fraction={fraction} seed={seed}: test dice_{head}="
                    f"{100 * record['test'][f'dice_{head}']:.2f} ({record['wall_time_s']} s)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
