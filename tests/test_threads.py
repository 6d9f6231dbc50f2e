"""The CPU thread policy (gpcps_lightning.threads)."""

from __future__ import annotations

import pytest
import torch

from gpcps_lightning.threads import apply_thread_policy, busy_cores, choose_threads


def test_threads_are_the_cores_left_by_busy_processes() -> None:
    assert choose_threads(0, cores=2, load=0.1, environ={}).threads == 2
    # one other CPU-bound process (load about 1): one thread, not two fighting for one free core
    assert choose_threads(0, cores=2, load=1.02, environ={}).threads == 1
    assert choose_threads(0, cores=8, load=2.7, environ={}).threads == 5
    # never fewer than one
    assert choose_threads(0, cores=2, load=3.0, environ={}).threads == 1
    reason = choose_threads(1, cores=8, load=2.7, environ={}).reason
    assert "8 cores" in reason and "3 kept busy" in reason and "1 data-loader workers, not given" in reason


def test_loader_workers_get_no_core_of_their_own() -> None:
    # the quickstart's one mostly idle worker cost an idle 2-core machine a thread (docs/performance.md)
    assert choose_threads(1, cores=2, load=0.0, environ={}).threads == 2
    assert choose_threads(3, cores=8, load=1.0, environ={}).threads == 7


def test_busy_cores_is_the_machines_cpu_use_in_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpcps_lightning.threads as threads

    # /proc/stat's first line summed, and its idle + iowait, before and after the interval: 100 jiffies
    # passed, 50 of them idle, on 2 CPUs -> one core busy
    readings = iter([(1000, 600), (1100, 650)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert busy_cores(0.0) == pytest.approx(1.0)
    # no /proc/stat: the load average
    monkeypatch.setattr(threads, "_cpu_times", lambda: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert busy_cores(0.0) == 1.5


def test_the_environment_overrides_the_policy() -> None:
    assert choose_threads(0, cores=2, load=1.0, environ={"GPCPS_NUM_THREADS": "2"}).threads == 2
    assert choose_threads(0, cores=8, load=0.0, environ={"OMP_NUM_THREADS": "3"}).threads == 3
    both = {"GPCPS_NUM_THREADS": "1", "OMP_NUM_THREADS": "4"}
    assert choose_threads(0, cores=8, load=0.0, environ=both).reason == "GPCPS_NUM_THREADS=1"
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="GPCPS_NUM_THREADS must be a positive integer"):
            choose_threads(0, environ={"GPCPS_NUM_THREADS": bad})


def test_apply_sets_torch_threads_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("GPCPS_NUM_THREADS", "1")
    try:
        choice = apply_thread_policy(0)
        assert choice.threads == torch.get_num_threads() == 1
        assert capsys.readouterr().out.count("PyTorch uses 1 CPU thread(s): GPCPS_NUM_THREADS=1") == 1
    finally:
        torch.set_num_threads(before)
