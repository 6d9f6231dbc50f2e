"""Kvasir-SEG: datamodule on a stand-in copy, download from a local archive, safe extraction, manifest,
and (when KVASIR_SEG_ROOT points at it) the real copy."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import record_decodes, record_opens, write_kvasir_standin

from gpcps_lightning import KvasirSEGDataModule, SemiSupervisedBatch
from gpcps_lightning.data import read_split_file
from gpcps_lightning.data.kvasir import (
    download_and_extract,
    download_kvasir_seg,
    find_kvasir_seg,
    kvasir_seg_resource,
    safe_extract_zip,
    verify_manifest,
    write_manifest,
)


def _shipped(name: str) -> list[str]:
    return read_split_file(kvasir_seg_resource(f"{name}.txt"))


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kvasir-SEG stand-in: the 1000 shipped names as tiny pairs (not the real images)."""
    root = tmp_path_factory.mktemp("kvasir")
    write_kvasir_standin(root / "Kvasir-SEG")
    return root


@pytest.mark.parametrize(("fraction", "n_labeled"), [(0.5, 400), (0.25, 200), (0.125, 100), (1 / 16, 50)])
def test_kvasir_split_on_standin(standin: Path, fraction: float, n_labeled: int) -> None:
    dm = KvasirSEGDataModule(
        root=str(standin), labeled_fraction=fraction, verify=False, num_workers=0, image_size=8
    )
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_labeled, dm.num_unlabeled) == (n_labeled, 800 - n_labeled)
    assert {p.name for p in dm.split.labeled} == set(_shipped(f"labeled_{dm.labeled_split_name[8:]}"))
    assert [p.name for p in dm.split.val] == _shipped("val")
    assert [p.name for p in dm.split.test] == _shipped("test")
    assert dm.train_steps_per_epoch == 50  # ceil(800 / 16)


def test_kvasir_batches_and_unlabeled_masks_never_decoded(
    standin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = KvasirSEGDataModule(root=str(standin), verify=False, num_workers=0, image_size=8, steps_per_epoch=3)
    with record_opens(monkeypatch) as at_setup, record_decodes(monkeypatch) as decoded:
        dm.setup("fit")  # reads the headers of all 1000 pairs' files
        with record_opens(monkeypatch) as in_training:
            loader = dm.train_dataloader()
            batches = [dm.on_after_batch_transfer(b, 0) for b in loader]
    assert len(batches) == 3 and all(isinstance(b, SemiSupervisedBatch) for b in batches)
    assert batches[0].labeled.shape == (16, 3, 8, 8) and batches[0].mask.shape == (16, 1, 8, 8)
    unlabeled_names = set(_shipped("train")) - set(_shipped("labeled_1-8"))

    def masks(paths: list[str]) -> set[str]:
        return {Path(p).stem for p in paths if Path(p).parent.name == "masks"}

    assert len(unlabeled_names) == 700
    assert unlabeled_names <= masks(at_setup)
    assert masks(decoded) and not masks(decoded) & unlabeled_names
    assert masks(in_training) and not masks(in_training) & unlabeled_names
    evaluation = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert evaluation.original_masks is not None and evaluation.original_masks[0].shape == (1, 10, 12)


def test_kvasir_fraction_must_be_shipped() -> None:
    with pytest.raises(
        ValueError, match=r"`labeled_fraction`=0.3 has no shipped Kvasir-SEG split.*0.5, 0.25"
    ):
        KvasirSEGDataModule(root="x", labeled_fraction=0.3)


def test_kvasir_missing_data_error(tmp_path: Path) -> None:
    dm = KvasirSEGDataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"Kvasir-SEG is not in .*download=True"):
        dm.prepare_data()


# ----------------------------------------------------------------------------- download and extraction
def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _small_archive(tmp_path: Path) -> tuple[Path, Path]:
    members = {}
    for k in range(3):
        members[f"Kvasir-SEG/images/p{k}.png"] = _png(40 + k)
        members[f"Kvasir-SEG/masks/p{k}.png"] = _png(255 * (k % 2))
    archive = _zip(tmp_path / "kvasir-seg.zip", members | {"Kvasir-SEG/kavsir_bboxes.json": b"{}"})
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(
        "".join(f"{hashlib.sha256(d).hexdigest()}  {n[len('Kvasir-SEG/') :]}\n" for n, d in members.items())
    )
    return archive, manifest


