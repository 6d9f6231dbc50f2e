"""docs/errors.md, the catalogue of rejected inputs: it stays true, and what it lists is tested.

The first tests read the catalogue: every test it names exists, every message it quotes is in the
library, and every message the library raises is quoted there. The others test the rejections that no
other test file covers (the catalogue names the test of each entry).
"""

from __future__ import annotations

import argparse
import ast
import re
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_NET
from test_data_helpers import write_pairs

from gpcps_lightning import EvaluationBatch, GPCPSModule, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.callbacks import (
    PredictionsPicture,
    PredictionWriter,
    ValidationImagePanel,
    overlay_mask,
    prediction_panel,
)
from gpcps_lightning.checkpointing import CHECKPOINT_KEY, SafeCheckpointIO, read_checkpoint
from gpcps_lightning.cli import GPCPSCLI
from gpcps_lightning.cli import main as gpcps
from gpcps_lightning.data import (
    DataSplit,
    FolderDataModule,
    ImageDataset,
    ImageMaskDataset,
    ImageMaskPair,
    SegmentationAugmentation,
    SemiSupervisedDataModule,
    SemiSupervisedPairSampler,
    SemiSupervisedTrainDataset,
    SyntheticPolypDataModule,
    binarize_mask,
    download_kvasir_seg,
    generate_synthetic_polyps,
    ratio_split,
    read_image,
    split_folder,
)
from gpcps_lightning.data import cache as cache_module
from gpcps_lightning.data.cache import SharedUInt8Cache
from gpcps_lightning.data.kvasir import kvasir_seg_resource, verify_manifest
from gpcps_lightning.distributed import GradientSyncBatchNorm2d
from gpcps_lightning.inference.export import export_onnx, export_torchscript
from gpcps_lightning.inference.export import main as export_main
from gpcps_lightning.inference.predict import Preprocessing, Segmenter, load_module, resize_to_original
from gpcps_lightning.losses import (
    authors_dice_loss,
    fuse_images,
    gradient_penalty,
    hard_pseudo_labels,
    soft_dice_loss,
)
from gpcps_lightning.losses.baselines import ema_decay_at
from gpcps_lightning.networks import build_network
from gpcps_lightning.testing import RandomSquaresDataModule
from gpcps_lightning.tools.reproduce import main as reproduce_main
from gpcps_lightning.tools.reproduce import run_one
from gpcps_lightning.tools.wandb_reader import read_wandb_run

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "docs" / "errors.md"
LIBRARY = REPO / "gpcps_lightning"
TINY = str(Path(__file__).parent / "conf" / "tiny_gpcps.yaml")

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

#: Raised messages the catalogue does not quote, by ``(file under gpcps_lightning/, function, exception)``,
#: with the reason.
NOT_CATALOGUED = {
    ("_utils.py", "atomic_path", "FileNotFoundError"): "internal: a writer of the library produced no file",
    ("_utils.py", "resize_to_original_sizes", "ValueError"): (
        "internal: its callers (resize_to_original, PredictionWriter, the test step) check their input first"
    ),
    ("data/cache.py", "SharedUInt8Cache.put", "ValueError"): "internal: the datasets store what they decoded",
    ("methods/base.py", "SegmentationModule.load_from_checkpoint", "ValueError"): (
        "re-raises read_checkpoint's message with the file name (catalogued under Checkpoints)"
    ),
    (
        "tools/bench/profiling.py",
        "profile_step",
        "RuntimeError",
    ): "internal: the profiling window is sized from the steps run",
    (
        "tools/bench/lightning_kinds.py",
        "_module_kwargs",
        "ValueError",
    ): "internal: reached only through run_kind, which checks first",
}

#: Exception types that are never about user input.
INTERNAL_TYPES = {"NotImplementedError", "AssertionError"}


# ============================================================================ the catalogue itself
def _catalogue_rows() -> list[tuple[str, str]]:
    """(section, row) for every table row of the catalogue, headers and separators left out."""
    lines = CATALOGUE.read_text().splitlines()
    separator = re.compile(r"^\|[\s:|-]+\|$")
    rows, section = [], ""
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:].strip()
        header = i + 1 < len(lines) and separator.match(lines[i + 1])
        if line.startswith("|") and not separator.match(line) and not header:
            rows.append((section, line))
    return rows


