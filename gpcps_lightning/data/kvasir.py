"""Kvasir-SEG: download with integrity checking, and the fixed split every user trains on.

The package ships, in ``gpcps_lightning/data/resources/kvasir_seg/``:

- ``train.txt``, ``val.txt``, ``test.txt``: one fixed random 800/100/100 split of the 1000 pairs;
- ``labeled_1-2.txt`` ... ``labeled_1-32.txt``: labeled subsets of the 800 (400/200/100/50/25 names),
  nested (1/16 in 1/8 in 1/4 in 1/2);
- ``SHA256SUMS``: the SHA-256 of the 2000 files (``images/<id>.jpg``, ``masks/<id>.jpg``).

They were made once from a verified copy by :func:`write_kvasir_seg_resources` with
:data:`KVASIR_SEG_SPLIT_SEED` (``python -m gpcps_lightning.data.kvasir --root <copy> --out <dir>``); the
split is :func:`gpcps_lightning.data.splits.ratio_split` (10% val, 10% test) and the labeled subsets
the first 400/200/100/50 names of one seeded permutation of the training names, so the same seed gives
the same files.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import math
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from gpcps_lightning._utils import sha256_file
from gpcps_lightning.data.datamodule import SemiSupervisedDataModule
from gpcps_lightning.data.datasets import pair_image_mask_folders
from gpcps_lightning.data.io import preview_names
from gpcps_lightning.data.splits import DataSplit, ratio_split, round_half_up, split_folder

__all__ = [
    "KVASIR_SEG_FRACTIONS",
    "KVASIR_SEG_SPLIT_SEED",
    "KVASIR_SEG_URL",
    "KvasirSEGDataModule",
    "download_and_extract",
    "download_kvasir_seg",
    "find_kvasir_seg",
    "kvasir_seg_resource",
    "make_kvasir_seg_splits",
    "safe_extract_zip",
    "verify_manifest",
    "write_kvasir_seg_resources",
    "write_manifest",
]

log = logging.getLogger(__name__)

#: The official archive (its top folder is ``Kvasir-SEG/`` with ``images/`` and ``masks/``).
KVASIR_SEG_URL = "https://datasets.simula.no/downloads/kvasir-seg.zip"
#: Seed the shipped split files were made with (see :func:`make_kvasir_seg_splits`).
KVASIR_SEG_SPLIT_SEED = 2020
#: Shipped labeled fractions and the suffix of their split files.
KVASIR_SEG_FRACTIONS: dict[float, str] = {
    1 / 2: "1-2",
    1 / 4: "1-4",
    1 / 8: "1-8",
    1 / 16: "1-16",
    1 / 32: "1-32",
}
_ARCHIVE_FOLDER = "Kvasir-SEG"


def kvasir_seg_resource(name: str) -> Path:
    """Path of a shipped Kvasir-SEG resource file (``train.txt``, ``SHA256SUMS``, ...)."""
    folder = resources.files("gpcps_lightning.data").joinpath("resources").joinpath("kvasir_seg")
    path = Path(str(folder.joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"The packaged Kvasir-SEG file {path} is missing; reinstall gpcps_lightning.")
    return path


# --------------------------------------------------------------------------- split and manifest files
def make_kvasir_seg_splits(names: Sequence[str], seed: int = KVASIR_SEG_SPLIT_SEED) -> dict[str, list[str]]:
    """The Kvasir-SEG split: 80/10/10% train/val/test and nested labeled subsets of the training set.

    Args:
        names: The pair names (file stems), 1000 for Kvasir-SEG.
        seed: Seed of the shuffles.

    Returns:
        ``{"train": ..., "val": ..., "test": ..., "labeled_1-2": ..., ..., "labeled_1-32": ...}``, each
        sorted; the labeled subsets are the first ``round(f * n_train)`` names of one seeded permutation
        of the sorted training names, hence nested.
    """
    train, val, test = ratio_split(sorted(names), 0.1, 0.1, seed)
    perm = np.random.default_rng(seed).permutation(len(train))
    out = {"train": train, "val": val, "test": test}
    for fraction, suffix in KVASIR_SEG_FRACTIONS.items():
        k = round_half_up(fraction * len(train))
        out[f"labeled_{suffix}"] = sorted(train[i] for i in perm[:k])
    return out


def write_manifest(
    data_dir: str | Path, out: str | Path, folders: Sequence[str] = ("images", "masks")
) -> int:
    """Write ``sha256sum``-style lines (``<hex>  <folder>/<file>``) for the files of ``folders``.

    Returns:
        The number of files listed.
    """
    data_dir = Path(data_dir)
    lines = []
    for folder in folders:
        for path in sorted((data_dir / folder).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                lines.append(f"{sha256_file(path)}  {folder}/{path.name}")
    Path(out).write_text("\n".join(lines) + "\n")
    return len(lines)


def verify_manifest(data_dir: str | Path, manifest: str | Path | None = None) -> int:
    """Check the files of ``data_dir`` against a ``sha256sum``-style manifest.

    Args:
        data_dir: Folder the manifest's paths are relative to.
        manifest: Manifest file (default: the shipped Kvasir-SEG ``SHA256SUMS``).

    Returns:
        The number of files verified.

    Raises:
        ValueError: If files are missing or differ (listed), or the manifest is malformed or empty.
    """
    data_dir = Path(data_dir)
    manifest = Path(manifest) if manifest is not None else kvasir_seg_resource("SHA256SUMS")
    missing, different = [], []
    count = 0
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{manifest}:{number} is not a '<sha256>  <path>' line: {line!r}.")
        path = data_dir / rel
        count += 1
        if not path.is_file():
            missing.append(rel)
        elif sha256_file(path) != digest:
            different.append(rel)
    if count == 0:
        raise ValueError(
            f"The manifest {manifest} lists no file, so it would verify nothing; give one "
            "'<sha256>  <path>' line per file."
        )
    if missing or different:
        parts = []
        if missing:
            parts.append(f"{len(missing)} file(s) missing: {preview_names(missing)}")
        if different:
            parts.append(
                f"{len(different)} file(s) differ from the official ones: {preview_names(different)}"
            )
        raise ValueError(
            f"The Kvasir-SEG copy in {data_dir} does not match the manifest {manifest}: "
            + "; ".join(parts)
            + ". "
            "Download it again (download=True into an empty root), or pass verify=False to use a modified "
            "copy (results are then not comparable)."
        )
    return count


def write_kvasir_seg_resources(
    data_dir: str | Path, out_dir: str | Path, seed: int = KVASIR_SEG_SPLIT_SEED
) -> dict[str, list[str]]:
    """Regenerate the shipped split files and manifest from a Kvasir-SEG copy.

    Args:
        data_dir: Folder with ``images/`` and ``masks/`` (1000 pairs).
        out_dir: Where to write ``train.txt``, ..., ``labeled_1-32.txt`` and ``SHA256SUMS``.
        seed: Split seed.

    Returns:
        The splits written.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in pair_image_mask_folders(data_dir / "images", data_dir / "masks")]
    splits = make_kvasir_seg_splits(names, seed)
    for key, values in splits.items():
        (out_dir / f"{key}.txt").write_text("\n".join(values) + "\n")
    write_manifest(data_dir, out_dir / "SHA256SUMS")
    return splits


