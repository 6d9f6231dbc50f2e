"""Multi-process training: a synchronised batch norm that the gradient penalty can differentiate twice.

``torch.nn.SyncBatchNorm`` (what ``Trainer(sync_batchnorm=True)`` installs) has a hand-written backward
that cannot itself be differentiated, and it runs on GPUs only. The GP-CPS penalty differentiates the
networks twice, so it needs batch statistics that are synchronised with autograd-aware collectives:
:class:`GradientSyncBatchNorm2d` computes them with ``torch.distributed.nn.functional.all_reduce``, whose
backward is again an all-reduce, to any order, on any backend (gloo on CPU, NCCL on GPU).

Use it as a Lightning plugin::

    Trainer(strategy="ddp", devices=4, plugins=[GradientSyncBatchNorm()])

or on the command line ``--trainer.plugins+=gpcps_lightning.distributed.GradientSyncBatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

__all__ = ["GradientSyncBatchNorm", "GradientSyncBatchNorm2d"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GradientSyncBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are taken over all processes, differentiably.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``; in evaluation mode, or in a
    single process, it is exactly ``nn.BatchNorm2d``. Statistics are computed in two passes (mean, then
    the mean squared deviation) in at least float32, with two all-reduces per call.

    Shape:
        - input: (N, C, H, W); N may differ between processes.
        - output: same as input.
    """

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not self.training or _world_size() == 1:
            return super().forward(x)
        if x.ndim != 4:
            raise ValueError(f"GradientSyncBatchNorm2d expects (N, C, H, W) input, got {tuple(x.shape)}.")
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        count_local = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=xf.dtype, device=x.device)
        packed = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count_local]))
        count = packed[-1]
        mean = packed[:-1] / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        tracked = self.num_batches_tracked
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert tracked is not None  # nn.BatchNorm2d creates it together with the running statistics
            with torch.no_grad():
                tracked.add_(1)
                momentum = 1.0 / float(tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


class GradientSyncBatchNorm(LayerSync):
    """Lightning ``LayerSync`` plugin installing :class:`GradientSyncBatchNorm2d` in place of ``BatchNorm2d``.

    Only layers whose type is exactly ``nn.BatchNorm2d`` are converted (in place: parameters and buffers
    are kept, so optimizers and checkpoints are unaffected). Other batch-norm variants cannot be converted
    without changing their behaviour, so they are reported instead of being left unsynchronised.

    Raises:
        ValueError: From :meth:`apply`, if the model holds batch-norm layers of another type.
    """

    def apply(self, model: nn.Module) -> nn.Module:  # noqa: D102
        others = [
            f"{name} ({type(m).__name__})"
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and type(m) not in (nn.BatchNorm2d, GradientSyncBatchNorm2d)
        ]
        if others:
            raise ValueError(
                "GradientSyncBatchNorm can only synchronise nn.BatchNorm2d layers; "
                "these would stay per-process: "
                + ", ".join(others[:5])
                + (" ..." if len(others) > 5 else "")
                + ". Choose an encoder built from nn.BatchNorm2d or train without the plugin."
            )
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GradientSyncBatchNorm2d
        return model

    def revert(self, model: nn.Module) -> nn.Module:  # noqa: D102
        for m in model.modules():
            if type(m) is GradientSyncBatchNorm2d:
                m.__class__ = nn.BatchNorm2d  # type: ignore[assignment]
        return model