def _test_ids(text: str) -> list[tuple[str, str]]:
    return re.findall(r"tests/([\w/]+\.py)::(\w+)", text)


def _quoted_messages(text: str) -> list[str]:
    """The library messages quoted in the catalogue: ```` `` ... `` ```` spans, ``…`` for variable parts."""
    return [m.replace("\\|", "|") for m in re.findall(r"`` (.+?) ``", text)]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return {n for n in names if n.startswith("test")}


def _template(node: ast.AST) -> str | None:
    """A string literal or f-string as text, with ``\\x00`` for each replacement field."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "\x00" for v in node.values)
    return None


def _raised_messages() -> list[tuple[str, str, str, list[str]]]:
    """(file, function, exception type, message templates) of every ``raise`` with a literal message."""
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(LIBRARY).as_posix()
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, scope: tuple[str, ...], rel: str = rel) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scope = (*scope, node.name)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                kind = ast.unparse(node.exc.func)
                templates = [t for n in ast.walk(node.exc) if (t := _template(n)) is not None]
                if templates and kind not in INTERNAL_TYPES:
                    found.append((rel, ".".join(scope), kind, templates))
            for child in ast.iter_child_nodes(node):
                visit(child, scope)

        visit(tree, ())
    return found


def _pattern(quoted: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in quoted.split("…")), re.DOTALL)


def test_catalogue_entries_name_existing_tests() -> None:
    rows = _catalogue_rows()
    assert len(rows) > 100, "docs/errors.md lost its tables"
    missing = [f"[{section}] no test named in: {row[:100]}" for section, row in rows if not _test_ids(row)]
    functions: dict[str, set[str]] = {}
    for file, name in _test_ids(CATALOGUE.read_text()):
        path = REPO / "tests" / file
        if file not in functions:
            functions[file] = _test_functions(path) if path.is_file() else set()
        if name not in functions[file]:
            missing.append(f"tests/{file}::{name} does not exist")
    assert not missing, "\n".join(missing)


def test_catalogue_quotes_messages_the_library_raises() -> None:
    corpus = []
    for path in sorted(LIBRARY.rglob("*.py")):
        corpus += [t for n in ast.walk(ast.parse(path.read_text())) if (t := _template(n)) is not None]
    quoted = _quoted_messages(CATALOGUE.read_text())
    assert len(quoted) > 100

    def found(q: str) -> bool:
        longest = max(q.split("…"), key=len)  # a plain substring test first: the regex is slow
        return any(_pattern(q).search(t) for t in corpus if longest in t)

    stale = [q for q in quoted if not found(q)]
    assert not stale, "docs/errors.md quotes messages the library no longer has:\n" + "\n".join(stale)


def test_every_raised_message_is_catalogued() -> None:
    patterns = [_pattern(q) for q in _quoted_messages(CATALOGUE.read_text())]
    raised = _raised_messages()
    assert len(raised) > 150
    uncatalogued = [
        f"{file} {function}: raise {kind}({templates[0][:80]!r}...)"
        for file, function, kind, templates in raised
        if (file, function, kind) not in NOT_CATALOGUED
        and not any(p.search(t) for p in patterns for t in templates)
    ]
    assert not uncatalogued, (
        "Add these to docs/errors.md (quote the message's stable part as `` ... ``, name a test), or to "
        "NOT_CATALOGUED in this file if no user input can trigger them:\n" + "\n".join(uncatalogued)
    )


# ============================================================================ shared inputs
@pytest.fixture(scope="module")
def module() -> GPCPSModule:
    return GPCPSModule(**TINY_NET).eval()


def _raises(call: Callable[[], Any], kind: type[BaseException], match: str) -> None:
    with pytest.raises(kind, match=match):
        call()


def _img(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape)


# ============================================================================ batches
@pytest.mark.parametrize(
    ("make", "kind", "match"),
    [
        (
            lambda: SemiSupervisedBatch(np.zeros((1, 3, 4, 4)), _img(1, 1, 4, 4), _img(1, 3, 4, 4)),
            TypeError,
            r"`labeled` must be a torch\.Tensor",
        ),
        (
            lambda: SemiSupervisedBatch(_img(3, 4, 4), _img(1, 1, 4, 4), _img(1, 3, 4, 4)),
            ValueError,
            r"`labeled` must have shape \(N, C, H, W\)",
        ),
        (
            lambda: SemiSupervisedBatch(_img(1, 3, 4, 4).long(), _img(1, 1, 4, 4), _img(1, 3, 4, 4)),
            ValueError,
            "`labeled` must be a floating-point tensor",
        ),
        (
            lambda: SemiSupervisedBatch(_img(1, 3, 4, 4), _img(1, 1, 4, 4), _img(2, 3, 4, 4)),
            ValueError,
            "same shape to be fused",
        ),
        (
            lambda: SemiSupervisedBatch(
                _img(1, 3, 4, 4), _img(1, 1, 4, 4), _img(1, 3, 4, 4), fused=_img(1, 3, 4, 4)
            ),
            ValueError,
            "`fused` needs the `eps` it was fused with",
        ),
        (
            lambda: SemiSupervisedBatch(_img(2, 3, 4, 4), _img(2, 1, 4, 4), _img(2, 3, 4, 4), eps=_img(2)),
            ValueError,
            r"`eps` must have shape \(2, 1, 1, 1\)",
        ),
        (
            lambda: SemiSupervisedBatch(
                _img(1, 3, 4, 4),
                _img(1, 1, 4, 4),
                _img(1, 3, 4, 4),
                fused=_img(1, 3, 4, 5),
                eps=_img(1, 1, 1, 1),
            ),
            ValueError,
            "`fused` must have the shape of `labeled`",
        ),
        (
            lambda: SemiSupervisedBatch(
                _img(1, 3, 4, 4), _img(1, 1, 4, 4), _img(1, 3, 4, 4), fused=_img(1, 3, 4, 4), eps=_img(1)
            ),
            ValueError,
            r"`eps` must have shape \(1, 1, 1, 1\)",
        ),
        (
            lambda: EvaluationBatch(_img(2, 3, 4, 4), _img(2, 1, 4, 5)),
            ValueError,
            r"`mask` must have shape \(2, 1, 4, 4\)",
        ),
        (
            lambda: EvaluationBatch(_img(2, 3, 4, 4), _img(2, 1, 4, 4), original_masks=[_img(1, 6, 6)]),
            ValueError,
            r"`original_masks` must hold one mask per image \(2\), got 1",
        ),
    ],
)
def test_batch_rejections(make: Callable[[], Any], kind: type[BaseException], match: str) -> None:
    _raises(lambda: make().validate(), kind, match)


def test_evaluation_step_rejections(module: GPCPSModule) -> None:
    _raises(lambda: module.validation_step(_img(2, 3, 32, 32), 0), TypeError, "val batches must be")
    short = EvaluationBatch(_img(2, 3, 32, 32), _img(2, 1, 32, 32), original_masks=[_img(1, 40, 40)])
    # Before the check, the second image was silently left out of the metrics.
    _raises(lambda: module.test_step(short, 0), ValueError, "one mask per image")


# ============================================================================ modules and networks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"betas": (0.9,)}, "`betas` must be two numbers in"),
        ({"betas": (0.9, 1.0)}, "`betas` must be two numbers in"),
        ({"adam_eps": 0.0}, "`adam_eps` must be positive"),
        ({"weight_decay": -1e-4}, "`weight_decay` must be >= 0"),
        ({"gradient_clip_val": 0.0}, "`gradient_clip_val` must be positive or None"),
        ({"background_threshold": 1.0}, r"`background_threshold` must be in \(0, 1\)"),
    ],
)
def test_module_option_rejections(kwargs: dict[str, Any], match: str) -> None:
    _raises(lambda: GPCPSModule(**{**TINY_NET, **kwargs}), ValueError, match)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0}, "`in_channels` must be at least 1"),
        ({"network_kwargs": {"classes": 2}}, "`network_kwargs` must not contain 'classes'"),
    ],
)
def test_network_rejections(kwargs: dict[str, Any], match: str) -> None:
    _raises(lambda: build_network(**kwargs), ValueError, match)


# ============================================================================ losses
@pytest.mark.parametrize(
    ("call", "kind", "match"),
    [
        (lambda: soft_dice_loss([0.5], _img(1, 1, 2, 2)), TypeError, r"`probs` must be a torch\.Tensor"),
        (
            lambda: soft_dice_loss(_img(1, 1, 2, 2).long(), _img(1, 1, 2, 2)),
            ValueError,
            "`probs` must be floating point or bool",
        ),
        (
            lambda: authors_dice_loss(_img(1, 1, 2, 2), _img(1, 1, 2, 2), smooth=0.0),
            ValueError,
            "`smooth` must be positive",
        ),
        (
            lambda: fuse_images(_img(3, 4, 4), _img(3, 4, 4), _img(1, 1, 1, 1)),
            ValueError,
            r"`labeled` must have shape \(N, C, H, W\)",
        ),
        (
            lambda: fuse_images(_img(1, 3, 4, 4), _img(1, 3, 4, 4), 0.5),
            TypeError,
            r"`eps` must be a torch\.Tensor",
        ),
        (
            lambda: fuse_images(_img(1, 3, 4, 4), _img(1, 3, 4, 4), _img(1, 1, 1, 1).long()),
            ValueError,
            "`eps` must be floating point",
        ),
        (
            lambda: gradient_penalty(_img(3, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bool)),
            ValueError,
            r"`grad` must have shape \(N, C, H, W\)",
        ),
        (
            lambda: hard_pseudo_labels(_img(1, 1, 2, 2), threshold=0.0),
            ValueError,
            r"`threshold` must be in \(0, 1\)",
        ),
        (lambda: ema_decay_at(0, 0.99, rampup_steps=-1), ValueError, "`rampup_steps` must be >= 0"),
    ],
)
def test_loss_rejections(call: Callable[[], Any], kind: type[BaseException], match: str) -> None:
    _raises(call, kind, match)


# ============================================================================ data files and folders
def test_decoded_files_that_are_not_images(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    _raises(
        lambda: read_image(tmp_path / "five.tif"),
        ValueError,
        r"Cannot use .*five\.tif as an image: Expected a 2-D image with 1-4 channels",
    )
    tifffile.imwrite(tmp_path / "complex.tif", np.zeros((8, 8), np.complex64))
    _raises(
        lambda: read_image(tmp_path / "complex.tif"),
        ValueError,
        r"Cannot use .*complex\.tif as an image: Unsupported pixel type complex64",
    )
    _raises(
        lambda: binarize_mask(np.zeros((2, 2, 2, 2)), name="m.tif"),
        ValueError,
        r"Mask m\.tif must be a 2-D image",
    )


def test_missing_unlabeled_dir(tmp_path: Path) -> None:
    write_pairs(tmp_path, 10, sizes=[(8, 8)])
    _raises(
        lambda: split_folder(tmp_path, unlabeled_dir=tmp_path / "extra"),
        FileNotFoundError,
        r"The unlabeled images folder .*extra does not exist",
    )


def test_labeled_split_that_labels_every_training_image(tmp_path: Path) -> None:
    names = write_pairs(tmp_path, 10, sizes=[(8, 8)])
    (tmp_path / "train.txt").write_text("\n".join(names[:8]))
    (tmp_path / "val.txt").write_text("\n".join(names[8:]))
    split = {"train_split": tmp_path / "train.txt", "val_split": tmp_path / "val.txt"}
    # The message used to blame `labeled_fraction`, which a labeled_split overrides.
    _raises(
        lambda: split_folder(tmp_path, **split, labeled_split=tmp_path / "train.txt"),
        ValueError,
        r"`labeled_split` .*train\.txt lists all 8 training images .* remove some names",
    )


def test_fraction_that_empties_the_test_set() -> None:
    names = [f"n{i}" for i in range(5)]
    _raises(
        lambda: ratio_split(names, 0.2, 0.05, 0),
        ValueError,
        r"`test_fraction`=0\.05 of 5 images gives an empty test set",
    )


def test_stage_without_its_set(tmp_path: Path) -> None:
    names = write_pairs(tmp_path, 10, sizes=[(8, 8)])
    (tmp_path / "train.txt").write_text("\n".join(names[:8]))
    (tmp_path / "val.txt").write_text("\n".join(names[8:]))
    dm = FolderDataModule(
        root=str(tmp_path),
        train_split=str(tmp_path / "train.txt"),
        val_split=str(tmp_path / "val.txt"),
        image_size=8,
        num_workers=0,
    )
    _raises(lambda: dm.setup("test"), ValueError, r"FolderDataModule has no test set \(it has 0 images\)")


class _GivenSplit(SemiSupervisedDataModule):
    def __init__(self, split: DataSplit) -> None:
        super().__init__(num_workers=0, augment=False)
        self.given = split

    def build_split(self) -> DataSplit:
        return self.given


def test_custom_split_without_labeled_or_unlabeled_images() -> None:
    pair = ImageMaskPair("a", Path("a.png"), Path("a_mask.png"))
    no_labeled = _GivenSplit(DataSplit(labeled=[], unlabeled=[Path("u.png")], val=[pair]))
    _raises(lambda: no_labeled.split, ValueError, "_GivenSplit: no labeled training image")
    no_unlabeled = _GivenSplit(DataSplit(labeled=[pair], unlabeled=[], val=[pair]))
    _raises(lambda: no_unlabeled.split, ValueError, "_GivenSplit: no unlabeled training image")


def test_dataset_argument_rejections() -> None:
    _raises(lambda: ImageDataset([Path("a.png")], names=[]), ValueError, "Got 1 paths but 0 names")
    pair = ImageMaskPair("a", Path("a.png"), Path("a_mask.png"))
    labeled, unlabeled = ImageMaskDataset([pair], 16), ImageDataset([Path("u.png")], 32)
    _raises(
        lambda: SemiSupervisedTrainDataset(labeled, unlabeled),
        ValueError,
        r"Labeled size \(16, 16\) and unlabeled size \(32, 32\) differ",
    )


def test_shared_memory_cache_larger_than_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (sys.platform.startswith("linux") and Path("/dev/shm").is_dir()):
        pytest.skip("the check reads /dev/shm (Linux)")

    class Tiny:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(cache_module.os, "statvfs", lambda path: Tiny())
    _raises(
        lambda: SharedUInt8Cache([(3, 64, 64)] * 4, shared=True, what="images"),
        MemoryError,
        r"cache=True needs 0 MiB of shared memory for the images, but /dev/shm has only 0 MiB",
    )


# ============================================================================ data options
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: SegmentationAugmentation(hflip=1.5), r"Probability `hflip` must be in \[0, 1\]"),
        (lambda: SegmentationAugmentation(blur=-0.1), r"Probability `blur` must be in \[0, 1\]"),
        (lambda: SyntheticPolypDataModule(root="x", min_size=8), "Need 16 <= min_size <= max_size"),
        (lambda: SyntheticPolypDataModule(root="x", min_size=64, max_size=32), "Need 16 <= min_size"),
        (lambda: SyntheticPolypDataModule(root="x", max_polyps=0), "`max_polyps` must be at least 1"),
        (lambda: SyntheticPolypDataModule(root="x", data_seed=-1), "`data_seed` must be non-negative"),
        (lambda: generate_synthetic_polyps("x", num_images=0), "`num_images` must be at least 1"),
        (lambda: generate_synthetic_polyps("x", num_images=1, min_size=8), "Need 16 <= min_size"),
        (
            lambda: generate_synthetic_polyps("x", num_images=1, max_polyps=0),
            "`max_polyps` must be at least 1",
        ),
        (lambda: generate_synthetic_polyps("x", num_images=1, seed=-1), "`seed` must be non-negative"),
        (lambda: SemiSupervisedPairSampler(2, 2, 1, 3).set_epoch(-1), "`epoch` must be >= 0"),
        (lambda: SemiSupervisedPairSampler(2, 2, 1, 3).set_start_step(4), r"`step` must be in \[0, 3\]"),
    ],
)
def test_data_option_rejections(call: Callable[[], Any], match: str) -> None:
    _raises(call, ValueError, match)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(32.0, (32, 32)), ((16.0, 24), (16, 24)), ("32", None), ("abc", None), (None, None), (True, None)],
)
def test_image_size_values(value: Any, expected: tuple[int, int] | None) -> None:
    if expected is None:  # None used to fail with a bare TypeError of tuple()
        _raises(lambda: FolderDataModule(root="x", image_size=value), ValueError, "`image_size` must be")
    else:  # a whole float used to fail with "'float' object is not iterable"
        assert FolderDataModule(root="x", image_size=value).image_size == expected


# ============================================================================ Kvasir-SEG files
def test_manifest_rejections(tmp_path: Path) -> None:
    (tmp_path / "bad").write_text("abc  images/x.png\n")
    _raises(
        lambda: verify_manifest(tmp_path, tmp_path / "bad"),
        ValueError,
        r"bad:1 is not a '<sha256>  <path>' line",
    )
    (tmp_path / "empty").write_text("\n")  # used to "verify" 0 files without complaint
    _raises(
        lambda: verify_manifest(tmp_path, tmp_path / "empty"),
        ValueError,
        r"The manifest .*empty lists no file, so it would verify nothing",
    )


def test_archive_without_kvasir_folders(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Other/images/a.png", b"x")
    _raises(
        lambda: download_kvasir_seg(tmp_path / "root", url=archive.as_uri()),
        ValueError,
        "has no Kvasir-SEG/images and Kvasir-SEG/masks folders; it is not the Kvasir-SEG archive",
    )


def test_missing_packaged_resource() -> None:
    _raises(
        lambda: kvasir_seg_resource("labeled_1-3.txt"),
        FileNotFoundError,
        r"packaged Kvasir-SEG file .*labeled_1-3\.txt is missing; reinstall",
    )


# ============================================================================ checkpoints
def _small_checkpoint(path: Path) -> bytes:
    torch.save(
        {
            "state_dict": {"w": torch.zeros(256, 256)},
            CHECKPOINT_KEY: {"class": "gpcps_lightning.GPCPSModule"},
        },
        path,
    )
    return path.read_bytes()


def test_every_truncation_of_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    data = _small_checkpoint(tmp_path / "full.ckpt")
    cut = tmp_path / "cut.ckpt"
    # Some cuts (a few KiB in) used to fail with a bare "OSError: [Errno 22] Invalid argument".
    for n in [*range(0, 16384, 1024), len(data) // 2, len(data) - 1]:
        cut.write_bytes(data[:n])
        _raises(
            lambda: read_checkpoint(cut), ValueError, r"cut\.ckpt cannot be read .*truncated or corrupted"
        )


def test_checkpoint_io_missing_file(tmp_path: Path) -> None:
    _raises(
        lambda: SafeCheckpointIO().load_checkpoint(tmp_path / "gone.ckpt"),
        FileNotFoundError,
        r"Checkpoint file not found: .*gone\.ckpt\. Check the path \(and --ckpt_path\)",
    )


def test_load_module_rejections() -> None:
    unknown = {"state_dict": {}, "hyper_parameters": {"_class_path": "no_such_package.Net"}}
    _raises(
        lambda: load_module(unknown),
        ValueError,
        r"written by no_such_package\.Net, which cannot be imported here",
    )
    foreign = {"state_dict": {}, "hyper_parameters": {"_class_path": "torch.nn.Identity"}}
    _raises(
        lambda: load_module(foreign),
        TypeError,
        "Expected a SegmentationModule subclass, the checkpoint built Identity",
    )


# ============================================================================ command line
@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (
            ["--model.eps_mode", "global"],
            "Expected a typing.Literal['per_sample', 'per_batch']. Got value: global",
        ),
        (["--data.init_args.batch_size", "two"], "data.batch_size: Expected a <class 'int'>"),
        (["--model", "gpcps_lightning.NoSuchModule"], "has no attribute 'NoSuchModule'"),
        (["--config", "no_such_config.yaml"], "File does not exist"),
    ],
)
def test_command_line_parse_errors(args: list[str], shown: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpcps(["fit", "--config", TINY, *args])
    assert exit_info.value.code == 2
    assert shown in capsys.readouterr().err


def test_command_line_option_rejected_by_the_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPCPS_TRACEBACK", raising=False)
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--model.lambda_grad", "-1"]
    # From Python (GPCPSCLI) the class's error is raised; the command prints it alone, with status 2.
    _raises(lambda: GPCPSCLI(args=args), ValueError, "`lambda_grad` must be >= 0")
    assert gpcps(args) == 2
    err = capsys.readouterr().err
    assert "gpcps fit: error: `lambda_grad` must be >= 0, got -1.0." in err
    assert "Union subtypes" not in err and "Traceback" not in err


def test_command_line_checkpoint_rejections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPCPS_TRACEBACK", raising=False)
    args = ["test", "--config", TINY, "--trainer.default_root_dir", str(tmp_path)]
    data = _small_checkpoint(tmp_path / "full.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(data[:5000])
    (tmp_path / "notes.ckpt").write_text("learning rate 1e-3, 300 steps\n")
    cases = [
        # Lightning reads --ckpt_path's hyperparameters first: this used to end in "OSError: [Errno 22]".
        ("cut.ckpt", ValueError, r"Checkpoint .*cut\.ckpt cannot be read .*truncated or corrupted"),
        ("gone.ckpt", FileNotFoundError, r"Checkpoint file not found: .*gone\.ckpt"),
        # A text file used to get PyTorch's advice to load it with weights_only=False.
        (
            "notes.ckpt",
            ValueError,
            r"Checkpoint .*notes\.ckpt cannot be read: it is not a PyTorch checkpoint",
        ),
    ]
    for name, kind, match in cases:
        ckpt_args = [*args, "--ckpt_path", str(tmp_path / name)]
        _raises(lambda ckpt_args=ckpt_args: GPCPSCLI(args=ckpt_args), kind, match)  # from Python
        assert gpcps(ckpt_args) == 2  # the command: the message alone
        err = capsys.readouterr().err
        assert re.search(f"gpcps test: error: {match}", err), err
        assert "Traceback" not in err and "weights_only" not in err


def test_export_missing_or_foreign_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPCPS_TRACEBACK", raising=False)
    assert gpcps(["export", str(tmp_path / "gone.ckpt"), "-o", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"gpcps export: error: Checkpoint file not found: {tmp_path / 'gone.ckpt'}. Check the path." in err
    assert "--ckpt_path" not in err  # an option export does not have
    (tmp_path / "config.yaml").write_text("model:\n  class_path: gpcps_lightning.GPCPSModule\n")
    assert gpcps(["export", str(tmp_path / "config.yaml"), "-o", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml cannot be read: it is not a PyTorch checkpoint" in err and "'model:'" in err


def test_export_command_rejections(capsys: pytest.CaptureFixture[str]) -> None:
    for model_class in ("GPCPSModule", "gpcps_lightning.NoSuchModule"):
        with pytest.raises(SystemExit) as exit_info:
            export_main(["best.ckpt", "-o", "m.pt", "--model-class", model_class])
        assert exit_info.value.code == 2  # it used to end in a bare ValueError / AttributeError
        assert f"--model-class {model_class!r} cannot be imported" in capsys.readouterr().err


def test_reproduce_command_rejections(tmp_path: Path) -> None:
    for option in ("--max-steps", "--val-every", "--batch-size"):
        with pytest.raises(SystemExit, match=f"gpcps reproduce: {option} must be a positive integer, got 0"):
            reproduce_main(["run", option, "0", "--out", str(tmp_path)])
    _raises(
        lambda: run_one(argparse.Namespace(), "fixmatch", 0.5, 0),
        ValueError,
        "Unknown method 'fixmatch'; choose from",
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ValidationImagePanel(num_images=0), "`num_images` must be at least 1"),
        (lambda: PredictionsPicture(num_images=0), "`num_images` must be at least 1"),
        (lambda: ValidationImagePanel(every_n_epochs=-1), "`every_n_epochs` must be >= 0"),
        (lambda: ValidationImagePanel(min_tile_size=0), r"`min_tile_size` must be at least 1 \(1 keeps"),
        (lambda: PredictionWriter(threshold=1.0), r"`threshold` must be in \(0, 1\)"),
    ],
)
def test_callback_option_rejections(call: Callable[[], Any], match: str) -> None:
    _raises(call, ValueError, match)


# ============================================================================ prediction and export
def test_prediction_input_rejections(module: GPCPSModule) -> None:
    _raises(lambda: Preprocessing(0, 0.5, 0.5), ValueError, "`image_size` must be positive")
    _raises(lambda: Preprocessing(8, (0.5, 0.5), 0.5), ValueError, "`mean` must be a number or three numbers")
    _raises(
        lambda: resize_to_original(_img(1, 2, 4, 4), [(4, 4)]),
        ValueError,
        r"`probabilities` must have shape \(N, 1, H, W\)",
    )
    _raises(
        lambda: Segmenter(module, Preprocessing(32, 0.5, 0.5), batch_size=0),
        ValueError,
        "`batch_size` must be at least 1",
    )


def test_prediction_writer_rejects_wrong_predict_step_output(tmp_path: Path) -> None:
    writer = PredictionWriter(output_dir=str(tmp_path))
    batch = PredictionBatch(_img(2, 3, 4, 4), original_sizes=[(4, 4)] * 2, names=["a", "b"])

    def write() -> None:
        writer.write_on_batch_end(None, None, _img(2, 4, 4), None, batch, 0)  # type: ignore[arg-type]

    _raises(write, ValueError, r"predict_step must return probabilities of shape \(N, 1, H, W\)")


def test_drawing_rejections() -> None:
    _raises(
        lambda: overlay_mask(np.zeros((4, 4), np.uint8), np.zeros((4, 4))),
        ValueError,
        r"`image` must have shape \(H, W, 3\)",
    )
    empty = np.zeros((0, 4, 4, 3), np.uint8)
    _raises(
        lambda: prediction_panel(empty, np.zeros((0, 4, 4)), np.zeros((0, 4, 4))),
        ValueError,
        r"`images` must have shape \(N, H, W, 3\) with N >= 1",
    )


def test_export_rejections(module: GPCPSModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _raises(
        lambda: export_torchscript(module, tmp_path / "m.pt", example=_img(3, 32, 32)),
        ValueError,
        r"`example` must be an image tensor of shape \(N, C, H, W\)",
    )
    _raises(
        lambda: export_onnx(module, tmp_path / "m.onnx", image_size=32, normalize=True),
        ValueError,
        "`normalize=True` needs `preprocessing`",
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now raises ImportError
    _raises(
        lambda: export_onnx(module, tmp_path / "m.onnx", image_size=32),
        ImportError,
        "Checking the ONNX export needs onnxruntime",
    )
    monkeypatch.setitem(sys.modules, "onnx", None)
    _raises(
        lambda: export_onnx(module, tmp_path / "m.onnx", image_size=32),
        ImportError,
        "ONNX export needs onnx and onnxscript",
    )
    assert list(tmp_path.iterdir()) == []


# ============================================================================ distributed
def test_gradient_sync_batchnorm_rejects_non_image_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gpcps_lightning.distributed._world_size", lambda: 2)
    layer = GradientSyncBatchNorm2d(3).train()
    _raises(
        lambda: layer(torch.zeros(2, 3, 5)),
        ValueError,
        r"GradientSyncBatchNorm2d expects \(N, C, H, W\) input, got \(2, 3, 5\)",
    )


# ============================================================================ test utilities
def test_testing_helper_rejections(tmp_path: Path) -> None:
    _raises(
        lambda: RandomSquaresDataModule().predict_dataloader(),
        ValueError,
        r"Set `predict_dir` \(--data.predict_dir\)",
    )
    _raises(lambda: read_wandb_run(tmp_path), FileNotFoundError, "No .wandb file in")
    chunk = struct.pack("<IHB", 0, 2, 9) + b"xx"  # crc, length, type 9 (types are 1 to 4)
    (tmp_path / "run-x.wandb").write_bytes(b":W&B" + struct.pack("<HB", 0xBEE1, 0) + chunk)
    _raises(lambda: read_wandb_run(tmp_path), ValueError, "unknown chunk type 9 at byte 7")


def test_bench_rejections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from gpcps_lightning.tools import bench
    from gpcps_lightning.tools.bench.runner import _run_kind_isolated

    config = bench.BenchConfig(
        encoder_name="tu-resnet18",
        network_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
        image_size=32,
        batch_size=2,
        device="cpu",
        steps=3,
        warmup=1,
    )
    with pytest.raises(ValueError, match="--kinds must be distinct names from"):
        bench.run_benchmark(config, kinds=["cps", "cps"])
    with pytest.raises(ValueError, match="--rounds must be at least 1, got 0"):
        bench.run_benchmark(config, kinds=["cps"], rounds=0)
    with pytest.raises(ValueError, match="Unknown step kind 'nope'; choose from"):
        bench.run_kind("nope", config)
    with pytest.raises(ValueError, match="--profile-kind must be a Lightning step kind, got 'plain'"):
        bench.profile_step(config, tmp_path, kind="plain")
    failed = subprocess.CompletedProcess(args=[], returncode=3, stdout="", stderr="worker exploded")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"worker for step kind 'cps' failed \(exit 3\):\nworker exploded"):
        _run_kind_isolated("cps", config, threads=1)
