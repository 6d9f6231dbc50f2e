#!/usr/bin/env python
"""GPU performance check (issue 6, item 4): run it on a CUDA machine; about 3 minutes on an H100.

    python scripts/gpu_check.py --out gpu_results

It benchmarks the training steps (supervised, CPS, GP-CPS exact and lazy, plain PyTorch loop) at the
paper's size (resnet34 UNet, 256 px, batch 16) in bf16, fp16 and fp32, then bf16 with channels-last, measures
the card's bf16 (and fp32) matrix-multiply rate with a large ``torch.matmul``, and profiles the bf16 GP-CPS
step. Everything goes to ``--out`` as JSON (and text tables), each file written as soon as it is measured:

- ``matmul.json``: the measured matmul rates;
- ``bench_<precision>.json`` / ``.txt``: the benchmark reports (``python -m gpcps_lightning.tools.bench``);
- ``bench_bf16_channels_last.json`` / ``.txt``;
- ``profile_bf16/``: operator table, trace and phase timings of the bf16 GP-CPS step;
- ``summary.json``: the checks below, with the figures they rest on.

Checks (exit status 1 if one fails): under fp16 autocast, the gradient penalty's parameter gradient agrees
with float32's (cosine > 0.99, relative norm error < 5%, finite; ``fp16_penalty.json``, on the benchmark's
network at its image size, batch 4); every step kind gives finite losses (in particular a CUDA bf16 and
fp16 GP-CPS step); the GP-CPS step's peak allocated memory in bf16 and fp16 is at most 20 GB (so that it
fits a 24 GB RTX 3090 with room to spare). Reported without a pass mark: achieved FLOP/s of each step as a
fraction of the measured bf16 matmul rate, and 5000 GP-CPS steps projected from the median step (the
paper's 1/8 protocol, without validation and data loading).

For a quick run of the CPU-runnable parts (what the tests do): ``--device cpu --image-size 32
--batch-size 2 --encoder resnet18 --network-kwargs '{"encoder_depth": 3, "decoder_channels": [16, 8, 4]}'
--precisions 32 bf16 --steps 3 --warmup 1 --matmul-size 256 --isolate no``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gpcps_lightning

import torch

from gpcps_lightning import GPCPSModule
from gpcps_lightning.testing import fp16_penalty_agreement
from gpcps_lightning.tools.bench import STEP_KINDS, BenchConfig, format_report, profile_step, run_benchmark

MEMORY_LIMIT_BYTES = 20 * 10**9
FP16_MIN_COSINE = 0.99
FP16_MAX_RELATIVE_ERROR = 0.05
PROTOCOL_STEPS = 5000


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, size: int, iters: int = 30) -> float:
    """FLOP/s of a ``size`` x ``size`` by ``size`` x ``size`` matmul in ``dtype`` (median of ``iters``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2.0 * size**3 / times[len(times) // 2]


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every check passes, 1 otherwise."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Folder for the JSON results (created).")
    p.add_argument("--device", default="cuda")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--network-kwargs", type=json.loads, default=None)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precisions", nargs="+", default=["bf16", "16", "32"])
    p.add_argument("--kinds", default=",".join(STEP_KINDS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--no-channels-last", action="store_true", help="Skip the channels-last bf16 run.")
    p.add_argument("--no-profile", action="store_true", help="Skip the profile of the bf16 GP-CPS step.")
    p.add_argument("--no-fp16-penalty", action="store_true", help="Skip the fp16 penalty gradient check.")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine (use --device cpu for a dry run).",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    kinds = [k for k in args.kinds.split(",") if k]
    isolate = {"auto": None, "yes": True, "no": False}[args.isolate]

    matmul = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.matmul_size,
        "bf16_flops_per_s": measure_matmul_rate(device, torch.bfloat16, args.matmul_size),
    }
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        matmul["fp32_flops_per_s"] = measure_matmul_rate(device, torch.float32, args.matmul_size)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _write(out / "matmul.json", matmul)
    print(f"bf16 matmul: {matmul['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)

    checks: dict[str, Any] = {}
    if not args.no_fp16_penalty:
        module = GPCPSModule(encoder_name=args.encoder, network_kwargs=args.network_kwargs)
        agreement = fp16_penalty_agreement(module, device, image_size=args.image_size, batch_size=4)
        del module
        _write(out / "fp16_penalty.json", agreement)
        print(f"fp16 penalty gradient vs fp32: {json.dumps(agreement)}", flush=True)
        checks["fp16_penalty_gradient_matches_fp32"] = bool(
            agreement["finite"]
            and agreement["cosine"] > FP16_MIN_COSINE
            and agreement["relative_norm_error"] < FP16_MAX_RELATIVE_ERROR
        )

    def config(precision: str, channels_last: bool = False) -> BenchConfig:
        return BenchConfig(
            encoder_name=args.encoder,
            network_kwargs=args.network_kwargs,
            image_size=args.image_size,
            batch_size=args.batch_size,
            precision=precision,
            device=args.device,
            steps=args.steps,
            warmup=args.warmup,
            lazy_k=args.k,
            channels_last=channels_last,
        )

    runs: list[tuple[str, str, bool, list[str]]] = [
        (p_, f"bench_{p_}", False, kinds) for p_ in args.precisions
    ]
    if not args.no_channels_last and "bf16" in args.precisions:
        runs.append(("bf16", "bench_bf16_channels_last", True, [k for k in kinds if k in ("cps", "gpcps")]))
    reports: dict[str, dict[str, Any]] = {}
    for precision, name, channels_last, run_kinds in runs:
        if not run_kinds:
            continue
        report = run_benchmark(
            config(precision, channels_last),
            run_kinds,
            isolate=isolate,
            command=f"scripts/gpu_check.py ({name})",
            progress=lambda line: print(line, flush=True),
        )
        reports[name] = report.to_dict()
        _write(out / f"{name}.json", reports[name])
        (out / f"{name}.txt").write_text(format_report(report) + "\n")
        print(format_report(report), flush=True)

    if not args.no_profile and "bf16" in args.precisions:
        phases = profile_step(config("bf16"), out / "profile_bf16", kind="gpcps")
        print("bf16 phases (s):", json.dumps(phases), flush=True)

    figures: dict[str, Any] = {}
    peak_rate = matmul["bf16_flops_per_s"]
    for name, rep in reports.items():
        for kind, s in rep["summary"].items():
            figures[f"{name}/{kind}"] = {
                "median_step_ms": 1e3 * s["median_step_s"],
                "images_per_s": s["images_per_s"],
                "peak_memory_gib": None if s["peak_memory_bytes"] is None else s["peak_memory_bytes"] / 2**30,
                "achieved_tflops": s["achieved_flops_per_s"] / 1e12,
                "fraction_of_bf16_matmul_rate": s["achieved_flops_per_s"] / peak_rate,
            }
            checks[f"finite_losses/{name}/{kind}"] = bool(s["losses_finite"])
        figures[f"{name}/ratios"] = {k: v["median"] for k, v in rep["ratios"].items()}
        gp = rep["summary"].get("gpcps")
        if (
            gp is not None
            and rep["config"]["precision"] in ("bf16", "16")
            and not rep["config"]["channels_last"]
        ):
            peak = gp["peak_memory_bytes"]
            checks[f"gpcps_peak_memory_le_20GB/{name}"] = peak is not None and peak <= MEMORY_LIMIT_BYTES
            figures[f"{name}/gpcps/projected_{PROTOCOL_STEPS}_steps_s"] = PROTOCOL_STEPS * gp["median_step_s"]
    ok = all(checks.values()) and bool(checks)
    summary = {
        "passed": ok,
        "checks": checks,
        "figures": figures,
        "matmul": matmul,
        "memory_limit_bytes": MEMORY_LIMIT_BYTES,
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - started,
    }
    _write(out / "summary.json", summary)
    failed = [k for k, v in checks.items() if not v]
    print(f"gpu_check: {'passed' if ok else 'FAILED: ' + ', '.join(failed)} ({summary['wall_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
