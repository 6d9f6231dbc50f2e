"""Helpers shared by the data tests (this module holds no tests): small image/mask folders on disk."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile


def blob_mask(h: int, w: int, k: int) -> np.ndarray:
    """A {0, 1} mask with a rectangle whose place depends on k (never empty, never full)."""
    m = np.zeros((h, w), np.uint8)
    y0, x0 = (k * 3) % max(1, h // 2), (k * 5) % max(1, w // 2)
    m[y0 : y0 + h // 3 + 1, x0 : x0 + w // 3 + 1] = 1
    return m


def image_for(mask: np.ndarray, k: int) -> np.ndarray:
    """An RGB image that differs per k and is brighter on the mask."""
    rng = np.random.default_rng(k)
    img = rng.integers(0, 100, (*mask.shape, 3), dtype=np.uint8)
    img[mask.astype(bool)] += 120
    return img


def write_pairs(
    root: Path,
    n: int,
    sizes: Sequence[tuple[int, int]] | None = None,
    image_ext: str = ".png",
    mask_ext: str = ".png",
    prefix: str = "img",
) -> list[str]:
    """Write n image/mask pairs (masks 0/255) under root/images and root/masks; return the names."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n):
        h, w = sizes[k % len(sizes)] if sizes else (24 + (k % 3) * 4, 32 - (k % 2) * 4)
        mask = blob_mask(h, w, k)
        name = f"{prefix}{k:03d}"
        Image.fromarray(image_for(mask, k)).save(root / "images" / f"{name}{image_ext}")
        Image.fromarray(mask * 255).save(root / "masks" / f"{name}{mask_ext}")
        names.append(name)
    return names


def write_images(folder: Path, n: int, ext: str = ".jpg", prefix: str = "extra") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"{prefix}{k:03d}{ext}"
        Image.fromarray(image_for(blob_mask(20, 28, k), 100 + k)).save(path)
        paths.append(path)
    return paths


@contextmanager
def record_opens(monkeypatch) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
    """Record the path of every file opened through builtins.open or PIL.Image.open."""
    opened: list[str] = []
    real_open, real_pil_open = builtins.open, Image.open

    def spy_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, Path)):
            opened.append(str(Path(file).resolve()))
        return real_open(file, *args, **kwargs)

    def spy_pil_open(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(fp, (str, Path)):
            opened.append(str(Path(fp).resolve()))
        return real_pil_open(fp, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", spy_open)
        m.setattr(Image, "open", spy_pil_open)
        yield opened


@contextmanager
def record_decodes(monkeypatch) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
    """Record the path of every file whose pixels Pillow decodes (reading a header decodes nothing)."""
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(self, "filename", None):
            decoded.append(str(Path(self.filename).resolve()))
        return real_load(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", spy_load)
        yield decoded


def write_kvasir_standin(root: Path) -> Path:
    """A Kvasir-SEG stand-in under root/images and root/masks: the 1000 shipped names as tiny pairs."""
    from gpcps_lightning.data import read_split_file
    from gpcps_lightning.data.kvasir import kvasir_seg_resource

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = [
        n for split in ("train", "val", "test") for n in read_split_file(kvasir_seg_resource(f"{split}.txt"))
    ]
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 255
    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 0] = 150
    for name in names:
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root
