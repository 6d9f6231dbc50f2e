"""The command line: ``gpcps bench`` / ``python -m gpcps_lightning.tools.bench``, and the worker entry."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from gpcps_lightning.tools.bench.config import METHOD_KINDS, STEP_KINDS, BenchConfig
from gpcps_lightning.tools.bench.profiling import profile_step
from gpcps_lightning.tools.bench.report import format_report
from gpcps_lightning.tools.bench.runner import run_benchmark, run_kind

#: Options whose value is a file the report names; only the file's name is recorded (no machine paths).
_PATH_OPTIONS = ("--json", "--profile")


def _without_folders(args: list[str]) -> list[str]:
    """The command line with the folders of output files left out, so that reports hold no local paths."""
    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name in _PATH_OPTIONS and eq:
            out[i] = f"{name}={Path(value).name}"
        elif arg in _PATH_OPTIONS and i + 1 < len(out):
            out[i + 1] = Path(out[i + 1]).name
    return out


__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpcps bench",
        description=(
            "Time training steps of the supervised, CPS, GP-CPS (exact and lazy) and plain-PyTorch GP-CPS "
            "steps on synthetic on-device data. Defaults are the paper's size (resnet34 UNet, 256 px, "
            "batch 16), meant for a GPU; on a CPU try --encoder resnet18 --image-size 64 --batch-size 4."
        ),
    )
    p.add_argument("--encoder", default="resnet34", help="smp encoder name (default: resnet34).")
    p.add_argument("--arch", default="Unet", help="smp architecture (default: Unet).")
    p.add_argument(
        "--network-kwargs",
        type=json.loads,
        default=None,
        help="Further smp.create_model arguments as JSON, e.g. '{\"encoder_depth\": 3}'.",
    )
    p.add_argument("--image-size", type=int, default=256, help="Square image size in pixels (default: 256).")
    p.add_argument(
        "--batch-size", type=int, default=16, help="Labeled (and unlabeled) images per step (default: 16)."
    )
    p.add_argument("--precision", default="32", help="32, bf16 or 16 (fp16, CUDA only) (default: 32).")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)."
    )
    p.add_argument("--steps", type=int, default=20, help="Timed steps per kind (default: 20).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed warm-up steps per kind (default: 3).")
    p.add_argument("--k", type=int, default=8, help="gp_every_n_steps of the lazy kind (default: 8).")
    p.add_argument(
        "--kinds",
        default=",".join(STEP_KINDS),
        help=f"Comma-separated step kinds (default: {','.join(STEP_KINDS)}; also: {','.join(METHOD_KINDS)}).",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="Run all kinds this many times in rotation (default: 1)."
    )
    p.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Each kind in a fresh subprocess: auto = on the CPU only (peak RSS per kind) (default: auto).",
    )
    p.add_argument("--channels-last", action="store_true", help="Channels-last networks and batches.")
    p.add_argument(
        "--no-cudnn-benchmark", action="store_true", help="Do not let cuDNN autotune convolutions (CUDA)."
    )
    p.add_argument(
        "--plain-fused-adam",
        action="store_true",
        help="Fused Adam in the plain loop, as in the modules (default: PyTorch's default Adam).",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data (default: 0).")
    p.add_argument("--json", default=None, metavar="PATH", help="Also write the full report as JSON here.")
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="Instead of benchmarking, profile the --profile-kind step and time the plain step's phases.",
    )
    p.add_argument("--profile-kind", default="gpcps", help="Lightning step kind to profile (default: gpcps).")
    p.add_argument("--quiet", action="store_true", help="No progress lines.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gpcps_lightning.tools.bench`` / ``gpcps bench``.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad option values (unparsable options exit with status 2
        through argparse's ``SystemExit``).
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.threads is not None:
        if args.threads < 1:
            print(f"gpcps bench: error: --threads must be at least 1, got {args.threads}.", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        config = BenchConfig(**json.loads(args.worker_config))
        result = run_kind(args.worker, config)
        Path(args.worker_out).write_text(json.dumps(dataclasses.asdict(result)))
        return 0
    config = BenchConfig(
        encoder_name=args.encoder,
        arch=args.arch,
        network_kwargs=args.network_kwargs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        steps=args.steps,
        warmup=args.warmup,
        lazy_k=args.k,
        channels_last=args.channels_last,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        seed=args.seed,
        plain_fused_adam=args.plain_fused_adam,
    )
    try:
        config = config.checked()
        if args.profile is not None:
            phases = profile_step(config, args.profile, kind=args.profile_kind)
            for name, values in phases.items():
                print(name + ": " + ", ".join(f"{phase} {1e3 * t:.1f} ms" for phase, t in values.items()))
            print(f"operator table and trace written to {args.profile}")
            return 0
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        isolate = {"auto": None, "yes": True, "no": False}[args.isolate]
        report = run_benchmark(
            config,
            kinds,
            rounds=args.rounds,
            isolate=isolate,
            threads=args.threads,
            command="python -m gpcps_lightning.tools.bench " + " ".join(_without_folders(args_list)),
            progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as err:
        print(f"gpcps bench: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2))
    return 0
