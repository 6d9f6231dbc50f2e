"""What to benchmark: the step kinds, the step's hyperparameters and :class:`BenchConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ALL_KINDS", "METHOD_KINDS", "STEP_KINDS", "BenchConfig"]

#: The step kinds, in the order they run and are reported: ``supervised`` (``L_sup`` only), ``cps``
#: (``L_sup + L_semi``), ``gpcps`` (the penalty every step), ``gpcps_lazy`` (every ``lazy_k`` steps) and
#: ``plain`` (GP-CPS as a plain PyTorch loop, no Lightning).
STEP_KINDS: tuple[str, ...] = ("supervised", "cps", "gpcps", "gpcps_lazy", "plain")
#: Further kinds, run only when ``--kinds`` names them: the other methods' modules with their shipped
#: defaults on the same networks and batches (``mean_teacher``, ``gct``, ``psmt`` after its supervised
#: warm-up, ``unimatch``). The report gives their ratios to ``supervised`` (note: two networks' ``L_sup``,
#: i.e. ``cps`` without ``L_semi``; a one-network UNet step costs about half) and to ``cps``.
METHOD_KINDS: tuple[str, ...] = ("mean_teacher", "gct", "psmt", "unimatch")
ALL_KINDS: tuple[str, ...] = STEP_KINDS + METHOD_KINDS

_PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "16",
    "16-mixed": "16",
}
# The hyperparameters of the step (GPCPSModule's defaults, METHOD.md), shared by the plain loop.
LAMBDA_GRAD = 1e-3
LAMBDA_SEMI = 1.0
ADAM = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8}
SEEDS = (1, 2)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark: network, data size, precision and how many steps.

    Args:
        encoder_name: segmentation-models-pytorch encoder (the paper's UNet uses ``"resnet34"``).
        arch: segmentation-models-pytorch architecture.
        network_kwargs: Further ``smp.create_model`` arguments (``encoder_depth``, ``decoder_channels``).
        image_size: Height and width of the square training images.
        batch_size: Labeled images per step (and as many unlabeled ones).
        precision: ``"32"``, ``"bf16"`` or ``"16"`` (Lightning's ``32-true``, ``bf16-mixed``, ``16-mixed``).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        steps: Timed steps per kind (the lazy kind rounds up to whole windows of ``lazy_k`` steps).
        warmup: Untimed steps before the timed ones (after the FLOP-counting steps).
        lazy_k: ``gp_every_n_steps`` of the lazy kind.
        channels_last: Put networks and batches in channels-last memory format.
        cudnn_benchmark: Let cuDNN pick the fastest convolution algorithms (CUDA only).
        seed: Seed of the synthetic batches.
        plain_fused_adam: Give the plain loop PyTorch's fused Adam, as the modules use, instead of the
            default implementation (the straightforward version), to compare like with like.
    """

    encoder_name: str = "resnet34"
    arch: str = "Unet"
    network_kwargs: dict[str, Any] | None = None
    image_size: int = 256
    batch_size: int = 16
    precision: str = "32"
    device: str = "cpu"
    steps: int = 20
    warmup: int = 3
    lazy_k: int = 8
    channels_last: bool = False
    cudnn_benchmark: bool = True
    seed: int = 0
    plain_fused_adam: bool = False

    def checked(self) -> BenchConfig:
        """This configuration with ``precision`` normalised, after checking every field.

        Returns:
            A validated copy.

        Raises:
            ValueError: On a value the benchmark cannot run with; the message names the option.
        """
        precision = _PRECISIONS.get(str(self.precision))
        if precision is None:
            raise ValueError(f"--precision must be one of 32, bf16, 16 (got {self.precision!r}).")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N' (got {self.device!r}).") from err
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N' (got {self.device!r}).")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
        if device.type == "cpu" and precision == "16":
            raise ValueError(
                "--precision 16 (fp16 mixed precision) needs a CUDA device; on the CPU use 32 or bf16."
            )
        depth = int((self.network_kwargs or {}).get("encoder_depth", 5))
        if self.image_size < 2**depth or self.image_size % 2**depth:
            raise ValueError(
                f"--image-size must be a positive multiple of {2**depth} (the encoder downsamples "
                f"{depth} times), got {self.image_size}."
            )
        if self.batch_size < 2:
            raise ValueError(
                f"--batch-size must be at least 2 (BatchNorm in training mode), got {self.batch_size}."
            )
        if self.steps < 3:
            raise ValueError(f"--steps must be at least 3 to give a median, got {self.steps}.")
        if self.warmup < 1:
            raise ValueError(f"--warmup must be at least 1, got {self.warmup}.")
        if self.lazy_k < 1:
            raise ValueError(f"--k must be at least 1, got {self.lazy_k}.")
        return dataclasses.replace(self, precision=precision, device=str(device))

    @property
    def torch_device(self) -> torch.device:
        """The device as a :class:`torch.device`."""
        return torch.device(self.device)

    def network_args(self) -> dict[str, Any]:
        """Network arguments shared by :class:`GPCPSModule` and :func:`build_network`."""
        return {"arch": self.arch, "encoder_name": self.encoder_name, "network_kwargs": self.network_kwargs}
