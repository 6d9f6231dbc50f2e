"""The report: per-kind summary over rounds, the ratios between kinds, and the text table.

Ratios to the ``cps`` step (the penalty's overhead) and of ``gpcps`` to ``plain`` (Lightning's overhead) are
taken within each round, and their median over rounds is reported, together with the ratio of the fastest
steps (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpcps_lightning.tools.bench.config import METHOD_KINDS, BenchConfig
from gpcps_lightning.tools.bench.measure import KindResult

__all__ = ["BenchReport", "format_report"]


@dataclass
class BenchReport:
    """A benchmark run: configuration, environment, per-round results, summary and ratios."""

    config: dict[str, Any]
    environment: dict[str, Any]
    command: str
    rounds: list[dict[str, KindResult]]
    summary: dict[str, dict[str, Any]]
    ratios: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return dataclasses.asdict(self)


def _ratio(rounds: list[dict[str, KindResult]], num: str, den: str) -> dict[str, Any] | None:
    pairs = [(r[num], r[den]) for r in rounds if num in r and den in r]
    if not pairs:
        return None
    per_round = [a.median_step_s / b.median_step_s for a, b in pairs]
    # The fastest steps are the least disturbed by other load on the machine: a second estimate.
    of_min = min(a.min_step_s for a, _ in pairs) / min(b.min_step_s for _, b in pairs)
    return {"median": statistics.median(per_round), "per_round": per_round, "of_min_steps": of_min}


def make_report(
    config: BenchConfig,
    kinds: Sequence[str],
    all_rounds: list[dict[str, KindResult]],
    environment: dict[str, Any],
    command: str,
) -> BenchReport:
    """Summarise the rounds of :func:`~gpcps_lightning.tools.bench.run_benchmark` into a report."""
    summary: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        runs = [r[kind] for r in all_rounds]
        median = statistics.median(x.median_step_s for x in runs)
        peaks = [x.peak_memory_bytes for x in runs if x.peak_memory_bytes is not None]
        summary[kind] = {
            "median_step_s": median,
            "min_step_s": min(x.min_step_s for x in runs),
            "images_per_s": config.batch_size / median,
            "flops_per_step": runs[0].flops_per_step,
            "achieved_flops_per_s": runs[0].flops_per_step / median,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "memory_before_steps_bytes": runs[0].memory_before_steps_bytes,
            "memory_measure": runs[0].memory_measure,
            "losses_finite": all(x.losses_finite for x in runs),
        }
        if kind == "gpcps_lazy":
            summary[kind]["penalty_step_s"] = statistics.median(x.penalty_step_s or math.nan for x in runs)
            no_penalty = [x.no_penalty_step_s for x in runs if x.no_penalty_step_s is not None]
            summary[kind]["no_penalty_step_s"] = statistics.median(no_penalty) if no_penalty else None
    ratios = {
        name: value
        for name, value in {
            "gpcps_over_cps": _ratio(all_rounds, "gpcps", "cps"),
            "gpcps_lazy_over_cps": _ratio(all_rounds, "gpcps_lazy", "cps"),
            "gpcps_over_plain": _ratio(all_rounds, "gpcps", "plain"),
            "cps_over_supervised": _ratio(all_rounds, "cps", "supervised"),
            **{f"{m}_over_supervised": _ratio(all_rounds, m, "supervised") for m in METHOD_KINDS},
            **{f"{m}_over_cps": _ratio(all_rounds, m, "cps") for m in METHOD_KINDS},
        }.items()
        if value is not None
    }
    if "gpcps" in summary and "cps" in summary:
        ratios["gpcps_over_cps_flops"] = {
            "median": summary["gpcps"]["flops_per_step"] / summary["cps"]["flops_per_step"]
        }
    return BenchReport(
        config=dataclasses.asdict(config),
        environment=environment,
        command=command,
        rounds=all_rounds,
        summary=summary,
        ratios=ratios,
    )


def format_report(report: BenchReport) -> str:
    """The report as a readable text table with the ratios below it."""
    c = report.config
    env = report.environment
    lines = [
        f"{c['arch']}/{c['encoder_name']} {c['image_size']}px batch {c['batch_size']} "
        f"precision {c['precision']} on {c['device']} ({env['device']}, {env['torch_threads']} threads), "
        f"{c['steps']} timed steps after {c['warmup']} warm-up, k={c['lazy_k']}, "
        f"rounds={len(report.rounds)}, channels_last={c['channels_last']}, commit {env['commit']}",
    ]
    header = (
        f"{'kind':<12} {'median ms':>10} {'min ms':>9} {'img/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} "
        f"{'peak MiB':>9} {'before MiB':>10}"
    )
    lines += [header, "-" * len(header)]
    for kind, s in report.summary.items():
        peak, before = (
            "n/a" if b is None else f"{b / 2**20:.0f}"
            for b in (s["peak_memory_bytes"], s["memory_before_steps_bytes"])
        )
        lines.append(
            f"{kind:<12} {1e3 * s['median_step_s']:>10.1f} {1e3 * s['min_step_s']:>9.1f} "
            f"{s['images_per_s']:>8.2f} {s['flops_per_step'] / 1e9:>11.2f} "
            f"{s['achieved_flops_per_s'] / 1e9:>9.1f} {peak:>9} {before:>10}"
        )
    first = next(iter(report.summary.values()))
    lines.append(f"(peak memory: {first['memory_measure']}; before: the same just before the first step)")
    lazy = report.summary.get("gpcps_lazy")
    if lazy is not None:
        no_pen = lazy.get("no_penalty_step_s")
        other = "" if no_pen is None else f", other steps {1e3 * no_pen:.1f} ms"
        lines.append(
            f"gpcps_lazy: amortized over k={c['lazy_k']} steps; "
            f"penalty step {1e3 * lazy['penalty_step_s']:.1f} ms{other}"
        )
    labels = {
        "gpcps_over_cps": "penalty overhead, gpcps / cps step",
        "gpcps_lazy_over_cps": "lazy penalty, gpcps_lazy / cps step",
        "gpcps_over_plain": "Lightning overhead, gpcps / plain step",
        "cps_over_supervised": "cps / supervised step",
        "gpcps_over_cps_flops": "FLOP ratio gpcps / cps",
        **{f"{m}_over_supervised": f"{m} / supervised step" for m in METHOD_KINDS},
        **{f"{m}_over_cps": f"{m} / cps step" for m in METHOD_KINDS},
    }
    for name, value in report.ratios.items():
        per_round = value.get("per_round")
        detail = (
            ""
            if per_round is None or len(per_round) < 2
            else " (rounds: " + ", ".join(f"{x:.3f}" for x in per_round) + ")"
        )
        of_min = "" if "of_min_steps" not in value else f", of the fastest steps {value['of_min_steps']:.3f}"
        lines.append(f"{labels[name]:<40} {value['median']:.3f}{of_min}{detail}")
    bad = [k for k, s in report.summary.items() if not s["losses_finite"]]
    if bad:
        lines.append(f"WARNING: non-finite losses in {', '.join(bad)}")
    return "\n".join(lines)
