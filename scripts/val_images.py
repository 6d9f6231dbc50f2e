#!/usr/bin/env python
"""Per-image validation scores of finished runs, and paired intervals on validation beside test.

    python scripts/val_images.py score --records docs/records/study-cpu --runs runs/study64 \
        --data-root data/kvasir-seg --out docs/records/study-cpu-val
    python scripts/val_images.py table --records docs/records/study-cpu --val docs/records/study-cpu-val

A run's record keeps its test scores image by image, but its validation Dice only as a mean, so a
difference between two methods on validation can be given an interval over seeds alone, which leaves out
the noise of the 100 validation images (a gain consistent over seeds on one fixed set of images can be
that set's idiosyncrasy). ``score`` evaluates each record's selected checkpoint (``best.ckpt`` in the
runner's ``--out`` folder) on the validation images, checks that the mean reproduces the record's
validation Dice, and writes one JSON per run. ``table`` prints, for the folder's planned comparisons (its
``planned.yaml``), the mean and the 95% interval over seeds and images on validation and on test, and the
interval over seeds alone on validation (the pilot's criterion).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The largest difference accepted between the recomputed and the recorded validation Dice.
TOLERANCE = 1e-4


def _datamodule(record: Mapping[str, Any], data_root: Path) -> Any:
    """The run's datamodule, from its record, reading its images from ``data_root``."""
    data = record["config"]["data"]
    kwargs = {**data["init_args"], "root": str(data_root)}
    if "download" in kwargs:
        kwargs["download"] = False
    local = sorted(k for k, v in kwargs.items() if v == "<local path>")
    if local:
        raise ValueError(
            f"Run {record['method']} seed {record['seed']}: its data options {', '.join(local)} were local "
            "paths, which the record does not keep; only the data root can be given here."
        )
    module_name, _, name = str(data["class_path"]).rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), name)(**kwargs)
    datamodule.prepare_data()
    return datamodule


def score(record: Mapping[str, Any], runs: Path, data_root: Path) -> dict[str, Any]:
    """The per-image validation scores of one record's selected checkpoint (checked against the record)."""
    from gpcps_lightning.checkpointing import read_checkpoint
    from gpcps_lightning.inference.evaluate import evaluate_module
    from gpcps_lightning.inference.predict import Preprocessing, load_module
    from gpcps_lightning.tools.reproduce import run_folder

    best = (
        run_folder(runs, record["method"], record["fraction"], record["seed"]) / "checkpoints" / "best.ckpt"
    )
    if not best.is_file():
        raise FileNotFoundError(f"No selected checkpoint {best}: give the runner's --out folder as --runs.")
    checkpoint = read_checkpoint(best)
    if int(checkpoint.get("global_step", -1)) != record["best_step"]:
        raise ValueError(
            f"{best} is from step {checkpoint.get('global_step')}, the record selected step "
            f"{record['best_step']}: the run folder holds another training."
        )
    module = load_module(checkpoint)
    datamodule = _datamodule(record, data_root)
    datamodule.setup("validate")
    scores = evaluate_module(
        module, datamodule.val_dataset.pairs, Preprocessing.from_datamodule(datamodule), heads="all"
    )
    images = {head: [[s.name, s.dice, s.iou] for s in values] for head, values in scores.items()}
    heads = {h: statistics.fmean(r[1] for r in rows if r[1] is not None) for h, rows in images.items()}
    head = record["selection_head"]
    mean, recorded = heads[head], record["val"][f"dice_{head}"]
    if abs(mean - recorded) > TOLERANCE:
        raise ValueError(
            f"{best}: validation Dice {mean:.6f} recomputed, {recorded:.6f} in the record; not the same "
            "checkpoint, images or evaluation."
        )
    return {
        "method": record["method"],
        "fraction": record["fraction"],
        "seed": record["seed"],
        "settings_id": record["settings_id"],
        "selection_head": head,
        "best_step": record["best_step"],
        "val": {f"dice_{h}": value for h, value in heads.items()},
        "val_images": images,
    }


def _target(out: Path, record: Mapping[str, Any]) -> Path:
    from gpcps_lightning.tools.reproduce import record_path

    return out / record_path(out, record["method"], record["fraction"], record["seed"]).name


