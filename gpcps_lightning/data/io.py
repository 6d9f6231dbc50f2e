"""Reading images and masks from disk: any supported format in, RGB uint8 / binary uint8 out.

Everything here is pure NumPy/Pillow (no torch), runs in DataLoader workers, and raises errors that
name the offending file and say what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "binarize_mask",
    "list_image_files",
    "preview_names",
    "read_image",
    "read_image_and_size",
    "read_image_size",
    "read_mask",
    "read_mask_and_size",
    "resize_image",
    "resize_mask",
    "to_rgb_uint8",
]

#: File extensions (lower case) read as images or masks.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_TIFF = (".tif", ".tiff")
_LOSSY = (".jpg", ".jpeg")


def _decode_error(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"Cannot read {path}: {err}. The file is unreadable or truncated; replace it with an intact copy "
        "or remove it together with its image/mask partner."
    )


def _decode_pillow(
    path: Path, palette_indices: bool, draft: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(path) as img:
        w, h = img.size
        if draft is not None and img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays >= the requested size:
            # several times faster than a full decode for images much larger than the training size.
            img.draft(img.mode, (draft[1], draft[0]))
        img.load()
        if img.mode == "P" and not palette_indices:
            return np.array(img.convert("RGBA" if "transparency" in img.info else "RGB")), (h, w)
        if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            return np.array(img.convert("RGB")), (h, w)
        return np.array(img), (h, w)


def _decode_tifffile(path: Path, palette_indices: bool) -> np.ndarray | None:
    """First page of a TIFF with tifffile, or ``None`` for photometric types better left to Pillow."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page: Any = tif.pages[0]
        photometric = int(page.photometric)
        # MINISBLACK (1) and RGB (2) are plain arrays; PALETTE (3) only when the indices are wanted.
        if photometric in (1, 2) or (photometric == 3 and palette_indices):
            a = np.asarray(page.asarray())
            if int(page.planarconfig) == 2 and a.ndim == 3:
                a = np.moveaxis(a, 0, -1)  # separate planes (C, H, W) -> (H, W, C)
            return a
    return None


