"""Export a trained module (the ensemble or one network) to TorchScript or ONNX for deployment.

The exported model maps images (N, 3, H, W) to foreground probabilities (N, 1, H, W) of one head
(``ensemble`` for GP-CPS by default). With ``normalize=True`` it takes images scaled to [0, 1] and applies
the training normalisation itself; otherwise it expects normalised images, as the module does. Batch
size and image size are dynamic (H and W must suit the network, e.g. multiples of 32 for a five-stage
UNet). Each export is checked against the PyTorch output and written atomically.

Metadata (head, threshold, training size, mean, std, input convention) travels with the file: the ONNX
model's ``metadata_props`` and the TorchScript archive's extra file ``gpcps.json``.

Command line::

    gpcps export runs/quickstart/checkpoints/best.ckpt --output model.onnx
    gpcps export best.ckpt --output model.pt --format torchscript --head net1 --normalize
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gpcps_lightning._lightning_internals import jit_scripting
from gpcps_lightning._utils import atomic_path, size_pair
from gpcps_lightning.checkpointing import read_checkpoint
from gpcps_lightning.inference.predict import (
    Preprocessing,
    add_checkpoint_arguments,
    load_module,
    parse_checkpoint_arguments,
)
from gpcps_lightning.methods.base import SegmentationModule

__all__ = ["ExportedHead", "export_onnx", "export_torchscript", "main"]


class ExportedHead(nn.Module):
    """The probabilities of one head of a :class:`SegmentationModule`, as a plain ``nn.Module``.

    Args:
        module: The trained module.
        head: One of ``module.head_names``; ``None`` is the predicting head (``module.forward``: the
            ensemble where there is one).
        preprocessing: If given, inputs are images in [0, 1] and are normalised with its mean/std first.

    Raises:
        ValueError: If ``head`` is not one of the module's heads.

    Shape:
        - input: (N, 3, H, W) float32
        - output: (N, 1, H, W) float32 in [0, 1]
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, module: SegmentationModule, head: str | None = None, preprocessing: Preprocessing | None = None
    ) -> None:
        super().__init__()
        names = tuple(getattr(module, "head_names", ()))
        if head is not None and head not in names:
            raise ValueError(
                f"`head` must be one of {names} (or None for the predicting head), got {head!r}."
            )
        self.module = module
        self.head = head
        self.normalize = preprocessing is not None
        mean = preprocessing.mean if preprocessing is not None else (0.0, 0.0, 0.0)
        std = preprocessing.std if preprocessing is not None else (1.0, 1.0, 1.0)
        device = next(module.parameters()).device
        for name, values in (("mean", mean), ("std", std)):
            tensor = torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, images: Tensor) -> Tensor:  # noqa: D102
        if self.normalize:
            images = (images - self.mean) / self.std
        if self.head is None:
            return self.module(images)
        return self.module.head_probabilities(images)[self.head]


@contextlib.contextmanager
def _exporting(module: SegmentationModule) -> Iterator[None]:
    # Tracers probe every attribute; a LightningModule's `trainer` property raises when no Trainer is
    # attached unless Lightning's scripting flag (set by LightningModule.to_torchscript) is on.
    was_training = module.training
    module.eval()
    try:
        with jit_scripting(module):
            yield
    finally:
        module.train(was_training)


def _example(example: Tensor | None, image_size: int | Sequence[int] | None, module: nn.Module) -> Tensor:
    if example is not None:
        if not isinstance(example, Tensor) or example.ndim != 4:
            raise ValueError("`example` must be an image tensor of shape (N, C, H, W).")
        return example
    if image_size is None:
        raise ValueError("Give `image_size` (the training size) or an `example` input to export with.")
    size = size_pair(image_size)
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, *size, generator=generator).to(device)


def _check(reference: Tensor, output: Tensor, atol: float, what: str) -> None:
    if tuple(reference.shape) != tuple(output.shape):
        raise RuntimeError(
            f"{what}: output shape {tuple(output.shape)} differs from PyTorch's {tuple(reference.shape)}."
        )
    diff = float((reference.float().cpu() - output.float().cpu()).abs().max())
    if not diff <= atol:
        raise RuntimeError(f"{what}: output differs from PyTorch by up to {diff:.3g} (> atol={atol:g}).")


