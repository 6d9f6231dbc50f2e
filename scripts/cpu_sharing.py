#!/usr/bin/env python
"""Does a CPU training share the machine gracefully? The quickstart's step alone and beside a busy process.

    python scripts/cpu_sharing.py --json docs/perf/cpu_sharing.json

Times the quickstart's GP-CPS step (``gpcps bench --kinds gpcps`` with the quickstart's network, 64 px,
batch 8) four times, each in a fresh process: alone and beside one CPU-bound process (a busy loop), each
with PyTorch's default number of threads (one per core) and with the number
:func:`gpcps_lightning.threads.choose_threads` picks at that moment. Reports the steps per second of each
and the slowdown beside the busy process, alone / beside, for each thread setting (a fair share of a
2-core machine is about 2x).

Then the quickstart itself (``gpcps fit --config examples/configs/quickstart.yaml`` for ``--fit-steps``
steps, its one data-loader worker included, data generated beforehand) alone with 1 thread (what the
policy chose when it reserved a core for the worker), alone with the policy's choice, and beside the busy
process with the policy's choice: the wall time of each fit and the CPU time its loader worker used per
second of it (read from ``/proc``). Run it on an otherwise idle machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpcps_lightning.threads import available_cores, child_cpu_seconds, choose_threads

#: The quickstart's network and sizes (examples/configs/quickstart.yaml).
BENCH = [
    "--kinds", "gpcps", "--encoder", "tu-resnet18",
    "--network-kwargs", '{"encoder_depth": 3, "decoder_channels": [32, 16, 8]}',
    "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--isolate", "no", "--quiet",
]  # fmt: skip


def _unpinned_environ() -> dict[str, str]:
    """This environment without the variables that pin a thread count (each run sets its own)."""
    pins = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GPCPS_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if k not in pins}


def _busy_loop() -> None:
    while True:
        pass


def _bench(threads: int, steps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        command = [sys.executable, "-m", "gpcps_lightning.tools.bench", *BENCH]
        command += ["--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
        command += ["--json", str(out)]
        env = _unpinned_environ()
        clock = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - clock
        report = json.loads(out.read_text())
    median = report["rounds"][0]["gpcps"]["median_step_s"]
    return {"threads": threads, "median_step_s": median, "steps_per_s": 1.0 / median, "wall_s": seconds}


QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "configs" / "quickstart.yaml"


def _fit(folder: Path, steps: int, threads: int | None) -> dict[str, Any]:
    """The quickstart's fit in ``folder`` (its data there already): wall time and the workers' CPU time."""
    command = [sys.executable, "-m", "gpcps_lightning", "fit", "--config", str(QUICKSTART)]
    command += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    command += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    env = _unpinned_environ()
    if threads is not None:
        env["GPCPS_NUM_THREADS"] = str(threads)
    clock = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, text=True)
    worker_cpu = 0.0  # the fit's children (its loader workers), read until the fit ends
    while process.poll() is None:
        worker_cpu = child_cpu_seconds(process.pid) or worker_cpu
        time.sleep(0.5)
    seconds = time.perf_counter() - clock
    out = process.stdout.read() if process.stdout else ""
    if process.returncode:
        raise SystemExit(f"the quickstart's fit failed (exit {process.returncode}):\n{out}")
    said = [line for line in out.splitlines() if "PyTorch uses" in line]
    return {
        "steps": steps,
        "wall_s": seconds,
        "thread_line": said[0] if said else None,
        "worker_cpu_s": worker_cpu,
        "worker_cores_used": worker_cpu / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds the busy loop runs first")
    parser.add_argument("--fit-steps", type=int, default=150, help="steps of each quickstart fit (0: none)")
    args = parser.parse_args(argv)

    cores = available_cores()
    env = _unpinned_environ()
    results: dict[str, Any] = {"cores": cores, "load_at_start": os.getloadavg()[0]}
    alone_choice = choose_threads(0, environ=env)
    results["alone"] = {
        "default": _bench(cores, args.steps, args.warmup),
        "policy": {**_bench(alone_choice.threads, args.steps, args.warmup), "reason": alone_choice.reason},
    }
    scratch = tempfile.TemporaryDirectory()
    folder = Path(scratch.name)
    if args.fit_steps:
        _fit(folder, 1, 1)  # generates the data and its cache, untimed
        results["quickstart_alone"] = {
            "one_thread": _fit(folder, args.fit_steps, 1),
            "policy": _fit(folder, args.fit_steps, None),
        }
    hog = multiprocessing.Process(target=_busy_loop, daemon=True)
    hog.start()
    try:
        time.sleep(args.settle)  # the busy loop is running before the policy looks
        beside_choice = choose_threads(0, environ=env)
        results["beside_busy_process"] = {
            "default": _bench(cores, args.steps, args.warmup),
            "policy": {
                **_bench(beside_choice.threads, args.steps, args.warmup),
                "reason": beside_choice.reason,
            },
        }
        if args.fit_steps:
            results["quickstart_beside_busy_process"] = {"policy": _fit(folder, args.fit_steps, None)}
    finally:
        hog.terminate()
        hog.join()
        scratch.cleanup()
    results["slowdown_beside_busy_process"] = {
        name: results["alone"][name]["steps_per_s"] / results["beside_busy_process"][name]["steps_per_s"]
        for name in ("default", "policy")
    }
    results["command"] = "python scripts/cpu_sharing.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("/")
    )
    from gpcps_lightning.tools.provenance import code_version, library_versions

    results["code"], results["versions"] = code_version(), library_versions()
    for name in ("default", "policy"):
        alone, beside = results["alone"][name], results["beside_busy_process"][name]
        print(
            f"{name:>7}: alone {alone['steps_per_s']:.2f} steps/s ({alone['threads']} threads), "
            f"beside a busy process {beside['steps_per_s']:.2f} steps/s ({beside['threads']} threads): "
            f"{results['slowdown_beside_busy_process'][name]:.1f}x slower"
        )
    for name, runs in results.items():
        if name.startswith("quickstart_"):
            for setting, run in runs.items():
                print(
                    f"{name} ({setting}): {run['wall_s']:.1f} s for {run['steps']} steps, loader worker "
                    f"{run['worker_cores_used']:.2f} cores; {run['thread_line']}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
