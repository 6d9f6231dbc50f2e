"""Reading images and masks: formats, modes, mask encodings, pairing and every file error."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_data_helpers import write_pairs

from gpcps_lightning.data import binarize_mask, pair_image_mask_folders, read_image, read_mask
from gpcps_lightning.data.datasets import check_image_mask_pairs, check_images
from gpcps_lightning.data.io import read_image_size, resize_mask

MASK = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)  # the expected {0, 1} result of every encoding below


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize(
    ("name", "raw", "lossy"),
    [
        ("0/1 uint8", MASK, False),
        ("0/255 uint8", MASK * 255, False),
        ("bool", MASK.astype(bool), False),
        ("rgb equal channels", np.repeat((MASK * 255)[..., None], 3, axis=-1), False),
        ("rgba", np.dstack([MASK * 255] * 3 + [np.full_like(MASK, 255)]), False),
        ("jpeg noise", np.array([[3, 250, 247], [9, 0, 255]], np.uint8), True),
        ("jpeg noise, 0/1-like max", np.array([[0, 1, 1], [0, 0, 1]], np.uint8) * 254 + 1, True),
        ("16-bit 0/65535", MASK.astype(np.uint16) * 65535, False),
        ("float 0/1", MASK.astype(np.float32), False),
        ("float 0/255", MASK.astype(np.float32) * 255, False),
    ],
)
def test_binarize_mask_encodings(name: str, raw: np.ndarray, lossy: bool) -> None:
    out = binarize_mask(raw, lossy=lossy)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, MASK, err_msg=name)


def test_binarize_empty_jpeg_with_noise_stays_empty() -> None:
    # An empty JPEG mask whose noise peaks at 1 is not a 0/1 mask: threshold at 128.
    noisy_empty = np.array([[0, 1, 0], [1, 0, 1]], np.uint8)
    assert binarize_mask(noisy_empty, lossy=True).sum() == 0


def test_binarize_rejects_class_index_mask() -> None:
    with pytest.raises(ValueError, match=r"m\.png.*maximum 3.*binary"):
        binarize_mask(np.array([[0, 1, 2, 3]], np.uint8), name="m.png")


@pytest.mark.parametrize(
    ("ext", "mode", "array"),
    [
        (".png", "L", MASK * 255),
        (".png", "L", MASK),
        (".bmp", "L", MASK * 255),
        (".tif", "L", MASK * 255),
        (".png", "RGB", np.repeat((MASK * 255)[..., None], 3, axis=-1)),
        (".png", "P", MASK),  # palette indices 0/1
        (".png", "1", MASK.astype(bool)),
    ],
)
def test_read_mask_files(tmp_path: Path, ext: str, mode: str, array: np.ndarray) -> None:
    path = tmp_path / f"m{ext}"
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("L").convert("P")
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    elif mode == "1":
        img = img.convert("1")
    img.save(path)
    np.testing.assert_array_equal(read_mask(path), MASK)


def test_read_jpeg_mask(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:37, 0:45]
    big = (((yy - 18) ** 2 + (xx - 20) ** 2) < 150).astype(np.uint8) * 255  # a disc, off the 8x8 JPEG grid
    Image.fromarray(big).save(tmp_path / "m.jpg", quality=75)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert not set(np.unique(raw)) <= {0, 255}  # really compressed
    np.testing.assert_array_equal(read_mask(tmp_path / "m.jpg"), big // 255)


def test_read_tiff_masks_pillow_cannot_decode(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "m.tif", MASK.astype(np.float32))
    tifffile.imwrite(
        tmp_path / "m3.tiff", np.repeat(MASK[..., None], 3, -1).astype(np.float32), photometric="rgb"
    )
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), MASK)
    np.testing.assert_array_equal(read_mask(tmp_path / "m3.tiff"), MASK)


# ----------------------------------------------------------------------------- images
RGB = np.array([[[10, 20, 30], [200, 100, 50]]], np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_read_rgb_image_lossless(tmp_path: Path, ext: str) -> None:
    Image.fromarray(RGB).save(tmp_path / f"x{ext}")
    out = read_image(tmp_path / f"x{ext}")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, RGB)


def test_read_image_modes_become_rgb(tmp_path: Path) -> None:
    gray = np.array([[0, 128, 255]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.repeat(gray[..., None], 3, -1))
    rgba = np.dstack([RGB, np.full((1, 2, 1), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), RGB)
    pal = Image.fromarray(RGB).quantize(4)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    solid = np.broadcast_to(RGB[:, 1:], (16, 16, 3)).copy()
    Image.fromarray(solid).save(tmp_path / "c.jpg", quality=95)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - solid).max() <= 3
    gray16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[..., 0], [[0, 100, 255]])


def test_read_tiff_images_pillow_cannot_decode(tmp_path: Path) -> None:
    f32 = RGB.astype(np.float32) / 255.0
    tifffile.imwrite(tmp_path / "f.tif", f32, photometric="rgb")
    with pytest.raises(Exception):  # noqa: B017 (the premise: Pillow cannot read it)
        Image.open(tmp_path / "f.tif").load()
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), RGB)
    assert read_image_size(tmp_path / "f.tif") == (1, 2)
    planar = np.moveaxis(RGB.astype(np.uint16) * 257, -1, 0)  # (3, 1, 2) 16-bit planar
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), RGB)
    # Compressions tifffile cannot decode without imagecodecs go through Pillow.
    Image.fromarray(RGB).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif"), RGB)


def test_resize_mask_stays_binary() -> None:
    m = np.kron(MASK, np.ones((5, 5), np.uint8))
    out = resize_mask(m, (7, 11))
    assert out.shape == (7, 11) and set(np.unique(out)) <= {0, 1} and out.sum() > 0


# ----------------------------------------------------------------------------- pairing and errors
def test_pairing_by_stem_with_different_extensions(tmp_path: Path) -> None:
    write_pairs(tmp_path, 3, image_ext=".jpg", mask_ext=".png")
    (tmp_path / ".hidden").write_text("ignored")
    pairs = pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")
    assert [p.name for p in pairs] == ["img000", "img001", "img002"]
    assert all(p.image.suffix == ".jpg" and p.mask.suffix == ".png" for p in pairs)
    assert all(p.image.stem == p.mask.stem == p.name for p in pairs)


def test_extension_case_insensitive(tmp_path: Path) -> None:
    write_pairs(tmp_path, 1, image_ext=".JPG", mask_ext=".PNG")
    assert len(pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")) == 1


def test_image_without_mask_lists_names(tmp_path: Path) -> None:
    write_pairs(tmp_path, 4)
    (tmp_path / "masks" / "img001.png").unlink()
    (tmp_path / "masks" / "img003.png").unlink()
    with pytest.raises(ValueError, match=r"2 image\(s\).*have no mask.*img001, img003"):
        pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")


def test_mask_without_image_lists_names(tmp_path: Path) -> None:
    write_pairs(tmp_path, 3)
    (tmp_path / "images" / "img002.png").unlink()
    with pytest.raises(ValueError, match=r"1 mask\(s\).*have no image.*img002"):
        pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")


def test_same_stem_twice(tmp_path: Path) -> None:
    write_pairs(tmp_path, 2)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "img001.jpg")
    with pytest.raises(ValueError, match=r"same name.*img001\.jpg and img001\.png"):
        pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")


def test_unsupported_entries_are_an_error(tmp_path: Path) -> None:
    write_pairs(tmp_path, 2)
    (tmp_path / "images" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt.*Move them out"):
        pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"images folder .* is empty"):
        pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")
    write_pairs(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match=r"masks folder .*nowhere.* does not exist"):
        pair_image_mask_folders(tmp_path / "images", tmp_path / "nowhere")


def test_unreadable_file_named_at_check(tmp_path: Path) -> None:
    write_pairs(tmp_path, 2)
    (tmp_path / "images" / "img001.png").write_bytes(b"not an image at all")
    pairs = pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ValueError, match=r"Cannot read .*img001\.png.*unreadable or truncated"):
        check_image_mask_pairs(pairs)
    with pytest.raises(ValueError, match=r"img001\.png"):
        check_images([p.image for p in pairs])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_truncated_file_found_by_full_check_and_by_decoding(tmp_path: Path) -> None:
    write_pairs(tmp_path, 2, sizes=[(64, 64)], image_ext=".jpg")
    _truncate(tmp_path / "images" / "img000.jpg")
    pairs = pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")
    check_image_mask_pairs(pairs, full=False)  # the header is intact
    with pytest.raises(ValueError, match=r"Cannot read .*img000\.jpg.*truncated"):
        check_image_mask_pairs(pairs, full=True)
    with pytest.raises(ValueError, match=r"img000\.jpg"):
        read_image(pairs[0].image)


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    write_pairs(tmp_path, 2, sizes=[(20, 30)])
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "masks" / "img001.png")
    pairs = pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")
    pattern = (
        re.escape(str(tmp_path / "images" / "img001.png"))
        + r" is 30x20.*"
        + re.escape(str(tmp_path / "masks" / "img001.png"))
    )
    with pytest.raises(ValueError, match=pattern):
        check_image_mask_pairs(pairs)
    with pytest.raises(ValueError, match=pattern):
        check_image_mask_pairs(pairs, full=True)


def test_check_returns_sizes(tmp_path: Path) -> None:
    write_pairs(tmp_path, 2, sizes=[(20, 30), (17, 9)])
    pairs = pair_image_mask_folders(tmp_path / "images", tmp_path / "masks")
    assert check_image_mask_pairs(pairs, threads=2) == [(20, 30), (17, 9)]
    assert check_image_mask_pairs(pairs, full=True) == [(20, 30), (17, 9)]


def test_reduced_scale_jpeg_decoding_matches_full_decoding(tmp_path: Path) -> None:
    # A large JPEG read for a small training size is decoded at a reduced scale (faster); after the
    # resize the result is close to decoding in full, and the file's size is still reported.
    from gpcps_lightning.data.io import read_image_and_size, read_mask_and_size, resize_image

    yy, xx = np.mgrid[0:400, 0:520]
    image = np.stack([(yy * 255 // 400), (xx * 255 // 520), ((yy + xx) % 256)], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.jpg", quality=95)
    mask = (((yy - 200) ** 2 + (xx - 260) ** 2) < 120**2).astype(np.uint8) * 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=90)
    small, size = read_image_and_size(tmp_path / "big.jpg", (64, 64))
    assert size == (400, 520) and small.shape == (100, 130, 3)  # 1/4 scale is still >= 64
    full = resize_image(read_image(tmp_path / "big.jpg"), (64, 64))
    assert np.abs(resize_image(small, (64, 64)).astype(int) - full).mean() < 3
    small_mask, mask_size = read_mask_and_size(tmp_path / "mask.jpg", (64, 64))
    assert mask_size == (400, 520)
    full_mask = resize_mask(read_mask(tmp_path / "mask.jpg"), (64, 64))
    assert (resize_mask(small_mask, (64, 64)) != full_mask).mean() < 0.01
