#!/usr/bin/env python
"""Does a CPU training share the machine gracefully? The quickstart's step alone and beside a busy process.

    python scripts/cpu_sharing.py --json docs/perf/cpu_sharing.json

Times the quickstart's GP-CPS step (``gpcps bench --kinds gpcps`` with the quickstart's network, 64 px,
batch 8) four times, each in a fresh process: alone and beside one CPU-bound process (a busy loop), each
with PyTorch's default number of threads (one per core) and with the number
:func:`gpcps_lightning.threads.choose_threads` picks at that moment. Reports the steps per second of each
and the slowdown beside the busy process, alone / beside, for each thread setting (a fair share of a
2-core machine is about 2x). Run it on an otherwise idle machine: the load average is recorded.
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

from gpcps_lightning.threads import available_cores, choose_threads

#: The quickstart's network and sizes (examples/configs/quickstart.yaml).
BENCH = [
    "--kinds", "gpcps", "--encoder", "tu-resnet18",
    "--network-kwargs", '{"encoder_depth": 3, "decoder_channels": [32, 16, 8]}',
    "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--isolate", "no", "--quiet",
]  # fmt: skip


def _busy_loop() -> None:
    while True:
        pass


def _bench(threads: int, steps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        command = [sys.executable, "-m", "gpcps_lightning.tools.bench", *BENCH]
        command += ["--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
        command += ["--json", str(out)]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        clock = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - clock
        report = json.loads(out.read_text())
    median = report["rounds"][0]["gpcps"]["median_step_s"]
    return {"threads": threads, "median_step_s": median, "steps_per_s": 1.0 / median, "wall_s": seconds}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds the busy loop runs first")
    args = parser.parse_args(argv)

    cores = available_cores()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GPCPS_NUM_THREADS")}
    results: dict[str, Any] = {"cores": cores, "load_at_start": os.getloadavg()[0]}
    alone_choice = choose_threads(0, environ=env)
    results["alone"] = {
        "default": _bench(cores, args.steps, args.warmup),
        "policy": {**_bench(alone_choice.threads, args.steps, args.warmup), "reason": alone_choice.reason},
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
    finally:
        hog.terminate()
        hog.join()
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
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
