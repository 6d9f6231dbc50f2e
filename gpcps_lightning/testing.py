"""Helpers for tests and checks: a tiny random datamodule and the fp16 penalty agreement check.

:class:`RandomSquaresDataModule` follows the datamodule contract of the library (the batch classes of
:mod:`gpcps_lightning.batch`, ``mean``/``std``/``image_size``, ``denormalize``, ``predict_dir``) with
generated images: a brighter square on noise. It trains in seconds on a CPU and needs no files, which
is what configs and trainings in tests want (the library's own tests use no other generated datamodule);
use :mod:`gpcps_lightning.data` for real data.

The W&B log reader is :func:`gpcps_lightning.tools.wandb_reader.read_wandb_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gpcps_lightning.batch import EvaluationBatch, PredictionBatch, SemiSupervisedBatch
from gpcps_lightning.data.io import read_image
from gpcps_lightning.inference.predict import Preprocessing, list_images, preprocess
from gpcps_lightning.losses import fuse_images, sample_eps

if TYPE_CHECKING:
    from gpcps_lightning.methods.gpcps import GPCPSModule

__all__ = [
    "RandomSquaresDataModule",
    "fp16_penalty_agreement",
    "penalty_parameter_gradient",
]


def _square_sample(index: int, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    mask = torch.zeros(1, size, size)
    side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=g))
    top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
    mask[:, top : top + side, left : left + side] = 1.0
    image = 0.6 * torch.rand(3, size, size, generator=g) + 0.4 * mask
    return image, mask, torch.rand(3, size, size, generator=g)


class _Squares(Dataset):
    def __init__(self, length: int, size: int, seed: int) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return _square_sample(index, self.size, self.seed)


class _Folder(Dataset):
    def __init__(self, files: list[Path], preprocessing: Preprocessing) -> None:
        self.files, self.preprocessing = files, preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[int, int], str]:
        path = self.files[index]
        x, sizes = preprocess([read_image(path)], self.preprocessing)
        return x[0], sizes[0], path.name


class RandomSquaresDataModule(L.LightningDataModule):
    """Random images with a brighter square as the object, in the library's batch format.

    Args:
        batch_size: Labeled (and unlabeled) images per training step; images per evaluation batch.
        image_size: Side of the square training images.
        num_train: Training images per epoch (each step takes a labeled and an unlabeled batch).
        num_val: Validation (and test) images.
        seed: Seed of the generated images.
        shuffle: Whether the training images come in a new order every epoch (``False``: in index order,
            so that a run resumed mid-epoch sees the batches the uninterrupted one saw).
        mean: Per-channel normalisation mean. ``None`` here or in ``std`` leaves the images in [0, 1] and
            gives the datamodule no statistics (both attributes ``None``), so that no module checks its own
            normalisation against them.
        std: Per-channel normalisation standard deviation, or ``None``.
        predict_dir: Folder of images of any size to segment in ``predict``.
        eval_original_sizes: Sizes ``(h, w)`` to which validation masks are resized, cycled over the
            images, so metrics are computed "at the original size" as with real data (empty: at the
            training size).
    """

    def __init__(
        self,
        batch_size: int = 2,
        image_size: int = 32,
        num_train: int = 8,
        num_val: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        mean: Sequence[float] | None = (0.5, 0.5, 0.5),
        std: Sequence[float] | None = (0.25, 0.25, 0.25),
        predict_dir: str | None = None,
        eval_original_sizes: Sequence[tuple[int, int]] = (),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_train, self.num_val, self.seed, self.shuffle = num_train, num_val, seed, shuffle
        self.mean: tuple[float, ...] | None = None  # no statistics: the images stay in [0, 1]
        self.std: tuple[float, ...] | None = None
        if mean is not None and std is not None:
            self.mean, self.std = tuple(mean), tuple(std)
        self.predict_dir = predict_dir
        self.eval_original_sizes = [tuple(s) for s in eval_original_sizes]

    def _normalize(self, x: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def denormalize(self, images: Tensor) -> Tensor:
        """Undo the normalisation: images in [0, 1] for drawing.

        Shape:
            - images: (N, 3, H, W)
        """
        if self.mean is None or self.std is None:
            return images.clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0)

    def _collate_train(self, items: list[tuple[Tensor, Tensor, Tensor]]) -> SemiSupervisedBatch:
        labeled, mask, unlabeled = (torch.stack(x) for x in zip(*items, strict=True))
        return SemiSupervisedBatch(
            labeled=self._normalize(labeled), mask=mask, unlabeled=self._normalize(unlabeled)
        )

    def _collate_eval(self, items: list[tuple[Tensor, Tensor, Tensor]]) -> EvaluationBatch:
        image, mask, _ = (torch.stack(x) for x in zip(*items, strict=True))
        original = None
        if self.eval_original_sizes:
            sizes = self.eval_original_sizes
            original = [
                (
                    torch.nn.functional.interpolate(m[None], size=sizes[i % len(sizes)], mode="nearest")[0]
                    >= 0.5
                ).float()
                for i, m in enumerate(mask)
            ]
        return EvaluationBatch(
            image=self._normalize(image),
            mask=mask,
            original_masks=original,
            names=[str(i) for i in range(len(items))],
        )

    def _collate_predict(self, items: list[tuple[Tensor, tuple[int, int], str]]) -> PredictionBatch:
        images, sizes, names = zip(*items, strict=True)
        return PredictionBatch(image=torch.stack(images), original_sizes=list(sizes), names=list(names))

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        data = _Squares(self.num_train, self.image_size, self.seed)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=g,
            collate_fn=self._collate_train,
        )

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        data = _Squares(self.num_val, self.image_size, self.seed + 1)
        return DataLoader(data, batch_size=self.batch_size, collate_fn=self._collate_eval)

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        if self.predict_dir is None:
            raise ValueError("Set `predict_dir` (--data.predict_dir) to the folder of images to segment.")
        mean, std = (self.mean, self.std) if self.mean and self.std else ((0.0,) * 3, (1.0,) * 3)
        preprocessing = Preprocessing(self.image_size, mean, std)
        data = _Folder(list_images(self.predict_dir), preprocessing)
        return DataLoader(data, batch_size=self.batch_size, collate_fn=self._collate_predict)


# --------------------------------------------------------------------------- fp16 penalty check
def penalty_parameter_gradient(
    module: GPCPSModule,
    batch: SemiSupervisedBatch,
    *,
    fp16: bool,
    loss_scale: float = 2.0**16,
) -> Tensor:
    """``d(lambda_grad * L_grad) / d(theta)`` as ``module`` computes it, flattened over its trained networks.

    With ``fp16=True`` the losses are computed under fp16 autocast with a ``GradScaler`` of scale
    ``loss_scale`` attached as the Trainer's (so the module takes its fp16 path), and the gradient is
    taken of the scaled penalty and unscaled, as Lightning's precision plugin does.

    Args:
        module: The module; its ``lambda_grad`` must be positive.
        batch: A batch that carries its fused images and ``eps`` (so that both precisions fuse alike).
        fp16: Whether to compute under fp16 autocast (on the batch's device type).
        loss_scale: The loss scale under fp16.

    Returns:
        float32 vector of every trained parameter's gradient (zeros where a parameter gets none).
    """
    device = batch.labeled.device.type
    params = [p for net in module.trained_networks() for p in net.parameters()]
    scaler = torch.amp.GradScaler(device, init_scale=loss_scale) if fp16 else None
    previous = module.active_grad_scaler
    module.active_grad_scaler = lambda: scaler  # type: ignore[method-assign]
    try:
        with torch.autocast(device, dtype=torch.float16, enabled=fp16):
            losses = module.compute_losses(batch)
    finally:
        module.active_grad_scaler = previous  # type: ignore[method-assign]
    penalty = module.lambda_grad * losses.penalty
    scale = loss_scale if fp16 else 1.0
    grads = torch.autograd.grad(penalty * scale, params, allow_unused=True)
    return torch.cat(
        [
            (g.float() / scale if g is not None else torch.zeros_like(p, dtype=torch.float32)).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def fp16_penalty_agreement(
    module: GPCPSModule, device: str | torch.device, image_size: int = 32, batch_size: int = 4, seed: int = 0
) -> dict[str, float | bool]:
    """Compare the penalty's parameter gradient under fp16 autocast with float32's, on a random batch.

    The check behind ``tests/test_fp16_penalty.py`` and ``scripts/gpu_check.py``: under fp16 the penalty
    must train the networks as it does in float32 (cosine > 0.99, relative norm error < 5%, all finite).

    Args:
        module: A :class:`~gpcps_lightning.GPCPSModule` (moved to ``device``).
        device: Where to compute.
        image_size: Side of the random images.
        batch_size: Labeled (and unlabeled) images in the batch.
        seed: Seed of the random batch and fusion weights.

    Returns:
        ``cosine``, ``relative_norm_error``, ``fp32_norm``, ``fp16_norm`` and ``finite``.
    """
    device = torch.device(device)
    module = module.to(device)
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, image_size, image_size)
    labeled, unlabeled = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = (torch.rand(batch_size, 1, image_size, image_size, generator=g) > 0.6).float()
    eps = sample_eps(batch_size, generator=g)
    labeled, unlabeled, mask, eps = (t.to(device) for t in (labeled, unlabeled, mask, eps))
    batch = SemiSupervisedBatch(
        labeled=labeled, mask=mask, unlabeled=unlabeled, fused=fuse_images(labeled, unlabeled, eps), eps=eps
    )
    reference = penalty_parameter_gradient(module, batch, fp16=False)
    half = penalty_parameter_gradient(module, batch, fp16=True)
    ref_norm, half_norm = reference.norm(), half.norm()
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(half, reference, dim=0)),
        "relative_norm_error": float((half_norm - ref_norm).abs() / ref_norm.clamp_min(1e-30)),
        "fp32_norm": float(ref_norm),
        "fp16_norm": float(half_norm),
        "finite": bool(torch.isfinite(half).all()),
    }
