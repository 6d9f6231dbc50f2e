"""The CPU thread policy of a training on the CPU: how many intra-op threads PyTorch gets.

PyTorch starts one intra-op thread per core. On a machine where another process is also busy, each
parallel operation then waits at its barrier for a thread whose core is taken, and a training on 2 cores
beside one other CPU-bound process ran 10-20 times slower than alone instead of about 2 times
(docs/performance.md, "Sharing the CPU"). The policy here counts the cores this process may use and the
cores other processes keep busy (measured over a quarter of a second from ``/proc/stat`` when the run
starts; the 1-minute load average where there is no ``/proc/stat``), and gives PyTorch the cores that are
left, at least one. The run's own data-loader workers are counted by their measured use, once they run
(:func:`threads_after_workers`, applied by :class:`~gpcps_lightning.callbacks.LoaderWorkerThreads`): the
quickstart's one worker used 0.01 of a core, and a core reserved for it up front cost the training
almost half its speed (docs/performance.md). ``GPCPS_NUM_THREADS`` or an explicit ``OMP_NUM_THREADS``
overrides the policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "THREADS_ENV",
    "ThreadChoice",
    "apply_thread_policy",
    "available_cores",
    "busy_cores",
    "child_cpu_seconds",
    "choose_threads",
    "policy_overridden",
    "threads_after_workers",
]

#: Environment variable that sets the number of intra-op threads outright.
THREADS_ENV = "GPCPS_NUM_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    """The number of threads chosen and why, in words."""

    threads: int
    reason: str


def available_cores() -> int:
    """Cores this process may use (its CPU affinity; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # all jiffies, idle + iowait


def busy_cores(interval: float = 0.25) -> float:
    """Cores kept busy by other processes: machine-wide CPU use over ``interval`` seconds, in cores.

    This process sleeps meanwhile, so its own use does not count (its loader workers are not started
    yet). Without ``/proc/stat`` (not Linux): the 1-minute load average, which lags by about a minute.
    """
    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = total1 - total0
    if total <= 0:
        return 0.0
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1)


def choose_threads(
    loader_workers: int = 0,
    *,
    cores: int | None = None,
    load: float | None = None,
    environ: dict[str, str] | None = None,
) -> ThreadChoice:
    """The number of PyTorch intra-op threads for a CPU training.

    Args:
        loader_workers: Data-loader worker processes of the run: named in the reason, and counted later
            by their measured use (:func:`threads_after_workers`), not given a core up front.
        cores: Cores this process may use (default: its CPU affinity).
        load: Cores other processes keep busy (default: :func:`busy_cores`).
        environ: Environment to read ``GPCPS_NUM_THREADS`` and ``OMP_NUM_THREADS`` from (default:
            ``os.environ``).

    Returns:
        ``GPCPS_NUM_THREADS`` if set; else ``OMP_NUM_THREADS`` if set; else the cores left after the
        cores other processes keep busy (rounded to whole cores), at least 1.

    Raises:
        ValueError: If ``GPCPS_NUM_THREADS`` is not a positive integer.
    """
    env = os.environ if environ is None else environ
    if env.get(THREADS_ENV):
        value = env[THREADS_ENV]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}.")
        return ThreadChoice(int(value), f"{THREADS_ENV}={value}")
    omp = _omp_threads(env)
    if omp is not None:
        return ThreadChoice(omp, f"OMP_NUM_THREADS={omp}")
    cores = available_cores() if cores is None else cores
    if load is None:
        load = busy_cores()
    busy = round(load)
    threads = max(1, cores - busy)
    return ThreadChoice(
        threads,
        f"{cores} cores available, {busy} kept busy by other processes ({load:.1f} cores in use); "
        f"{loader_workers} data-loader workers, counted by their use once they run",
    )


def _omp_threads(env: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` when it is a positive integer, else ``None``."""
    value = env.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) >= 1 else None


def policy_overridden(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``GPCPS_NUM_THREADS`` or ``OMP_NUM_THREADS`` sets the threads (then nothing adjusts them)."""
    env = os.environ if environ is None else environ
    return bool(env.get(THREADS_ENV)) or _omp_threads(env) is not None


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (``fields[1]`` is the parent's pid)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(fields: list[str], children: bool = False) -> float:
    """User + system CPU seconds of a process, or of its waited-for children, from its stat fields."""
    first = 13 if children else 11  # cutime, cstime or utime, stime (fields 16-17 or 14-15 of proc(5))
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def child_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds used so far by the child processes of ``pid`` (default: this process).

    The living children's own user + system time plus that of the children already waited for, from
    ``/proc``; ``None`` where there is no ``/proc`` (not Linux) or ``pid`` is gone.
    """
    pid = os.getpid() if pid is None else pid
    try:
        total = _cpu_seconds(_stat(pid), children=True)
    except (OSError, ValueError, IndexError):
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat(entry.name)
                if int(fields[1]) == pid:
                    total += _cpu_seconds(fields)
            except (OSError, ValueError, IndexError):
                continue  # the process ended meanwhile
    return total


def threads_after_workers(threads: int, worker_cores: float) -> int:
    """The threads left once data-loader workers are seen to use ``worker_cores`` cores, at least 1.

    Whole cores only: workers that use less than half a core together keep every thread.
    """
    return max(1, threads - round(worker_cores))


def apply_thread_policy(loader_workers: int = 0, *, announce: bool = True) -> ThreadChoice:
    """Set PyTorch's intra-op threads by :func:`choose_threads` and, with ``announce``, say so once."""
    import torch

    choice = choose_threads(loader_workers)
    torch.set_num_threads(choice.threads)
    if announce:
        print(
            f"gpcps: PyTorch uses {choice.threads} CPU thread(s): {choice.reason}; set {THREADS_ENV} to "
            "choose (docs/performance.md).",
            flush=True,
        )
    return choice
