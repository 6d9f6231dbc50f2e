"""Measuring a step: device synchronisation, FLOP counting, memory, and step times to a :class:`KindResult`.

A step is the wall time from one batch start to the next (the device synchronised at each start). FLOPs are
counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the first steps, before the warm-up, so the
count does not disturb the timing. Peak memory is the CUDA allocator's peak on a GPU and the process's peak
resident set size on the CPU, never below the reading taken just before the first step (see
:func:`_memory_peak`).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from gpcps_lightning.tools.bench.config import BenchConfig

__all__ = ["KindResult", "count_step_flops"]


@dataclass
class KindResult:
    """Measurements of one step kind.

    ``median_step_s`` and ``min_step_s`` are over the timed steps. For ``gpcps_lazy`` they are amortized:
    the median over windows of ``lazy_k`` consecutive steps (each holding exactly one penalty step) of the
    window's mean step, and ``(fastest penalty step + (k - 1) * fastest other step) / k``;
    ``penalty_step_s`` / ``no_penalty_step_s`` give the medians of the two step types.
    ``flops_per_step`` is amortized the same way. Peak memory is the CUDA allocator's peak
    (``torch.cuda.max_memory_allocated``) or the process's peak RSS (``memory_measure`` says which);
    ``memory_before_steps_bytes`` is the same measure just before the first step (model, optimizer and
    data in place); ``peak_memory_bytes`` is never below it.
    """

    kind: str
    step_times_s: list[float]
    median_step_s: float
    min_step_s: float
    images_per_s: float
    flops_per_step: float
    achieved_flops_per_s: float
    peak_memory_bytes: int | None
    memory_before_steps_bytes: int | None
    memory_measure: str
    losses: dict[str, float] = field(default_factory=dict)
    losses_finite: bool = True
    penalty_step_s: float | None = None
    no_penalty_step_s: float | None = None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (Linux), else ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss_bytes() -> int | None:
    """Peak resident set size of this process, else ``None`` where the platform does not say."""
    # /proc's VmHWM is at least its VmRSS read at the same moment (getrusage's figure can lag the current
    # RSS); an earlier VmRSS can still exceed it, see _memory_peak.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _GlobalOnlyTracker:
    """Stands in for FlopCounterMode's module tracker, which cannot follow ``torch.autograd.grad``.

    The tracker hooks module inputs with multi-grad hooks; a leaf input such as the fused image of the
    gradient penalty then fails inside ``torch.autograd.grad``. Only the global total is needed here.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnlyTracker:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts the global total only (see :class:`_GlobalOnlyTracker`)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnlyTracker()  # type: ignore[assignment]
    return counter


def count_step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), as ``FlopCounterMode`` counts them.

    Only matrix products and convolutions (and the like) count; element-wise work counts 0.

    Args:
        step: Runs one training step (or any computation).

    Returns:
        The total FLOP count.
    """
    counter = flop_counter()
    with counter:
        step()
    return int(counter.get_total_flops())


def memory_start(device: torch.device) -> int | None:
    """Reset the CUDA peak (model, optimizer and data stay counted) and return the current figure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return _rss_bytes()


def _memory_peak(device: torch.device, memory_before: int | None) -> tuple[int | None, str]:
    """The peak since :func:`memory_start` and the name of its measure, at least ``memory_before``.

    On the CPU the peak (VmHWM) and the reading before the steps (VmRSS) are different kernel figures:
    Linux records its high-water mark only at some events (such as unmapping memory) and reports the larger
    of that mark and the current resident set. Memory handed back with ``madvise(MADV_DONTNEED)`` (as
    allocators do) or reclaimed under memory pressure lowers the resident set without raising the mark, so
    a later VmHWM can come out below an earlier VmRSS (a few hundred KiB was seen under load). The resident
    set did reach ``memory_before``, so the peak is the larger of the two.

    Args:
        device: The device the steps ran on.
        memory_before: What :func:`memory_start` returned, or ``None`` where it could not say.

    Returns:
        The peak in bytes (``None`` where the platform does not say) and the measure's name.
    """
    if device.type == "cuda":
        peak: int | None = int(torch.cuda.max_memory_allocated(device))
        measure = "cuda_max_memory_allocated"
    else:
        peak, measure = _peak_rss_bytes(), "process_peak_rss"
    if peak is not None and memory_before is not None:
        peak = max(peak, memory_before)
    return peak, measure


def n_flop_steps(kind: str, config: BenchConfig) -> int:
    """How many first steps of ``kind`` count FLOPs (before the warm-up)."""
    # The lazy kind counts one step with the penalty (step 0) and one without (step 1) and amortizes.
    return 2 if kind == "gpcps_lazy" and config.lazy_k > 1 else 1


def n_timed_steps(kind: str, config: BenchConfig) -> int:
    """How many steps of ``kind`` are timed: ``config.steps``, whole lazy windows for ``gpcps_lazy``."""
    if kind == "gpcps_lazy":
        return math.ceil(config.steps / config.lazy_k) * config.lazy_k
    return config.steps


def kind_result(
    kind: str,
    config: BenchConfig,
    starts: Sequence[float],
    flops: Sequence[int],
    memory_before: int | None,
    losses: dict[str, float],
) -> KindResult:
    """Turn batch start times (one more than the steps) and FLOP counts into a :class:`KindResult`."""
    first = n_flop_steps(kind, config) + config.warmup
    timed = n_timed_steps(kind, config)
    times = [starts[i + 1] - starts[i] for i in range(first, first + timed)]
    penalty_s: float | None = None
    no_penalty_s: float | None = None
    if kind == "gpcps_lazy":
        k = config.lazy_k
        windows = [statistics.fmean(times[j : j + k]) for j in range(0, timed, k)]
        median = statistics.median(windows)
        # Global step `first + i` has the penalty when it is a multiple of k.
        with_penalty = [t for i, t in enumerate(times) if (first + i) % k == 0]
        without = [t for i, t in enumerate(times) if (first + i) % k != 0]
        penalty_s = statistics.median(with_penalty)
        no_penalty_s = statistics.median(without) if without else None
        # Amortized from the fastest step of each type, comparable with the other kinds' fastest step.
        best = (min(with_penalty) + (k - 1) * min(without)) / k if without else min(with_penalty)
        step_flops = flops[0] if k == 1 else (flops[0] + (k - 1) * flops[1]) / k
    else:
        median, best = statistics.median(times), min(times)
        step_flops = float(flops[0])
    peak, measure = _memory_peak(torch.device(config.device), memory_before)
    return KindResult(
        kind=kind,
        step_times_s=times,
        median_step_s=median,
        min_step_s=best,
        images_per_s=config.batch_size / median,
        flops_per_step=float(step_flops),
        achieved_flops_per_s=float(step_flops) / median,
        peak_memory_bytes=peak,
        memory_before_steps_bytes=memory_before,
        memory_measure=measure,
        losses=losses,
        losses_finite=all(math.isfinite(v) for v in losses.values()),
        penalty_step_s=penalty_s,
        no_penalty_step_s=no_penalty_s,
    )