def _decode(
    path: Path, palette_indices: bool = False, draft: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a file to a NumPy array; also return the file's (height, width).

    TIFFs go through tifffile first (it reads 16-bit, float and planar data that Pillow misreads or
    cannot read) and through Pillow for the photometric types and compressions tifffile leaves out;
    other formats through Pillow. Palette images give their colours, or their indices when
    ``palette_indices`` (masks). ``draft`` (height, width) allows JPEGs to be decoded at a reduced
    scale no smaller than it.
    """
    tiff_error: Exception | None = None
    if path.suffix.lower() in _TIFF:
        try:
            decoded = _decode_tifffile(path, palette_indices)
            if decoded is not None:
                return decoded, (int(decoded.shape[0]), int(decoded.shape[1]))
        except Exception as err:  # tifffile raises many types (ValueError, TiffFileError, ...)
            tiff_error = err
    try:
        return _decode_pillow(path, palette_indices, draft)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if tiff_error is not None:
            err = ValueError(f"{err}; tifffile: {tiff_error}")
        raise _decode_error(path, err) from err


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Read the (height, width) of an image from its header, without decoding the pixels.

    Args:
        path: Image file.

    Returns:
        ``(height, width)``.

    Raises:
        ValueError: If the file is not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            return int(h), int(w)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if path.suffix.lower() in _TIFF:
            try:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    first: Any = tif.pages[0]
                    return int(first.imagelength), int(first.imagewidth)
            except Exception as tiff_err:
                raise _decode_error(path, tiff_err) from tiff_err
        raise _decode_error(path, err) from err


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        # 16-bit data (also Pillow's 32-bit "I" mode holding a 16-bit PNG): keep the high byte's range.
        if a.dtype.itemsize >= 2 and a.size and a.max() > 255:
            return np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.clip(a, 0, 255).astype(np.uint8)
    raise TypeError(f"Unsupported pixel type {a.dtype}.")


def to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    """Convert a decoded image array to 3-channel RGB uint8.

    Grayscale is repeated over three channels, an alpha channel is dropped, 16-bit and float data are
    scaled to 0-255 (floats with a maximum of at most 1 are taken as 0-1 intensities).

    Args:
        a: Decoded image, (H, W) or (H, W, C) with C in 1-4.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        ValueError: If the array does not look like a 2-D image.
    """
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"Expected a 2-D image with 1-4 channels, got an array of shape {a.shape}.")
    a = _scale_to_uint8(a)
    c = a.shape[-1]
    if c in (1, 2):  # gray, gray + alpha
        a = np.repeat(a[:, :, :1], 3, axis=-1)
    elif c == 4:  # RGBA
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def read_image(path: str | Path, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read any supported image as RGB uint8 (see :func:`read_image_and_size`).

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        ValueError: If the file is unreadable, truncated or not a 2-D image.
    """
    return read_image_and_size(path, min_size)[0]


def read_image_and_size(
    path: str | Path, min_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read any supported image as RGB uint8, with the file's size.

    Args:
        path: Image file (jpg, jpeg, png, bmp, tif, tiff; TIFFs that Pillow cannot decode go through
            tifffile).
        min_size: ``(height, width)`` the image will be resized to: a JPEG may then be decoded at 1/2,
            1/4 or 1/8 of its size as long as it stays at least this large (much faster). ``None``:
            full resolution.

    Returns:
        The (H, W, 3) uint8 array (smaller than the file if decoded at a reduced scale) and the file's
        ``(height, width)``.

    Raises:
        ValueError: If the file is unreadable, truncated or not a 2-D image.
    """
    path = Path(path)
    a, size = _decode(path, draft=min_size)
    try:
        return to_rgb_uint8(a), size
    except (ValueError, TypeError) as err:
        raise ValueError(f"Cannot use {path} as an image: {err}") from err


def binarize_mask(a: np.ndarray, lossy: bool = False, name: str = "mask") -> np.ndarray:
    """Turn a decoded mask of any common encoding into a {0, 1} uint8 array.

    Colour masks are reduced to their maximum over the colour channels (an alpha channel is ignored),
    then thresholded at half of their value range: 0.5 for 0/1 masks (maximum at most 1), 128 for
    8-bit masks (0/255, JPEG-compressed values near 0 and 255), 32768 for 16-bit masks. A JPEG mask is
    always taken as 8-bit (its noise can leave a maximum of 1 in an empty mask).

    Args:
        a: Decoded mask, (H, W) or (H, W, C).
        lossy: Whether the mask came from a lossy (JPEG) file.
        name: How to name the mask in error messages (its path).

    Returns:
        (H, W) uint8 array with values in {0, 1}.

    Raises:
        ValueError: If a lossless mask has nonzero values but none reaches half the range (a class-index
            mask such as {0, 1, 2} would otherwise silently become empty), or if it is not 2-D.
    """
    if a.ndim == 3:
        if a.shape[-1] in (2, 4):  # drop alpha
            a = a[..., :-1]
        # Channel by channel: numpy's reduction over a short last axis is slow.
        a = np.maximum.reduce([a[..., c] for c in range(a.shape[-1])])
    if a.ndim != 2:
        raise ValueError(f"Mask {name} must be a 2-D image, got an array of shape {a.shape}.")
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    peak = float(a.max()) if a.size else 0.0
    if lossy or 1.0 < peak <= 255.0:
        threshold = 128.0 if np.issubdtype(a.dtype, np.integer) else 127.5
    elif peak <= 1.0:
        threshold = 0.5
    else:
        threshold = 32768.0
    out = (a >= threshold).astype(np.uint8)
    if peak > 0 and not out.any() and not lossy:
        raise ValueError(
            f"Mask {name} has nonzero values (maximum {peak:g}) but none reaches half its range "
            f"({threshold:g}). Masks must be binary: 0/1, 0/255 or 0/65535 (a class-index mask must be "
            "converted to a binary one first)."
        )
    return out


def read_mask(path: str | Path, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as {0, 1} uint8 (see :func:`read_mask_and_size`).

    Returns:
        (H, W) uint8 array with values in {0, 1}.

    Raises:
        ValueError: If the file is unreadable or truncated, or not a binary mask.
    """
    return read_mask_and_size(path, min_size)[0]


def read_mask_and_size(
    path: str | Path, min_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a binary mask of any supported format and encoding as {0, 1} uint8.

    Palette (indexed) masks are read as their indices, so 0/1 palette masks work.

    Args:
        path: Mask file.
        min_size: As for :func:`read_image` (a JPEG mask may be decoded at a reduced scale).

    Returns:
        The (H, W) uint8 array with values in {0, 1} (smaller than the file if decoded at a reduced
        scale) and the file's ``(height, width)``.

    Raises:
        ValueError: If the file is unreadable or truncated, or not a binary mask (see
            :func:`binarize_mask`).
    """
    path = Path(path)
    a, size = _decode(path, palette_indices=True, draft=min_size)
    return binarize_mask(a, lossy=path.suffix.lower() in _LOSSY, name=str(path)), size


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image with antialiased bilinear interpolation.

    Args:
        image: (H, W, 3) uint8.
        size: Target ``(height, width)``.

    Returns:
        (height, width, 3) uint8.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a {0, 1} mask: bilinear on 0/255, then threshold at 128 (smoother than nearest).

    Args:
        mask: (H, W) uint8 in {0, 1}.
        size: Target ``(height, width)``.

    Returns:
        (height, width) uint8 in {0, 1}.
    """
    h, w = size
    if mask.shape == (h, w):
        return mask
    big = Image.fromarray(mask * np.uint8(255)).resize((w, h), Image.Resampling.BILINEAR)
    return (np.asarray(big) >= 128).astype(np.uint8)


def list_image_files(folder: Path, what: str) -> dict[str, Path]:
    """List the image files of a folder by stem, refusing anything ambiguous or unexpected.

    Hidden files (names starting with ``.``) are ignored; any other file or folder whose extension is
    not in :data:`IMAGE_EXTENSIONS` is an error, as are two files with the same stem.

    Args:
        folder: Folder to list.
        what: How to call the folder in error messages (``"images"``, ``"masks"``, ...).

    Returns:
        ``{stem: path}`` sorted by stem.

    Raises:
        FileNotFoundError: If ``folder`` does not exist or is not a folder.
        ValueError: If it holds no images, unsupported entries or two files with the same stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The {what} folder {folder} does not exist (or is not a folder). Create it and put the {what} "
            "there, or point the datamodule at the right root."
        )
    by_stem: dict[str, list[Path]] = {}
    unsupported: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(entry.stem, []).append(entry)
        else:
            unsupported.append(entry.name + ("/" if entry.is_dir() else ""))
    if unsupported:
        raise ValueError(
            f"The {what} folder {folder} holds entries that are not images with a supported extension "
            f"({', '.join(IMAGE_EXTENSIONS)}): {preview_names(unsupported)}. Move them out of the folder."
        )
    duplicates = {s: p for s, p in by_stem.items() if len(p) > 1}
    if duplicates:
        listed = [" and ".join(p.name for p in paths) for paths in duplicates.values()]
        raise ValueError(
            f"The {what} folder {folder} holds files with the same name but different extensions, which "
            f"cannot be paired unambiguously: {preview_names(listed)}. Keep one file per name."
        )
    if not by_stem:
        raise ValueError(
            f"The {what} folder {folder} is empty: it holds no files with a supported extension "
            f"({', '.join(IMAGE_EXTENSIONS)})."
        )
    return {s: p[0] for s, p in sorted(by_stem.items())}


def preview_names(names: Sequence[str] | Iterable[str], limit: int = 10) -> str:
    """The first ``limit`` names joined by commas, with the total when there are more, for messages.

    Args:
        names: The names to show.
        limit: How many are shown.

    Returns:
        ``"a, b, c"``, or ``"a, b ... (12 in all)"`` when there are more than ``limit``.
    """
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")
