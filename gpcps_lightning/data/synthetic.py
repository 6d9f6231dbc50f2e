"""A procedurally generated, colonoscopy-like polyp dataset (offline default for quickstart and tests).

Each image shows textured pink-red mucosa with haustral folds, a dark lumen, blood vessels, specular
highlights, vignetting and a dark field-of-view border, and one or two polyps of varied size, outline,
colour contrast and shading; the mask marks the polyps. Polyps share the mucosa's colours (sometimes
barely differ from it) and highlights, folds and lumen edges look alike, so the task is learnable but
not trivial. Generation is deterministic by seed (image ``k`` depends only on ``(seed, k)``) and writes
the ``images/`` + ``masks/`` layout of :class:`~gpcps_lightning.data.FolderDataModule`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gpcps_lightning.data.datamodule import FolderDataModule
from gpcps_lightning.data.splits import DataSplit

__all__ = [
    "SYNTHETIC_VERSION",
    "SyntheticPolypDataModule",
    "generate_synthetic_polyps",
    "render_synthetic_polyp",
]

#: Bumped whenever the renderer changes, so that a stale generated folder is detected.
SYNTHETIC_VERSION = 1
_MARKER = "synthetic_polyps.json"


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, round(h / cell) + 2), max(2, round(w / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(up) / 1.5


def _polyp_shape(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage in [0, 1] and normalised height (dome) of a star-shaped blob."""
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(r)
    for k in range(2, 6):  # lobed, irregular outline
        boundary += rng.uniform(0, 0.18 / k**0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    boundary *= radius
    rel = r / np.maximum(boundary, 1e-6)
    coverage = np.clip((1.0 - rel) * radius / rng.uniform(1.0, 2.5), 0.0, 1.0)
    dome = np.sqrt(np.clip(1.0 - rel**2, 0.0, 1.0))
    return coverage, dome


def render_synthetic_polyp(
    rng: np.random.Generator, height: int, width: int, max_polyps: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Render one colonoscopy-like image and its polyp mask.

    Args:
        rng: Random generator (the image is a function of its state).
        height: Image height.
        width: Image width.
        max_polyps: One to ``max_polyps`` polyps are drawn.

    Returns:
        ``(image, mask)``: (H, W, 3) uint8 RGB and (H, W) uint8 in {0, 1}.
    """
    h, w = height, width
    s = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Mucosa: pink-red base colour with a low- and a high-frequency texture.
    base = np.array([rng.uniform(0.70, 0.90), rng.uniform(0.30, 0.45), rng.uniform(0.28, 0.40)], np.float32)
    texture = 0.10 * _smooth_noise(rng, h, w, s / 4) + 0.05 * _smooth_noise(rng, h, w, s / 24)
    img = base[None, None, :] * (1.0 + texture[..., None])

    # Lumen: a dark, blurry hole somewhere (often off-centre), with concentric haustral folds around it.
    ly, lx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    dist = np.hypot(yy - ly, xx - lx) * (1.0 + 0.15 * _smooth_noise(rng, h, w, s / 3))
    lumen_r = rng.uniform(0.06, 0.18) * s
    img *= (1.0 - rng.uniform(0.6, 0.9) * np.exp(-((dist / lumen_r) ** 2)))[..., None]
    fold_period = rng.uniform(0.15, 0.3) * s
    folds = 0.5 + 0.5 * np.sin(2 * np.pi * dist / fold_period + rng.uniform(0, 2 * np.pi))
    img *= (1.0 - rng.uniform(0.05, 0.15) * folds**2 + rng.uniform(0.0, 0.05) * (1 - folds) ** 4)[..., None]

    # Vessels: thin dark-red random walks.
    vessels = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(vessels)
    for _ in range(rng.integers(3, 9)):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        heading = rng.uniform(0, 2 * np.pi)
        points = [(x, y)]
        for _ in range(rng.integers(8, 25)):
            heading += rng.normal(0, 0.5)
            step = rng.uniform(0.02, 0.05) * s
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
            points.append((x, y))
        draw.line(points, fill=int(rng.integers(90, 200)), width=int(rng.integers(1, 3)))
    vessel = np.asarray(vessels.filter(ImageFilter.GaussianBlur(0.6)), np.float32)[..., None] / 255.0
    img *= 1.0 - vessel * np.array([0.25, 0.55, 0.45], np.float32)

    # Polyps: one or two blobs with their own tint, dome shading from a light direction and texture.
    mask = np.zeros((h, w), np.uint8)
    light = rng.uniform(0, 2 * np.pi)
    for _ in range(rng.integers(1, max_polyps + 1)):
        radius = rng.uniform(0.08, 0.28) * s
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        coverage, dome = _polyp_shape(rng, yy, xx, cy, cx, radius)
        contrast = rng.uniform(0.08, 0.35)
        # Redder, paler or darker than the mucosa (the same hues, as real polyps).
        kind = rng.integers(3)
        if kind == 0:
            tint = np.array([1.0 + 0.3 * contrast, 1.0 - contrast, 1.0 - 0.8 * contrast], np.float32)
        elif kind == 1:
            tint = np.array([1.0 + 0.3 * contrast, 1.0 + contrast, 1.0 + 0.9 * contrast], np.float32)
        else:
            tint = np.full(3, 1.0 - 0.8 * contrast, np.float32)
        ly_, lx_ = np.sin(light), np.cos(light)
        shade = 0.85 + 0.3 * dome + 0.2 * ((yy - cy) * ly_ + (xx - cx) * lx_) / radius * (1 - dome)
        bumps = 1.0 + 0.08 * _smooth_noise(rng, h, w, max(radius / 3, 2.0))
        polyp = img * (tint[None, None, :] * (shade * bumps)[..., None])
        img = img * (1.0 - coverage[..., None]) + polyp * coverage[..., None]
        # A faint dark rim where the polyp meets the mucosa.
        rim = np.clip(coverage * (1.0 - coverage) * 4.0, 0, 1)
        img *= (1.0 - rng.uniform(0.0, 0.25) * rim)[..., None]
        mask |= (coverage >= 0.5).astype(np.uint8)

    # Specular highlights: small saturated white spots, some on the polyps.
    spots = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(spots)
    for _ in range(rng.integers(3, 16)):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        if rng.random() < 0.4 and mask.any():
            ys, xs = np.nonzero(mask)
            j = rng.integers(len(ys))
            y, x = float(ys[j]), float(xs[j])
        ry, rx = rng.uniform(0.003, 0.02) * s, rng.uniform(0.003, 0.03) * s
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
    spot = (
        np.asarray(spots.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))), np.float32)[..., None]
        / 255.0
    )
    img = img * (1.0 - spot) + spot * 1.05

    # Vignetting, a dark rounded field of view, sensor noise.
    ry, rx = (yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)
    radial = np.hypot(ry, rx)
    img *= (1.0 - rng.uniform(0.25, 0.5) * radial**2)[..., None]
    fov = np.clip((rng.uniform(1.15, 1.4) - np.abs(ry) ** 4 * 0.2 - radial) * 12.0, 0.0, 1.0)
    img *= fov[..., None]
    img += rng.normal(0, 0.012, img.shape).astype(np.float32)
    image = Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return np.asarray(image), mask


def generate_synthetic_polyps(
    root: str | Path,
    num_images: int = 400,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
    max_polyps: int = 2,
) -> Path:
    """Write a synthetic polyp dataset: ``root/images/synth_XXXXX.jpg`` and ``root/masks/synth_XXXXX.png``.

    Image ``k`` depends only on ``(seed, k)``; sizes vary per image (height and width drawn
    independently in ``[min_size, max_size]``). A ``synthetic_polyps.json`` records the parameters.

    Args:
        root: Output folder (created; must not hold other images already).
        num_images: Number of image/mask pairs.
        seed: Seed.
        min_size: Smallest height/width.
        max_size: Largest height/width.
        max_polyps: Most polyps per image (at least one is drawn).

    Returns:
        ``root``.

    Raises:
        ValueError: On invalid arguments.
    """
    if num_images < 1:
        raise ValueError(f"`num_images` must be at least 1, got {num_images}.")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"Need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}.")
    if max_polyps < 1:
        raise ValueError(f"`max_polyps` must be at least 1, got {max_polyps}.")
    if seed < 0:
        raise ValueError(f"`seed` must be non-negative, got {seed}.")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(num_images - 1)))
    for k in range(num_images):
        rng = np.random.default_rng([seed, k])
        height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        image, mask = render_synthetic_polyp(rng, height, width, max_polyps)
        name = f"synth_{k:0{digits}d}"
        Image.fromarray(image).save(root / "images" / f"{name}.jpg", quality=92)
        Image.fromarray(mask * np.uint8(255)).save(root / "masks" / f"{name}.png")
    params = _params(num_images, seed, min_size, max_size, max_polyps)
    (root / _MARKER).write_text(json.dumps(params, indent=2) + "\n")
    return root


def _params(num_images: int, seed: int, min_size: int, max_size: int, max_polyps: int) -> dict[str, Any]:
    return {
        "generator": "gpcps_lightning.data.synthetic",
        "version": SYNTHETIC_VERSION,
        "num_images": num_images,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
        "max_polyps": max_polyps,
    }


class SyntheticPolypDataModule(FolderDataModule):
    """:class:`~gpcps_lightning.data.FolderDataModule` over a generated synthetic polyp dataset.

    ``prepare_data`` generates the data into ``root`` when it is missing (and reuses it when ``root``
    holds the same generation); splits come from ``val_fraction``, ``test_fraction`` and ``split_seed``.

    Args:
        root: Folder for the generated data.
        num_images: Number of image/mask pairs.
        data_seed: Seed of the generation.
        min_size: Smallest generated height/width.
        max_size: Largest generated height/width.
        max_polyps: Most polyps per image.
        **kwargs: Arguments of :class:`~gpcps_lightning.data.FolderDataModule` (splits) and of
            :class:`~gpcps_lightning.data.SemiSupervisedDataModule` (``batch_size``, ``image_size``, ...).
    """

    def __init__(
        self,
        root: str,
        num_images: int = 400,
        data_seed: int = 0,
        min_size: int = 96,
        max_size: int = 192,
        max_polyps: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if num_images < 1:
            raise ValueError(f"`num_images` must be at least 1, got {num_images}.")
        if not 16 <= min_size <= max_size:
            raise ValueError(
                f"Need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}."
            )
        if max_polyps < 1:
            raise ValueError(f"`max_polyps` must be at least 1, got {max_polyps}.")
        if data_seed < 0:
            raise ValueError(f"`data_seed` must be non-negative, got {data_seed}.")
        self.num_images = num_images
        self.data_seed = data_seed
        self.min_size = min_size
        self.max_size = max_size
        self.max_polyps = max_polyps

    @property
    def generation_params(self) -> dict[str, Any]:
        """What ``root/synthetic_polyps.json`` must record for the data to be reused."""
        return _params(self.num_images, self.data_seed, self.min_size, self.max_size, self.max_polyps)

    def prepare_data(self) -> None:
        """Generate the data into ``root`` unless it already holds this generation.

        Raises:
            ValueError: If ``root`` holds other data or another generation.
        """
        root = Path(self.root)
        marker = root / _MARKER
        if marker.is_file():
            found = json.loads(marker.read_text())
            if found != self.generation_params:
                raise ValueError(
                    f"{root} holds a synthetic dataset generated with {found}, not {self.generation_params}. "
                    "Choose another `root`, or delete the folder to regenerate."
                )
            return
        if root.exists() and any(root.iterdir()):
            raise ValueError(
                f"{root} is not empty and holds no {_MARKER}: it is not a generated dataset. Choose an "
                "empty or new folder as `root` for the synthetic data."
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        # Generate next to root, then rename: an interrupted run never leaves a half-written dataset.
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            generate_synthetic_polyps(
                tmp, self.num_images, self.data_seed, self.min_size, self.max_size, self.max_polyps
            )
            if root.exists():
                root.rmdir()
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def build_split(self) -> DataSplit:  # noqa: D102
        if not (Path(self.root) / _MARKER).is_file():
            raise FileNotFoundError(
                f"No synthetic dataset in {self.root}: call prepare_data() first (the Trainer does)."
            )
        return super().build_split()
