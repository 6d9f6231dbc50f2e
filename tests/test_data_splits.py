"""Splits: fraction splits, split files, nesting, the shipped Kvasir-SEG split, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data_helpers import write_images, write_pairs

from gpcps_lightning.data import FolderDataModule, ratio_split, read_split_file, split_folder
from gpcps_lightning.data.kvasir import (
    KVASIR_SEG_SPLIT_SEED,
    kvasir_seg_resource,
    make_kvasir_seg_splits,
)


def _names(pairs) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.name for p in pairs]


# ----------------------------------------------------------------------------- fraction splits
def test_ratio_split_sizes_disjoint_deterministic() -> None:
    names = [f"n{i:02d}" for i in range(50)]
    train, val, test = ratio_split(names, 0.1, 0.2, seed=4)
    assert (len(train), len(val), len(test)) == (35, 5, 10)
    assert sorted(train + val + test) == names
    assert ratio_split(list(reversed(names)), 0.1, 0.2, seed=4) == (train, val, test)  # order-independent
    assert ratio_split(names, 0.1, 0.2, seed=5) != (train, val, test)


def test_folder_split_and_nested_labeled_subsets(tmp_path: Path) -> None:
    write_pairs(tmp_path, 40, sizes=[(8, 8)])
    splits = {
        f: split_folder(tmp_path, labeled_fraction=f, val_fraction=0.1, test_fraction=0.1, split_seed=7)
        for f in (0.5, 0.25, 0.125)
    }
    a, b, c = (splits[f] for f in (0.5, 0.25, 0.125))
    assert (len(a.labeled), len(b.labeled), len(c.labeled)) == (16, 8, 4)  # of 32 training images
    assert set(_names(c.labeled)) < set(_names(b.labeled)) < set(_names(a.labeled))
    for s in (a, b, c):
        assert _names(s.val) == _names(a.val) and len(s.val) == 4 and len(s.test) == 4
        train = set(_names(s.labeled)) | {p.stem for p in s.unlabeled}
        assert len(train) == 32 and not train & set(_names(s.val) + _names(s.test))
        assert not set(_names(s.labeled)) & {p.stem for p in s.unlabeled}
    again = split_folder(tmp_path, labeled_fraction=0.25, split_seed=7)
    assert _names(again.labeled) == _names(b.labeled)


def test_unlabeled_dir_joins_the_unlabeled_set(tmp_path: Path) -> None:
    write_pairs(tmp_path / "data", 10, sizes=[(8, 8)])
    extra = write_images(tmp_path / "extra", 3)
    s = split_folder(tmp_path / "data", labeled_fraction=1.0, unlabeled_dir=tmp_path / "extra")
    assert len(s.labeled) == 8 and s.unlabeled == extra


# ----------------------------------------------------------------------------- split files
def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_split_files(tmp_path: Path) -> None:
    names = write_pairs(tmp_path / "d", 10, sizes=[(8, 8)])
    train = _write(tmp_path / "train.txt", ["# comment", *names[:6], ""])
    val = _write(tmp_path / "val.txt", [n + ".png" for n in names[6:8]])  # extensions are accepted
    test = _write(tmp_path / "test.txt", names[8:])
    labeled = _write(tmp_path / "lab.txt", names[:2])
    s = split_folder(tmp_path / "d", train_split=train, val_split=val, test_split=test, labeled_split=labeled)
    assert _names(s.labeled) == names[:2]
    assert [p.stem for p in s.unlabeled] == names[2:6]
    assert _names(s.val) == names[6:8] and _names(s.test) == names[8:]


def test_split_file_errors(tmp_path: Path) -> None:
    names = write_pairs(tmp_path / "d", 6, sizes=[(8, 8)])
    train = _write(tmp_path / "train.txt", names[:4])
    val = _write(tmp_path / "val.txt", names[4:])
    with pytest.raises(FileNotFoundError, match=r"`val_split`.*nope\.txt does not exist"):
        split_folder(tmp_path / "d", train_split=train, val_split=str(tmp_path / "nope.txt"))
    bad = _write(tmp_path / "bad.txt", ["img000", "ghost"])
    with pytest.raises(ValueError, match=r"`val_split` lists 1 name\(s\) that are not .*: ghost"):
        split_folder(tmp_path / "d", train_split=train, val_split=bad)
    overlap = _write(tmp_path / "overlap.txt", [names[0], names[5]])
    with pytest.raises(ValueError, match=r"`train_split` and `val_split` share 1 name\(s\): img000"):
        split_folder(tmp_path / "d", train_split=train, val_split=overlap)
    twice = _write(tmp_path / "twice.txt", [names[4], names[4]])
    with pytest.raises(ValueError, match=r"more than once: img004"):
        read_split_file(twice, "val_split")
    empty = _write(tmp_path / "empty.txt", ["# nothing"])
    with pytest.raises(ValueError, match=r"lists no image names"):
        read_split_file(empty)
    outside = _write(tmp_path / "lab.txt", [names[4]])
    with pytest.raises(
        ValueError, match=r"`labeled_split` lists 1 name\(s\) that are not in the training set"
    ):
        split_folder(tmp_path / "d", train_split=train, val_split=val, labeled_split=outside)
    unused_val = _write(tmp_path / "val1.txt", names[4:5])
    with pytest.warns(UserWarning, match=r"1 image/mask pair\(s\) .* in none of the split files.*img005"):
        split_folder(tmp_path / "d", train_split=train, val_split=unused_val, labeled_fraction=0.5)


def test_fraction_errors(tmp_path: Path) -> None:
    write_pairs(tmp_path, 10, sizes=[(8, 8)])
    with pytest.raises(
        ValueError, match=r"`labeled_fraction`=0.01 of the 8 training images .* leaves no labeled"
    ):
        split_folder(tmp_path, labeled_fraction=0.01)
    with pytest.raises(
        ValueError, match=r"`labeled_fraction`=1.0 labels all 8 .* no unlabeled image.*unlabeled_dir"
    ):
        split_folder(tmp_path, labeled_fraction=1.0)
    with pytest.raises(ValueError, match=r"`val_fraction`=0.01 of 10 images gives an empty validation set"):
        split_folder(tmp_path, val_fraction=0.01)
    with pytest.raises(ValueError, match=r"leave no training image"):
        ratio_split([f"{i}" for i in range(3)], 0.5, 0.4, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_split": "a.txt"}, "`train_split` and `val_split` go together"),
        ({"test_split": "a.txt"}, "`test_split` needs"),
        ({"val_fraction": 0.0}, "`val_fraction`"),
        ({"test_fraction": -0.1}, "`test_fraction`"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "`test_fraction`"),
        ({"split_seed": -1}, "`split_seed`"),
    ],
)
def test_folder_datamodule_option_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FolderDataModule(root="x", **kwargs)


def test_missing_root(tmp_path: Path) -> None:
    dm = FolderDataModule(root=str(tmp_path / "absent"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"data root .*absent does not exist"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- shipped Kvasir-SEG split
def _shipped(name: str) -> list[str]:
    return read_split_file(kvasir_seg_resource(f"{name}.txt"))


def test_kvasir_split_files_sizes_disjoint_nested() -> None:
    train, val, test = _shipped("train"), _shipped("val"), _shipped("test")
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert len(set(train) | set(val) | set(test)) == 1000
    labeled = {s: set(_shipped(f"labeled_{s}")) for s in ("1-2", "1-4", "1-8", "1-16", "1-32")}
    assert [len(v) for v in labeled.values()] == [400, 200, 100, 50, 25]
    assert labeled["1-32"] < labeled["1-16"] < labeled["1-8"] < labeled["1-4"] < labeled["1-2"] < set(train)


def test_kvasir_split_files_regenerate_from_seed() -> None:
    names = _shipped("train") + _shipped("val") + _shipped("test")
    regenerated = make_kvasir_seg_splits(names, KVASIR_SEG_SPLIT_SEED)
    for key, values in regenerated.items():
        assert values == _shipped(key), key


def test_kvasir_manifest_lists_2000_files_matching_the_split() -> None:
    lines = kvasir_seg_resource("SHA256SUMS").read_text().splitlines()
    assert len(lines) == 2000
    paths = [line.split("  ", 1)[1] for line in lines]
    stems = {Path(p).stem for p in paths}
    assert stems == set(_shipped("train") + _shipped("val") + _shipped("test"))
    assert sum(p.startswith("images/") for p in paths) == 1000 == sum(p.startswith("masks/") for p in paths)
