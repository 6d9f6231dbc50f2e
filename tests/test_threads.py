"""The CPU thread policy (gpcps_lightning.threads)."""

from __future__ import annotations

import time

import pytest
import torch

from gpcps_lightning.threads import (
    apply_thread_policy,
    busy_cores,
    child_cpu_seconds,
    choose_threads,
    threads_after_workers,
)


def test_threads_are_the_cores_left_by_busy_processes() -> None:
    assert choose_threads(0, cores=2, load=0.1, environ={}).threads == 2
    # one other CPU-bound process (load about 1): one thread, not two fighting for one free core
    assert choose_threads(0, cores=2, load=1.02, environ={}).threads == 1
    assert choose_threads(0, cores=8, load=2.7, environ={}).threads == 5
    # never fewer than one
    assert choose_threads(0, cores=2, load=3.0, environ={}).threads == 1
    reason = choose_threads(1, cores=8, load=2.7, environ={}).reason
    assert "8 cores" in reason and "3 kept busy" in reason and "1 data-loader workers, counted by" in reason


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


def test_threads_after_workers_takes_whole_cores_and_leaves_one() -> None:
    assert threads_after_workers(2, 0.01) == 2  # the quickstart's worker (docs/performance.md)
    assert threads_after_workers(2, 0.4) == 2
    assert threads_after_workers(4, 1.6) == 2
    assert threads_after_workers(2, 3.0) == 1


def test_child_cpu_seconds_counts_running_and_finished_children() -> None:
    import subprocess
    import sys

    before = child_cpu_seconds()
    assert before is not None
    # a child that burns a fixed amount of CPU work, then is waited for: its time moves to ours
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    after = child_cpu_seconds()
    assert after is not None and after - before > 0.05
    running = subprocess.Popen([sys.executable, "-c", "sum(i * i for i in range(30_000_000))"])
    try:
        time.sleep(0.5)
        during = child_cpu_seconds()
        assert during is not None and during - after > 0.05  # counted while it runs, not yet waited for
    finally:
        running.kill()
        running.wait()
    assert child_cpu_seconds(pid=2**22 + 12345) is None  # no such process


def test_loader_worker_threads_lowers_the_threads_once_by_the_workers_use(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from gpcps_lightning.callbacks import LoaderWorkerThreads

    monkeypatch.delenv("GPCPS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    readings = {"cpu": 100.0, "clock": 50.0}
    callback = LoaderWorkerThreads(
        start_step=2, window_steps=3, reader=lambda: readings["cpu"], clock=lambda: readings["clock"]
    )
    trainer = SimpleNamespace(global_step=0)
    try:
        torch.set_num_threads(4)
        callback.on_train_start(trainer, None)  # type: ignore[arg-type]
        for step in range(1, 5):
            trainer.global_step = step
            callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 4  # still measuring: steps 2 to 5
        readings.update(cpu=116.0, clock=60.0)  # 16 CPU seconds in 10 s: 1.6 cores
        trainer.global_step = 5
        callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert callback.worker_cores == pytest.approx(1.6) and torch.get_num_threads() == 2
        assert "workers used 1.6 cores over steps 2-5: PyTorch now uses 2 CPU thread(s) instead of 4" in (
            capsys.readouterr().out
        )
        readings.update(cpu=1000.0, clock=61.0)
        trainer.global_step = 9
        callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 2  # once only
        # an environment override: nothing is measured or changed
        monkeypatch.setenv("GPCPS_NUM_THREADS", "4")
        torch.set_num_threads(4)
        pinned = LoaderWorkerThreads(start_step=0, window_steps=1, reader=lambda: 1 / 0, clock=lambda: 0.0)
        pinned.on_train_start(trainer, None)  # type: ignore[arg-type]
        pinned.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 4 and pinned.worker_cores is None
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="`start_step` must be >= 0 and `window_steps` >= 1"):
        LoaderWorkerThreads(window_steps=0)
