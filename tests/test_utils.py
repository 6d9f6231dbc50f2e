"""The package's shared helpers (``gpcps_lightning._utils``)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gpcps_lightning._utils import (
    atomic_path,
    code_version,
    import_object,
    resize_to_original_sizes,
    sha256_file,
    size_pair,
)
from gpcps_lightning.callbacks import BestCheckpoint


# ----------------------------------------------------------------------------- import by dotted path
@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``utils_probe_pkg`` with a submodule its ``__init__`` does not import, and a broken one."""
    root = tmp_path / "utils_probe_pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "sub.py").write_text("VALUE = 3\n")
    (root / "broken.py").write_text("import utils_probe_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "utils_probe_pkg"
    for name in ("utils_probe_pkg.sub", "utils_probe_pkg.broken", "utils_probe_pkg"):
        sys.modules.pop(name, None)


def test_import_object_finds_classes_attributes_and_submodules(package: str) -> None:
    assert import_object("gpcps_lightning.callbacks.BestCheckpoint") is BestCheckpoint
    assert import_object(f"{package}.sub.VALUE") == 3
    assert import_object(f"{package}.sub").VALUE == 3  # not imported by its package


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_such_package_xyz.Thing", r"cannot import 'no_such_package_xyz\.Thing': No module named"),
        (
            "gpcps_lightning.NoSuchThing",
            r"cannot import 'gpcps_lightning\.NoSuchThing': module 'gpcps_lightning' has no attribute "
            r"'NoSuchThing'",
        ),
        ("GPCPSModule", r"'GPCPSModule' is not a dotted path of the form 'package\.module\.Name'"),
        ("..GPCPSModule", r"is not a dotted path"),
        ("gpcps_lightning.", r"is not a dotted path"),
    ],
)
def test_import_object_errors_name_the_path(path: str, match: str) -> None:
    with pytest.raises(ImportError, match=match):
        import_object(path)


def test_import_object_does_not_hide_a_submodules_own_import_error(package: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="utils_probe_missing_dependency"):
        import_object(f"{package}.broken")


# ----------------------------------------------------------------------------- resize to original size
def test_resize_to_original_sizes_by_hand() -> None:
    # Input value = column + 2 * row, a plane that bilinear resizing keeps inside the clamped border.
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    up, down, same = resize_to_original_sizes(image.repeat(3, 1, 1, 1), [(4, 4), (1, 2), (2, 2)])
    # align_corners=False: output pixel x reads input x' = (x + 0.5) * in / out - 0.5, clamped to >= 0.
    # Upsampling 2 -> 4 reads x' = 0 (clamped), 0.25, 0.75, 1 (clamped): columns 0, .25, .75, 1; rows
    # add twice that.
    columns = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected_up = columns[None, :] + 2 * columns[:, None]
    assert up.shape == (1, 4, 4)
    assert torch.equal(up[0], expected_up)
    assert up[0, 1].tolist() == [0.5, 0.75, 1.25, 1.5]
    # Downsampling rows 2 -> 1 reads x' = 0.5: the mean of both rows.
    assert torch.equal(down, torch.tensor([[[1.0, 2.0]]]))
    # An image already at its size comes back as it is.
    assert torch.equal(same, image[0])


def test_resize_to_original_sizes_keeps_dtype_and_checks_sizes() -> None:
    half = torch.rand(2, 1, 4, 4).half()
    assert all(p.dtype == torch.float16 for p in resize_to_original_sizes(half, [(8, 8), (4, 4)]))
    with pytest.raises(ValueError, match="Got 1 original sizes for a batch of 2 images"):
        resize_to_original_sizes(half, [(4, 4)])
    with pytest.raises(ValueError, match=r"must have shape \(N, C, H, W\)"):
        resize_to_original_sizes(half[0], [(4, 4)])


# ----------------------------------------------------------------------------- sizes
def test_size_pair() -> None:
    assert size_pair(3) == (3, 3)
    assert size_pair(np.int64(4)) == (4, 4)
    assert size_pair([2, 5]) == (2, 5) and size_pair((2, 5)) == (2, 5)
    for bad in (True, "ab", (1, 2, 3), 2.5):
        with pytest.raises(ValueError, match=r"`size` must be an int or a \(height, width\) pair"):
            size_pair(bad, "size")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`image_size` must be positive, got"):
        size_pair((0, 4))


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_path_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]

    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "new"  # the old file, untouched
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]

    with pytest.raises(FileNotFoundError, match="Nothing was written for"), atomic_path(target):
        pass
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


# ----------------------------------------------------------------------------- code version
def test_code_version_outside_a_checkout_is_unknown(tmp_path: Path) -> None:
    assert code_version(tmp_path) == {"commit": "unknown", "dirty": None, "changed_files": []}
    assert set(code_version()) == {"commit", "dirty", "changed_files"}


# ----------------------------------------------------------------------------- file hashes
@pytest.mark.parametrize("size", [0, 1, 5, 4096, 3 * 4096 + 17])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_sha256_file_is_the_digest_of_the_bytes_whatever_the_chunk(
    tmp_path: Path, size: int, chunk: int
) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=chunk) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_file_by_hand(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_every_file_hash_of_the_package_is_sha256_file() -> None:
    """Manifests, split-file settings and ST++ stage artefacts hash files with the one helper."""
    from gpcps_lightning import settings
    from gpcps_lightning.data import kvasir
    from gpcps_lightning.pipelines import stpp
    from gpcps_lightning.tools import reproduce

    for module in (kvasir, stpp, settings, reproduce):
        assert module.sha256_file is sha256_file, module.__name__