# --------------------------------------------------------------------------- download
def _open_url(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=60)


def download_and_extract(
    url: str, root: str | Path, filename: str, opener: Callable[[str], Any] = _open_url
) -> Path:
    """Download ``url`` to ``root/filename`` (through ``filename.part``) and extract it safely into ``root``.

    Nothing half-done is ever used: the download goes to ``filename.part`` and is renamed only when
    complete (a failed one is removed; a ``.part`` left by a crash is overwritten by the next attempt),
    and the archive is extracted into a hidden temporary folder of ``root`` whose entries are renamed
    into place only after the whole archive is out.

    Args:
        url: Archive URL (``https://`` or ``file://``).
        root: Destination folder (created).
        filename: Archive file name in ``root``; the archive is removed after extraction.
        opener: Function that opens the URL and returns a binary file object (for tests).

    Returns:
        ``root``.

    Raises:
        ValueError: If the archive is unsafe (see :func:`safe_extract_zip`) or not a zip archive.
        FileExistsError: If an entry of the archive already exists in ``root``.
        OSError: If the download fails (the partial ``.part`` file is removed).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / filename
    part = root / (filename + ".part")
    log.info("Downloading %s to %s", url, archive)
    try:
        with opener(url) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, archive)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        safe_extract_zip(archive, staging)
        entries = sorted(staging.iterdir())
        clashes = [e.name for e in entries if (root / e.name).exists() or (root / e.name).is_symlink()]
        if clashes:
            raise FileExistsError(
                f"Cannot extract {archive} into {root}: {', '.join(clashes)} already exist(s) there. "
                "Move or delete them (a copy from an earlier, unfinished attempt?) and retry."
            )
        for entry in entries:
            os.replace(entry, root / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    return root


def safe_extract_zip(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a zip archive into ``dest``, refusing any member that would land outside it.

    Every member is checked before anything is written: absolute paths, drive letters, ``..``
    components and symbolic links whose target leaves ``dest`` are refused. Links that stay inside are
    created as links.

    Args:
        archive: The zip file.
        dest: Destination folder.

    Returns:
        The extracted paths.

    Raises:
        ValueError: If the archive is not a zip file or holds an unsafe member (named).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = dest.resolve()
    if not zipfile.is_zipfile(archive):
        raise ValueError(
            f"{archive} is not a zip archive (a failed or interrupted download?). Delete it and retry."
        )
    with zipfile.ZipFile(archive) as zf:
        plan: list[tuple[zipfile.ZipInfo, Path, str | None]] = []
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise ValueError(
                    f"Refusing to extract {archive}: member {info.filename!r} has an absolute path or '..' "
                    f"and would be written outside {dest}. The archive is not the official one."
                )
            target = base.joinpath(*parts)
            link = None
            if stat.S_ISLNK(info.external_attr >> 16):
                link = zf.read(info).decode("utf-8")
                resolved = (target.parent / link).resolve()
                if link.startswith("/") or not resolved.is_relative_to(base):
                    raise ValueError(
                        f"Refusing to extract {archive}: member {info.filename!r} is a link to {link!r}, "
                        f"outside {dest}. The archive is not the official one."
                    )
            plan.append((info, target, link))
        written = []
        for info, target, link in plan:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if link is not None:
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(link, target)
            else:
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            written.append(target)
    return written


def find_kvasir_seg(root: str | Path) -> Path | None:
    """The folder holding ``images/`` and ``masks/`` in ``root`` (``root`` itself or ``root/Kvasir-SEG``)."""
    root = Path(root)
    for candidate in (root, root / _ARCHIVE_FOLDER):
        if (candidate / "images").is_dir() and (candidate / "masks").is_dir():
            return candidate
    return None


def download_kvasir_seg(
    root: str | Path,
    url: str = KVASIR_SEG_URL,
    manifest: str | Path | None = None,
    opener: Callable[[str], Any] = _open_url,
) -> Path:
    """Download the official Kvasir-SEG archive into ``root``, extract it safely and verify it.

    Args:
        root: Destination; the data ends up in ``root/Kvasir-SEG/{images,masks}``.
        url: Archive URL.
        manifest: Manifest to verify against (default: the shipped one).
        opener: URL opener (for tests).

    Returns:
        The data folder (``root/Kvasir-SEG``).

    Raises:
        ConnectionError: If the archive cannot be downloaded (no network, a wrong URL); the message
            says where to put a copy downloaded elsewhere.
        ValueError: If the archive is unsafe, lacks the expected folders or fails verification.
    """
    filename = "kvasir-seg.zip"
    try:
        download_and_extract(url, root, filename, opener)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", None) or err
        folder = Path(root) / _ARCHIVE_FOLDER
        raise ConnectionError(
            f"Could not download Kvasir-SEG from {url} ({type(err).__name__}: {reason}). Without network "
            f"access, download {filename} from that URL on another machine and extract it into {root}, so "
            f"that {folder / 'images'} and {folder / 'masks'} hold its 1000 images and masks (images/ and "
            f"masks/ directly in {root} work too); then run again (download=True is then not needed)."
        ) from err
    data_dir = find_kvasir_seg(root)
    if data_dir is None:
        raise ValueError(
            f"The archive from {url} has no {_ARCHIVE_FOLDER}/images and {_ARCHIVE_FOLDER}/masks folders; "
            "it is not the Kvasir-SEG archive."
        )
    verify_manifest(data_dir, manifest)
    return data_dir


# --------------------------------------------------------------------------- datamodule
class KvasirSEGDataModule(SemiSupervisedDataModule):
    """Kvasir-SEG with the shipped 800/100/100 split and nested labeled subsets (see ``docs/data.md``).

    ``labeled_fraction`` picks the labeled subset of the 800 training pairs: 1/2 (400), 1/4 (200),
    1/8 (100) or 1/16 (50); the rest of the 800 are unlabeled and their masks are never opened in
    training. The default epoch is ``ceil(800 / batch_size)`` steps (50 at batch 16).

    Args:
        root: Folder holding ``images/`` and ``masks/`` (or ``Kvasir-SEG/images`` and ``Kvasir-SEG/masks``,
            as the official archive extracts); the download goes there.
        download: Download the official archive into ``root`` in ``prepare_data`` if the data is missing.
        verify: Check every file against the shipped SHA-256 manifest in ``prepare_data``.
        url: Archive URL (the official one by default).
        **kwargs: Common arguments of :class:`~gpcps_lightning.data.SemiSupervisedDataModule`.

    Raises:
        ValueError: If ``labeled_fraction`` is not a shipped fraction, or on other invalid options.
    """

    def __init__(
        self,
        root: str,
        download: bool = False,
        verify: bool = True,
        url: str = KVASIR_SEG_URL,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        matches = [s for f, s in KVASIR_SEG_FRACTIONS.items() if math.isclose(f, self.labeled_fraction)]
        if not matches:
            raise ValueError(
                f"`labeled_fraction`={self.labeled_fraction} has no shipped Kvasir-SEG split; use one of "
                "0.5, 0.25, 0.125, 0.0625, 0.03125 (1/2, 1/4, 1/8, 1/16, 1/32 of the 800 training images), "
                "or FolderDataModule for other fractions."
            )
        self.labeled_split_name = f"labeled_{matches[0]}"
        self.root = root
        self.download = download
        self.verify = verify
        self.url = url
        self._verified = False

    @property
    def data_dir(self) -> Path:
        """The folder holding ``images/`` and ``masks/``.

        Raises:
            FileNotFoundError: If Kvasir-SEG is not in ``root``.
        """
        found = find_kvasir_seg(self.root)
        if found is None:
            raise FileNotFoundError(
                f"Kvasir-SEG is not in {self.root} (no images/ and masks/ folders there or in "
                f"{Path(self.root) / _ARCHIVE_FOLDER}). Pass download=True to fetch it, or point `root` at "
                "your copy."
            )
        return found

    def prepare_data(self) -> None:
        """Download (if ``download`` and missing) and verify (if ``verify``) the data."""
        if find_kvasir_seg(self.root) is None and self.download:
            download_kvasir_seg(self.root, self.url)
            self._verified = True
        if self.verify and not self._verified:
            verify_manifest(self.data_dir)
            self._verified = True

    def build_split(self) -> DataSplit:  # noqa: D102
        return split_folder(
            self.data_dir,
            train_split=kvasir_seg_resource("train.txt"),
            val_split=kvasir_seg_resource("val.txt"),
            test_split=kvasir_seg_resource("test.txt"),
            labeled_split=kvasir_seg_resource(f"{self.labeled_split_name}.txt"),
            labeled_fraction=self.labeled_fraction,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the shipped split files and manifest from a verified Kvasir-SEG copy."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", required=True, help="folder with images/ and masks/ (1000 pairs)")
    parser.add_argument("--out", required=True, help="output folder for the split files and SHA256SUMS")
    parser.add_argument("--seed", type=int, default=KVASIR_SEG_SPLIT_SEED)
    args = parser.parse_args(argv)
    splits = write_kvasir_seg_resources(args.root, args.out, args.seed)
    print(", ".join(f"{k}: {len(v)}" for k, v in splits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