def test_download_from_local_archive_and_verify(tmp_path: Path) -> None:
    archive, manifest = _small_archive(tmp_path)
    root = tmp_path / "root"
    data_dir = download_kvasir_seg(root, url=archive.as_uri(), manifest=manifest)
    assert data_dir == root / "Kvasir-SEG" == find_kvasir_seg(root)
    assert sorted(p.name for p in (data_dir / "images").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert not (root / "kvasir-seg.zip").exists() and not (root / "kvasir-seg.zip.part").exists()
    assert verify_manifest(data_dir, manifest) == 6


def test_interrupted_extraction_leaves_nothing_to_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpcps_lightning.data.kvasir as kvasir

    archive, manifest = _small_archive(tmp_path)
    root = tmp_path / "root"
    real = kvasir.safe_extract_zip

    def crash_midway(archive: Path, dest: Path) -> list[Path]:
        real(archive, dest)
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C once everything was written

    monkeypatch.setattr(kvasir, "safe_extract_zip", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        download_kvasir_seg(root, url=archive.as_uri(), manifest=manifest)
    assert find_kvasir_seg(root) is None  # no half-extracted data set to pick up later
    assert not [p for p in root.iterdir() if p.name.startswith(".extract-")]
    monkeypatch.undo()
    assert download_kvasir_seg(root, url=archive.as_uri(), manifest=manifest) == root / "Kvasir-SEG"


def test_extraction_does_not_overwrite_existing_entries(tmp_path: Path) -> None:
    archive, manifest = _small_archive(tmp_path)
    root = tmp_path / "root"
    (root / "Kvasir-SEG" / "images").mkdir(parents=True)  # an earlier, unfinished copy without masks/
    with pytest.raises(FileExistsError, match="Kvasir-SEG already exist"):
        download_kvasir_seg(root, url=archive.as_uri(), manifest=manifest)


def test_download_goes_through_part_file(tmp_path: Path) -> None:
    archive, _ = _small_archive(tmp_path)
    seen: list[list[str]] = []

    class Response(io.BytesIO):
        def read(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(sorted(p.name for p in (tmp_path / "root").iterdir()))
            return super().read(*args, **kwargs)

    download_and_extract(
        "https://example.invalid/x.zip",
        tmp_path / "root",
        "x.zip",
        lambda url: Response(archive.read_bytes()),
    )
    assert seen and all(names == ["x.zip.part"] for names in seen)


def test_failed_download_removes_part_file(tmp_path: Path) -> None:
    def broken(url: str):  # type: ignore[no-untyped-def]
        class Response(io.BytesIO):
            def read(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                raise OSError("connection reset")

        return Response(b"")

    with pytest.raises(OSError, match="connection reset"):
        download_and_extract("https://example.invalid/x.zip", tmp_path, "x.zip", broken)
    assert list(tmp_path.iterdir()) == []


def test_download_without_network_says_where_to_put_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error
    import urllib.request

    root = tmp_path / "root"
    url = (tmp_path / "nonexistent.zip").as_uri()  # fails like an unreachable server, without network
    dm = KvasirSEGDataModule(root=str(root), download=True, url=url)
    with pytest.raises(ConnectionError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert message.startswith(f"Could not download Kvasir-SEG from {url} (URLError: ")
    assert f"download kvasir-seg.zip from that URL on another machine and extract it into {root}" in message
    assert f"{root / 'Kvasir-SEG' / 'images'} and {root / 'Kvasir-SEG' / 'masks'}" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert list(root.iterdir()) == []  # no partial download left behind

    def no_network(url: str, timeout: float) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # the default URL, offline
    with pytest.raises(
        ConnectionError, match=r"from https://datasets\.simula\.no/downloads/kvasir-seg\.zip "
    ):
        KvasirSEGDataModule(root=str(root), download=True).prepare_data()


def test_verify_reports_missing_and_modified_files(tmp_path: Path) -> None:
    archive, manifest = _small_archive(tmp_path)
    data_dir = download_kvasir_seg(tmp_path / "root", url=archive.as_uri(), manifest=manifest)
    (data_dir / "images" / "p1.png").write_bytes(_png(99))
    (data_dir / "masks" / "p2.png").unlink()
    with pytest.raises(
        ValueError, match=r"1 file\(s\) missing: masks/p2.png; 1 file\(s\) differ .*images/p1.png"
    ):
        verify_manifest(data_dir, manifest)


def test_datamodule_download_uses_url(tmp_path: Path) -> None:
    archive, _ = _small_archive(tmp_path)
    dm = KvasirSEGDataModule(root=str(tmp_path / "root"), download=True, verify=False, url=archive.as_uri())
    with pytest.raises(ValueError, match="does not match the manifest"):
        dm.prepare_data()  # the small archive is not Kvasir-SEG: the shipped manifest catches it
    assert find_kvasir_seg(tmp_path / "root") is not None


@pytest.mark.parametrize(
    ("members", "links"),
    [
        ({"../evil.txt": b"x"}, None),
        ({"Kvasir-SEG/../../evil.txt": b"x"}, None),
        ({"/abs/evil.txt": b"x"}, None),
        ({"C:/evil.txt": b"x"}, None),
        ({"Kvasir-SEG/images/a.png": b"x"}, {"Kvasir-SEG/images/link": "../../../outside"}),
        ({"Kvasir-SEG/images/a.png": b"x"}, {"Kvasir-SEG/images/link": "/etc/passwd"}),
    ],
)
def test_unsafe_archives_are_refused_before_writing(
    tmp_path: Path, members: dict, links: dict | None
) -> None:
    archive = _zip(tmp_path / "bad.zip", members, links)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="Refusing to extract"):
        safe_extract_zip(archive, dest)
    assert list(dest.iterdir()) == []  # nothing written
    assert not (tmp_path / "evil.txt").exists()


def test_links_inside_the_root_are_extracted(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "ok.zip", {"d/a.txt": b"hello"}, {"d/b.txt": "a.txt"})
    safe_extract_zip(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "d" / "b.txt").is_symlink()
    assert (tmp_path / "dest" / "d" / "b.txt").read_text() == "hello"


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"<html>error page</html>")
    with pytest.raises(ValueError, match="not a zip archive"):
        safe_extract_zip(tmp_path / "x.zip", tmp_path / "dest")


def test_write_manifest_round_trip(tmp_path: Path) -> None:
    archive, manifest = _small_archive(tmp_path)
    safe_extract_zip(archive, tmp_path / "x")
    out = tmp_path / "MINE"
    assert write_manifest(tmp_path / "x" / "Kvasir-SEG", out) == 6
    assert sorted(out.read_text().splitlines()) == sorted(manifest.read_text().splitlines())


# ----------------------------------------------------------------------------- the real copy
KVASIR_SEG_ROOT = os.environ.get("KVASIR_SEG_ROOT")


@pytest.mark.skipif(not KVASIR_SEG_ROOT, reason="set KVASIR_SEG_ROOT to a Kvasir-SEG copy to run")
def test_real_kvasir_seg_copy() -> None:
    assert KVASIR_SEG_ROOT is not None
    data_dir = find_kvasir_seg(KVASIR_SEG_ROOT)
    assert data_dir is not None
    assert verify_manifest(data_dir) == 2000
    dm = KvasirSEGDataModule(root=KVASIR_SEG_ROOT, num_workers=0, image_size=64, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    split = dm.split
    assert len(split.labeled) + len(split.unlabeled) == 800
    assert (len(split.labeled), len(split.val), len(split.test)) == (100, 100, 100)
    names = {p.name for p in split.labeled + split.val + split.test} | {p.stem for p in split.unlabeled}
    assert len(names) == 1000
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    batch.validate()
    assert batch.labeled.shape == (4, 3, 64, 64) and set(batch.mask.unique().tolist()) == {0.0, 1.0}
    evaluation = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    for original in evaluation.original_masks or []:
        assert original.shape[-1] >= 332 and set(torch.unique(original).tolist()) <= {0.0, 1.0}
        assert original.sum() > 0  # no Kvasir-SEG mask is empty


def test_regenerating_resources_from_a_copy_gives_the_shipped_split(standin: Path, tmp_path: Path) -> None:
    from gpcps_lightning.data.kvasir import main

    assert main(["--root", str(standin / "Kvasir-SEG"), "--out", str(tmp_path / "out")]) == 0
    for key in (
        "train",
        "val",
        "test",
        "labeled_1-2",
        "labeled_1-4",
        "labeled_1-8",
        "labeled_1-16",
        "labeled_1-32",
    ):
        assert (tmp_path / "out" / f"{key}.txt").read_text() == kvasir_seg_resource(f"{key}.txt").read_text()
    assert len((tmp_path / "out" / "SHA256SUMS").read_text().splitlines()) == 2000


def test_loader_benchmark_runs(standin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpcps_lightning.tools.bench_loader import benchmark, main

    rates = benchmark(
        str(standin), cache=True, epochs=2, image_size=8, batch_size=4, num_workers=0, steps_per_epoch=2
    )
    assert len(rates) == 2 and all(r > 0 for r in rates)
    argv = ["--root", str(standin), "--image-size", "8", "--batch-size", "2", "--num-workers", "0"]
    assert main([*argv, "--epochs", "1", "--steps-per-epoch", "1"]) == 0
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| no") or line.startswith("| yes")
    ]
    assert len(rows) == 2