def _metadata(
    module: SegmentationModule, head: str | None, preprocessing: Preprocessing | None, normalize: bool
) -> dict[str, str]:
    meta = {
        "gpcps.head": head or "predicting head (forward)",
        "gpcps.module": type(module).__qualname__,
        "gpcps.threshold": str(float(getattr(module, "threshold", 0.5))),
        "gpcps.input": "images in [0, 1], normalised inside"
        if normalize
        else "images normalised with mean/std",
        "gpcps.output": "foreground probabilities (N, 1, H, W)",
    }
    if preprocessing is not None:
        meta["gpcps.image_size"] = json.dumps(list(preprocessing.image_size))
        meta["gpcps.mean"] = json.dumps(list(preprocessing.mean))
        meta["gpcps.std"] = json.dumps(list(preprocessing.std))
    return meta


def export_torchscript(
    module: SegmentationModule,
    path: str | os.PathLike[str],
    head: str | None = None,
    image_size: int | Sequence[int] | None = None,
    example: Tensor | None = None,
    preprocessing: Preprocessing | None = None,
    normalize: bool = False,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Trace one head of ``module`` to TorchScript and save it.

    Args:
        module: The trained module.
        path: Output file (``.pt``); written atomically.
        head: Head to export; ``None`` is the predicting head (the ensemble for GP-CPS).
        image_size: Training size, used for the example input when ``example`` is not given.
        example: Example input (N, 3, H, W) to trace with.
        preprocessing: Training size and normalisation (stored as metadata; needed for ``normalize``).
        normalize: Bake the normalisation in: the model then takes images in [0, 1].
        check: Reload the file and compare it with PyTorch on the example and on one image of it.
        atol: Largest absolute difference the check accepts.

    Returns:
        The written path.

    Raises:
        ValueError: On a bad head, missing size, or ``normalize`` without ``preprocessing``.
        RuntimeError: If the check fails.
    """
    if normalize and preprocessing is None:
        raise ValueError("`normalize=True` needs `preprocessing` (the training mean and std).")
    if image_size is None and preprocessing is not None:
        image_size = preprocessing.image_size
    wrapper = ExportedHead(module, head, preprocessing if normalize else None).eval()
    x = _example(example, image_size, module)
    target = Path(path)
    with _exporting(module), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning
        )
        traced = torch.jit.trace(wrapper, x, check_trace=False)
        extra = {"gpcps.json": json.dumps(_metadata(module, head, preprocessing, normalize))}
        with atomic_path(target) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=extra)
            if check:
                loaded = torch.jit.load(str(tmp), map_location=x.device)
                for inputs in (x, x[:1]):
                    _check(wrapper(inputs), loaded(inputs), atol, f"TorchScript export {os.fspath(target)!r}")
    return target


def export_onnx(
    module: SegmentationModule,
    path: str | os.PathLike[str],
    head: str | None = None,
    image_size: int | Sequence[int] | None = None,
    example: Tensor | None = None,
    preprocessing: Preprocessing | None = None,
    normalize: bool = False,
    opset_version: int | None = None,
    dynamic: bool = True,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export one head of ``module`` to ONNX (with ``torch.onnx.export(dynamo=True)``) and save it.

    The input is named ``images`` and the output ``probabilities``; batch, height and width are dynamic
    unless ``dynamic=False``. Needs the ``onnx`` and ``onnxscript`` packages, and ``onnxruntime`` for the
    check (``pip install gpcps-lightning[export]``).

    Args:
        module: The trained module.
        path: Output file (``.onnx``, weights inside); written atomically.
        head: Head to export; ``None`` is the predicting head (the ensemble for GP-CPS).
        image_size: Training size, used for the example input when ``example`` is not given.
        example: Example input (N, 3, H, W) to export with.
        preprocessing: Training size and normalisation (stored as metadata; needed for ``normalize``).
        normalize: Bake the normalisation in: the model then takes images in [0, 1].
        opset_version: ONNX opset (default: the exporter's).
        dynamic: Dynamic batch and image size.
        check: Run the file with onnxruntime and compare it with PyTorch on the example and one image.
        atol: Largest absolute difference the check accepts.

    Returns:
        The written path.

    Raises:
        ValueError: On a bad head, missing size, or ``normalize`` without ``preprocessing``.
        ImportError: If ``onnx``/``onnxscript`` (or ``onnxruntime`` with ``check=True``) is missing.
        RuntimeError: If the check fails.
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "ONNX export needs onnx and onnxscript: pip install 'gpcps-lightning[export]'."
        ) from err
    if check:
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError(
                "Checking the ONNX export needs onnxruntime: pip install 'gpcps-lightning[export]' "
                "(or pass check=False / --no-check)."
            ) from err
    if normalize and preprocessing is None:
        raise ValueError("`normalize=True` needs `preprocessing` (the training mean and std).")
    if image_size is None and preprocessing is not None:
        image_size = preprocessing.image_size
    wrapper = ExportedHead(module, head, preprocessing if normalize else None).eval()
    x = _example(example, image_size, module)
    target = Path(path)
    dynamic_shapes: Any = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = {"images": {0: dim, 2: dim, 3: dim}}
    kwargs: dict[str, Any] = {}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    with _exporting(module), torch.no_grad():
        with atomic_path(target) as tmp:
            torch.onnx.export(
                wrapper,
                (x,),
                str(tmp),
                input_names=["images"],
                output_names=["probabilities"],
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                **kwargs,
            )
            model = onnx.load(str(tmp))
            for key, value in _metadata(module, head, preprocessing, normalize).items():
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(model, str(tmp))
            if check:
                session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
                for inputs in (x, x[:1]):
                    (output,) = session.run(["probabilities"], {"images": inputs.float().cpu().numpy()})
                    _check(
                        wrapper(inputs), torch.from_numpy(output), atol, f"ONNX export {os.fspath(target)!r}"
                    )
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``gpcps export``: export a checkpoint to TorchScript or ONNX.

    Args:
        argv: Arguments without the program name.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="gpcps export",
        description="Export a trained checkpoint (one head, by default the ensemble) to ONNX or TorchScript, "
        "checked against PyTorch's output.",
    )
    parser.add_argument("checkpoint", help="The .ckpt file (e.g. runs/quickstart/checkpoints/best.ckpt).")
    parser.add_argument("--output", "-o", required=True, help="Output file (.onnx or .pt).")
    parser.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        default=None,
        help="Export format (default: from the output suffix, .onnx -> onnx, otherwise torchscript).",
    )
    parser.add_argument(
        "--head",
        default=None,
        help="Head to export, e.g. ensemble, net1, net2 (default: the predicting head, for GP-CPS the "
        "ensemble).",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="Bake the normalisation in: the model takes images in [0, 1].",
    )
    parser.add_argument("--no-check", action="store_true", help="Skip the comparison with PyTorch.")
    args = parser.parse_args(list(argv) if argv is not None else None)

    model_class, size = parse_checkpoint_arguments(parser, args)
    ckpt = read_checkpoint(args.checkpoint)
    module = load_module(ckpt, model_class)
    preprocessing: Preprocessing | None
    try:
        preprocessing = Preprocessing.from_hparams(
            ckpt.get("datamodule_hyper_parameters"),
            size,
            args.mean,
            args.std,
            source=f"Checkpoint {args.checkpoint!r}",
        )
    except ValueError:
        if args.normalize or size is None:
            raise
        preprocessing = None
    fmt: Literal["onnx", "torchscript"] = args.format or (
        "onnx" if Path(args.output).suffix.lower() == ".onnx" else "torchscript"
    )
    export = export_onnx if fmt == "onnx" else export_torchscript
    path = export(
        module,
        args.output,
        head=args.head,
        image_size=size if preprocessing is None else None,
        preprocessing=preprocessing,
        normalize=args.normalize,
        check=not args.no_check,
    )
    print(f"Exported {fmt} model to {path}" + ("" if args.no_check else " (matches PyTorch)"))
    return 0
