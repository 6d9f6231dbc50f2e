"""Running the step kinds: in this process or each in a fresh worker process, for one or more rounds."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gpcps_lightning._utils import code_version
from gpcps_lightning.tools.bench.batches import make_batches
from gpcps_lightning.tools.bench.config import ALL_KINDS, STEP_KINDS, BenchConfig
from gpcps_lightning.tools.bench.lightning_kinds import run_lightning
from gpcps_lightning.tools.bench.measure import KindResult
from gpcps_lightning.tools.bench.plain import run_plain
from gpcps_lightning.tools.bench.report import BenchReport, make_report

__all__ = ["run_benchmark", "run_kind"]


def run_kind(kind: str, config: BenchConfig) -> KindResult:
    """Benchmark one step kind in this process.

    Args:
        kind: One of :data:`ALL_KINDS`.
        config: The configuration (checked here).

    Returns:
        The measurements.

    Raises:
        ValueError: On an unknown kind or a bad configuration.
    """
    config = config.checked()
    if kind not in ALL_KINDS:
        raise ValueError(f"Unknown step kind {kind!r}; choose from {', '.join(ALL_KINDS)}.")
    device = config.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    batches = make_batches(config)
    try:
        with warnings.catch_warnings():
            # Lightning's advice about dataloader workers and the like does not apply to on-device data.
            warnings.simplefilter("ignore")
            if kind == "plain":
                return run_plain(config, batches)
            return run_lightning(kind, config, batches)
    finally:
        del batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _package_root() -> str:
    """The folder holding this copy of the ``gpcps_lightning`` package (for the worker's ``PYTHONPATH``)."""
    return str(Path(__file__).resolve().parents[3])


def _run_kind_isolated(kind: str, config: BenchConfig, threads: int | None) -> KindResult:
    """Run one kind in a fresh Python process (so that its peak RSS is its own)."""
    with tempfile.TemporaryDirectory(prefix="gpcps-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "gpcps_lightning.tools.bench",
            "--worker",
            kind,
            "--worker-config",
            json.dumps(dataclasses.asdict(config)),
            "--worker-out",
            str(out),
        ]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        # The worker must import this very copy of the package.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"The benchmark worker for step kind {kind!r} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}"
            )
        return KindResult(**json.loads(out.read_text()))


def _git_commit() -> str | None:
    commit = code_version()["commit"]
    return None if commit == "unknown" else commit


def _environment(config: BenchConfig) -> dict[str, Any]:
    import segmentation_models_pytorch as smp

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = config.torch_device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "segmentation_models_pytorch": smp.__version__,
        "commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run_benchmark(
    config: BenchConfig,
    kinds: Sequence[str] = STEP_KINDS,
    rounds: int = 1,
    isolate: bool | None = None,
    threads: int | None = None,
    command: str = "",
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Benchmark the given step kinds, ``rounds`` times in rotation, and summarise.

    Args:
        config: The configuration (checked here).
        kinds: Step kinds, a subset of :data:`ALL_KINDS`.
        rounds: How many times to run every kind; ratios are taken within a round, then their median.
        isolate: Run each kind in a fresh subprocess; ``None``: on the CPU only (where peak RSS needs it;
            on CUDA the allocator's peak is reset per kind instead).
        threads: ``torch.set_num_threads`` for the runs (``None``: PyTorch's default).
        command: The command line, recorded in the report.
        progress: Called with a line of text after each kind.

    Returns:
        The report.

    Raises:
        ValueError: On a bad configuration, an unknown or repeated kind, or ``rounds < 1``.
    """
    config = config.checked()
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"--kinds must be distinct names from {', '.join(ALL_KINDS)}, got {kinds}.")
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}.")
    if isolate is None:
        isolate = config.torch_device.type == "cpu"
    if threads is not None:
        torch.set_num_threads(threads)
    environment = _environment(config)
    all_rounds: list[dict[str, KindResult]] = []
    for r in range(rounds):
        results: dict[str, KindResult] = {}
        for kind in kinds:
            results[kind] = _run_kind_isolated(kind, config, threads) if isolate else run_kind(kind, config)
            if progress is not None:
                progress(f"round {r + 1}/{rounds} {kind}: {1e3 * results[kind].median_step_s:.1f} ms/step")
        all_rounds.append(results)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return make_report(config, kinds, all_rounds, environment, command)
