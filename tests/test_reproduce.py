"""The reproduction runner: records -> tables and plot; a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpcps_lightning.reproduce import load_records, main, make_tables, record_path


def _record(method: str, fraction: float, seed: int, dice: float, head: str = "ensemble") -> dict:
    return {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "selection_head": head,
        "test": {f"dice_{head}": dice, f"iou_{head}": dice - 0.1},
        "val": {f"dice_{head}": dice},
        "wall_time_s": 1.0,
    }


def _write(tmp_path: Path, records: list[dict]) -> Path:
    for r in records:
        path = record_path(tmp_path, r["method"], r["fraction"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    return tmp_path


def test_tables_report_mean_and_std_over_seeds(tmp_path: Path) -> None:
    records = [
        _record("gpcps", 0.125, 0, 0.70),
        _record("gpcps", 0.125, 1, 0.74),
        _record("supervised", 0.125, 0, 0.60, head="net1"),
    ]
    text = make_tables(load_records(_write(tmp_path, records)))
    # mean 72.00, sample std of (70, 74) = 2.83
    assert "| GP-CPS | 72.00 ± 2.83 (n=2) | 76.64 |" in text
    assert "| UNet (supervised) | 60.00 (n=1) | 65.87 |" in text
    assert "| I | UNet (supervised) | 60.00 (n=1) | 65.87 |" in text
    assert "| IV | GP-CPS | 72.00 ± 2.83 (n=2) | 76.64 |" in text
    # one row per run, with its seed, scores and time
    assert "| GP-CPS | 1/8 | 1 | – | 74.00 | 74.00 | 0.0 | – |" in text
    assert text.count("| UNet (supervised) | 1/8 | 0 |") == 1


def test_table_command_writes_markdown_and_plot(tmp_path: Path) -> None:
    _write(tmp_path, [_record("gpcps", f, 0, 0.5 + f) for f in (0.5, 0.25, 0.125)])
    assert (
        main(
            ["table", str(tmp_path), "--markdown", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png")]
        )
        == 0
    )
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1/2 | 1/4 | 1/8" in (tmp_path / "t.md").read_text()


def test_missing_or_broken_records_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gpcps reproduce run"):
        load_records(tmp_path)
    broken = tmp_path / "records" / "x.json"
    broken.parent.mkdir()
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"x\.json is not valid JSON"):
        load_records(tmp_path)


def test_bad_run_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--fractions"):
        main(["run", "--fractions", "1.5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["run", "--methods", "nope", "--out", str(tmp_path)])


def test_run_trains_selects_tests_and_skips_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "run",
        "--methods", "supervised", "gpcps",
        "--fractions", "0.25",
        "--seeds", "0",
        "--max-steps", "2",
        "--val-every", "1",
        "--image-size", "32",
        "--batch-size", "2",
        "--encoder", "tu-resnet18",
        "--data", "synthetic",
        "--data-root", str(tmp_path / "data"),
        "--synthetic-images", "20",
        "--num-workers", "0",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(args) == 0
    records = load_records(tmp_path / "out")
    assert {r["method"] for r in records} == {"supervised", "gpcps"}
    for r in records:
        assert r["fraction"] == 0.25 and r["seed"] == 0 and r["best_step"] in (1, 2)
        head = r["selection_head"]
        assert 0.0 <= r["test"][f"dice_{head}"] <= 1.0 and 0.0 <= r["val"][f"dice_{head}"] <= 1.0
        assert r["commit"] and r["machine"] and r["wall_time_s"] > 0
    gpcps = next(r for r in records if r["method"] == "gpcps")
    assert {"dice_net1", "dice_net2", "dice_ensemble", "iou_ensemble"} <= gpcps["test"].keys()
    capsys.readouterr()
    assert main(args) == 0  # everything done: nothing is trained again
    assert capsys.readouterr().out.count("done, skipped") == 2