def _score_all(args: argparse.Namespace) -> int:
    from gpcps_lightning.tools.provenance import code_version
    from gpcps_lightning.tools.report import load_records

    args.out.mkdir(parents=True, exist_ok=True)
    for record in load_records(args.records):
        target = _target(args.out, record)
        if target.exists():
            earlier = json.loads(target.read_text())
            if (earlier["settings_id"], earlier["best_step"]) == (record["settings_id"], record["best_step"]):
                continue  # scored earlier; a record that changed since is scored again
        clock = time.perf_counter()
        scored = {**score(record, args.runs, args.data_root), "code": code_version()}
        scored["seconds"] = round(time.perf_counter() - clock, 1)
        target.write_text(json.dumps(scored, indent=2, sort_keys=True) + "\n")
        head = scored["selection_head"]
        print(f"{target.name}: validation dice_{head} {100 * scored['val'][f'dice_{head}']:.2f}")
    return 0


def table(records: Path, val: Path) -> str:
    """The markdown table of the planned comparisons (at least two shared seeds) on validation and test."""
    from gpcps_lightning.tools.report import (
        FRACTION_NAMES,
        load_records,
        paired_difference,
        planned_comparisons,
    )

    tests = {(r["method"], r["fraction"], r["seed"]): r for r in load_records(records)}
    vals = {}
    for path in sorted(val.glob("*.json")):
        run = json.loads(path.read_text())
        vals[(run["method"], run["fraction"], run["seed"])] = run

    def fmt(interval: tuple[float, float] | None) -> str:
        return "–" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"

    lines = [
        "| planned comparison | fraction | seeds | validation: mean | validation: seeds + images | "
        "validation: seeds only | test: mean | test: seeds + images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for later, earlier in planned_comparisons(records).pairs:
        for fraction in sorted({f for _, f, _ in tests}, reverse=True):
            seeds = sorted(
                s for m, f, s in tests
                if m == later and f == fraction and all(
                    (method, fraction, s) in source for method in (later, earlier) for source in (tests, vals)
                )
            )  # fmt: skip
            if len(seeds) < 2:
                continue
            cells = []
            for source, split in ((vals, "val"), (tests, "test")):
                early = [source[(earlier, fraction, s)] for s in seeds]
                late = [source[(later, fraction, s)] for s in seeds]
                diff = paired_difference(early, late, split)
                cells += [f"{diff.mean:+.2f}", fmt(diff.both)] + ([fmt(diff.seeds)] if split == "val" else [])
            name = FRACTION_NAMES.get(fraction, f"{fraction:g}")
            cells = [f"`{later}` − `{earlier}`", name, ", ".join(map(str, seeds)), *cells]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_block(doc: Path, records: Path, val: Path, text: str) -> int:
    """Replace the table's block in ``doc`` (between its begin and end lines)."""
    command = f"python scripts/val_images.py table --records {records} --val {val}"
    begin = f"<!-- begin generated by: {command} -->\n"
    end = "<!-- end generated by: python scripts/val_images.py table -->"
    page = doc.read_text()
    if begin not in page:
        raise SystemExit(f"{doc} has no line {begin.strip()!r}: add it, and the line {end!r} below it.")
    start = page.index(begin) + len(begin)
    page = page[:start] + text + page[page.index(end, start) :]
    doc.write_text(page)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scoring = commands.add_parser("score", help="score the selected checkpoints on the validation images")
    scoring.add_argument("--records", type=Path, required=True, help="a folder of run records")
    scoring.add_argument("--runs", type=Path, required=True, help="the runner's --out folder (run folders)")
    scoring.add_argument("--data-root", type=Path, required=True, help="the Kvasir-SEG folder")
    scoring.add_argument("--out", type=Path, required=True, help="where the per-run JSON files go")
    tabling = commands.add_parser("table", help="paired intervals on validation and on test")
    tabling.add_argument("--records", type=Path, required=True, help="a folder of run records")
    tabling.add_argument("--val", type=Path, required=True, help="the files `score` wrote")
    tabling.add_argument("--doc", type=Path, help="replace the table's generated block in this page")
    args = parser.parse_args(argv)
    if args.command == "score":
        return _score_all(args)
    text = table(args.records, args.val)
    if args.doc is None:
        print(text, end="")
        return 0
    return _write_block(args.doc, args.records, args.val, text)


if __name__ == "__main__":
    sys.exit(main())
