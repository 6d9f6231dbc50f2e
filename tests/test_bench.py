"""The benchmark (``gpcps_lightning.tools.bench``), the GPU check script's CPU-runnable parts, and the
performance-related mechanisms of the module: the lazy penalty and the non-finite flag."""

from __future__ import annotations

import json
import math
import mmap
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import RandomSemiDataModule, load_script, random_semi_batch
from torch import nn

from gpcps_lightning.batch import SemiSupervisedBatch
from gpcps_lightning.methods.gpcps import GPCPSModule
from gpcps_lightning.tools import bench
from gpcps_lightning.tools.bench import BenchConfig, count_step_flops, measure
from gpcps_lightning.tools.bench.lightning_kinds import lightning_module
from gpcps_lightning.tools.bench.plain import PlainGPCPS

TINY_ARGS = [
    "--encoder",
    "resnet18",
    "--network-kwargs",
    json.dumps({"encoder_depth": 3, "decoder_channels": [16, 8, 4]}),
    "--image-size",
    "32",
    "--batch-size",
    "2",
    "--device",
    "cpu",
]


def tiny_config(**overrides: Any) -> BenchConfig:
    args: dict[str, Any] = dict(
        encoder_name="resnet18",
        network_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
        image_size=32,
        batch_size=2,
        device="cpu",
        steps=3,
        warmup=1,
        lazy_k=2,
    )
    args.update(overrides)
    return BenchConfig(**args)


# ----------------------------------------------------------------------------------------- FLOP counting
def test_count_step_flops_conv_by_hand() -> None:
    # Conv2d(3 -> 4, 3x3, padding 1) on (2, 3, 8, 8): 2 * N * Cout * H * W * Cin * kh * kw FLOPs forward.
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    forward = 2 * 2 * 4 * 8 * 8 * 3 * 9
    assert count_step_flops(lambda: conv(x)) == forward
    # Backward to the weight only (the input does not require grad): one more convolution's worth.
    assert count_step_flops(lambda: conv(x).sum().backward()) == 2 * forward


def test_count_step_flops_follows_a_create_graph_input_gradient() -> None:
    # FlopCounterMode's own module tracker fails inside torch.autograd.grad on a leaf that a module sees;
    # the benchmark's counter must not. Forward, input gradient (create_graph), then its backward.
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    forward = 2 * 2 * 4 * 8 * 8 * 3 * 9

    def step() -> None:
        (g,) = torch.autograd.grad(torch.sigmoid(conv(x)).sum(), x, create_graph=True)
        g.abs().sum().backward(inputs=list(conv.parameters()))

    flops = count_step_flops(step)
    # forward + input gradient + (backward of the input gradient to the weight, and of the forward to the
    # weight through the sigmoid's second derivative): at least four convolutions' worth.
    assert flops >= 4 * forward
    assert flops % forward == 0


# ----------------------------------------------------------------------------------------- timing logic
def test_finish_amortizes_the_lazy_penalty_over_windows() -> None:
    config = tiny_config(steps=4, warmup=1, lazy_k=2).checked()
    # Steps 0 and 1 count FLOPs (with and without penalty), step 2 warms up, steps 3..6 are timed
    # (penalty on the even global steps 4 and 6), step 7 only closes the timing.
    durations = [9.0, 9.0, 9.0, 2.0, 3.0, 1.0, 5.0]
    starts = [sum(durations[:i]) for i in range(len(durations) + 1)]
    result = measure.kind_result(
        "gpcps_lazy", config, starts, [10, 4], memory_before=None, losses={"loss": 1.0}
    )
    assert result.step_times_s == [2.0, 3.0, 1.0, 5.0]
    assert result.median_step_s == pytest.approx((2.5 + 3.0) / 2)  # windows (2+3)/2 and (1+5)/2
    assert result.min_step_s == pytest.approx((3.0 + 1.0) / 2)  # fastest penalty and fastest other step
    assert result.penalty_step_s == pytest.approx(4.0)
    assert result.no_penalty_step_s == pytest.approx(1.5)
    assert result.flops_per_step == pytest.approx((10 + 4) / 2)
    assert result.achieved_flops_per_s == pytest.approx(7.0 / 2.75)
    assert result.images_per_s == pytest.approx(2 / 2.75)


def test_finish_plain_kind_takes_the_median_after_warmup() -> None:
    config = tiny_config(steps=3, warmup=2).checked()
    durations = [50.0, 20.0, 20.0, 2.0, 4.0, 3.0]  # step 0 counts FLOPs, steps 1-2 warm up
    starts = [sum(durations[:i]) for i in range(len(durations) + 1)]
    result = measure.kind_result("cps", config, starts, [12], memory_before=None, losses={"a": math.inf})
    assert result.step_times_s == [2.0, 4.0, 3.0]
    assert result.median_step_s == 3.0
    assert result.flops_per_step == 12.0
    assert result.losses_finite is False


# ----------------------------------------------------------------------------------------- memory
def test_finish_peak_is_never_below_the_reading_before_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux's VmHWM can lag an earlier VmRSS (memory handed back with MADV_DONTNEED does not raise the
    # high-water mark): simulate a kernel peak 356 KiB below the reading before the steps.
    config = tiny_config(steps=3, warmup=1).checked()
    starts = [float(i) for i in range(6)]  # FLOP step, warm-up, three timed steps, end
    before = 1_000_000_000
    monkeypatch.setattr(measure, "_peak_rss_bytes", lambda: before - 356 * 1024)
    result = measure.kind_result("cps", config, starts, [12], memory_before=before, losses={})
    assert result.memory_measure == "process_peak_rss"
    assert result.peak_memory_bytes == before
    assert result.memory_before_steps_bytes == before
    # A real peak above the reading is kept as it is.
    monkeypatch.setattr(measure, "_peak_rss_bytes", lambda: before + 5)
    result = measure.kind_result("cps", config, starts, [12], memory_before=before, losses={})
    assert result.peak_memory_bytes == before + 5
    # Where the platform gives no figure, none is made up.
    monkeypatch.setattr(measure, "_peak_rss_bytes", lambda: None)
    result = measure.kind_result("cps", config, starts, [12], memory_before=before, losses={})
    assert result.peak_memory_bytes is None


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or not hasattr(mmap, "MADV_DONTNEED"), reason="Linux /proc only"
)
def test_cpu_peak_holds_after_memory_is_handed_back_with_madvise() -> None:
    # The kernel path behind the load-dependent failure: resident memory given back with MADV_DONTNEED
    # lowers VmRSS without raising VmHWM, so the raw VmHWM read afterwards can be below the VmRSS read
    # before (on Linux 6.18 it was, by 100-300 KiB, every time).
    cpu = torch.device("cpu")
    size = 64 * 2**20
    region = mmap.mmap(-1, size)
    try:
        for offset in range(0, size, mmap.PAGESIZE):
            region[offset] = 1
        before = measure.memory_start(cpu)
        region.madvise(mmap.MADV_DONTNEED)
        peak, name = measure._memory_peak(cpu, before)
    finally:
        region.close()
    assert name == "process_peak_rss"
    assert before is not None and peak is not None
    assert peak >= before


# ----------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"precision": "fp8"}, "--precision"),
        ({"precision": "16"}, "--precision 16"),  # fp16 needs CUDA
        ({"image_size": 36}, "--image-size"),  # tiny net: multiple of 2**3
        ({"batch_size": 1}, "--batch-size"),
        ({"steps": 2}, "--steps"),
        ({"warmup": 0}, "--warmup"),
        ({"lazy_k": 0}, "--k"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_config_rejects_bad_values_naming_the_option(overrides: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        tiny_config(**overrides).checked()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_config_rejects_cuda_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        tiny_config(device="cuda").checked()


def test_config_normalises_lightning_precision_names() -> None:
    assert tiny_config(precision="bf16-mixed").checked().precision == "bf16"
    assert tiny_config(precision="32-true").checked().precision == "32"


def test_main_returns_2_on_a_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*TINY_ARGS, "--kinds", "cps,nonsense"]) == 2
    assert "--kinds" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_benchmark_all_kinds_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = [*TINY_ARGS, "--steps", "3", "--warmup", "1", "--k", "2", "--isolate", "no", "--quiet"]
    argv += ["--json", str(out)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    for kind in bench.STEP_KINDS:
        assert kind in table
    assert "penalty overhead" in table
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert list(summary) == list(bench.STEP_KINDS)
    (results,) = report["rounds"]
    for kind, r in results.items():
        assert len(r["step_times_s"]) == (4 if kind == "gpcps_lazy" else 3)
        assert all(t > 0 for t in r["step_times_s"])
        assert r["losses_finite"] and r["losses"]
        assert r["memory_measure"] == "process_peak_rss"
        assert r["peak_memory_bytes"] >= r["memory_before_steps_bytes"] > 0
    flops = {kind: s["flops_per_step"] for kind, s in summary.items()}
    # The plain loop computes the same GP-CPS step as the Lightning module: the same FLOPs exactly.
    assert flops["plain"] == flops["gpcps"]
    assert flops["supervised"] < flops["cps"] < flops["gpcps"]
    # The lazy step amortizes one penalty step and k - 1 CPS steps.
    assert flops["gpcps_lazy"] == pytest.approx((flops["gpcps"] + flops["cps"]) / 2)
    # L_semi doubles the forward passes: the CPS step has exactly twice the supervised FLOPs.
    assert flops["cps"] == 2 * flops["supervised"]
    ratios = report["ratios"]
    assert ratios["gpcps_over_cps"]["median"] == pytest.approx(
        results["gpcps"]["median_step_s"] / results["cps"]["median_step_s"]
    )
    assert set(ratios) == {
        "gpcps_over_cps",
        "gpcps_lazy_over_cps",
        "gpcps_over_plain",
        "cps_over_supervised",
        "gpcps_over_cps_flops",
    }
    assert report["config"]["precision"] == "32"
    assert report["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_python_m_runs_the_command_line() -> None:
    # The package runs through its __main__.
    cmd = [sys.executable, "-m", "gpcps_lightning.tools.bench", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: gpcps bench")


def test_worker_imports_this_copy_of_the_package() -> None:
    from gpcps_lightning.tools.bench.runner import _package_root

    # The worker process gets this folder first on its PYTHONPATH, so that it runs this very copy.
    assert (
        Path(_package_root(), "gpcps_lightning", "__init__.py").resolve()
        == Path(bench.__file__).resolve().parents[2] / "__init__.py"
    )


@pytest.mark.slow
def test_benchmark_isolated_worker_subprocess() -> None:
    # On the CPU each kind runs in a fresh process so that peak RSS is its own.
    report = bench.run_benchmark(tiny_config(), ["supervised"], isolate=True)
    (result,) = report.rounds[0].values()
    assert result.kind == "supervised"
    assert len(result.step_times_s) == 3
    assert result.flops_per_step > 0
    assert result.losses_finite


def test_plain_loop_matches_the_module_losses() -> None:
    # Same seeds, same batch with a given fusion: the plain loop's first step has the module's losses.
    config = tiny_config().checked()
    (batch,) = bench.make_batches(config, count=1)
    torch.manual_seed(5)
    loop = PlainGPCPS(config)
    torch.manual_seed(5)
    plain = loop.step(batch)
    module = lightning_module("gpcps", config)
    torch.manual_seed(5)
    expected = module.compute_losses(batch, 0)
    assert plain["loss_sup"] == pytest.approx(float(expected.sup.detach()), rel=1e-5)
    assert plain["loss_semi"] == pytest.approx(float(expected.semi.detach()), rel=1e-5)
    assert plain["loss_grad"] == pytest.approx(float(expected.penalty.detach()), rel=1e-4)
    assert plain["loss"] == pytest.approx(float(expected.total.detach()), rel=1e-5)


def test_plain_loop_with_fused_adam_takes_the_same_step() -> None:
    # --plain-fused-adam changes the implementation, not the update.
    (batch,) = bench.make_batches(tiny_config().checked(), count=1)
    weights = []
    for fused in (False, True):
        loop = PlainGPCPS(tiny_config(plain_fused_adam=fused).checked())
        assert bool(loop.opt1.defaults["fused"]) is fused
        torch.manual_seed(5)
        loop.step(batch)
        weights.append(torch.cat([p.detach().flatten() for p in loop.net1.parameters()]))
    assert not torch.equal(
        weights[0], torch.cat([p.flatten() for p in PlainGPCPS(tiny_config()).net1.parameters()])
    )
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_profile_writes_tables_and_phases(tmp_path: Path) -> None:
    phases = bench.profile_step(tiny_config(steps=3, warmup=1), tmp_path, kind="gpcps", steps=1)
    assert set(phases) == {"cps", "gpcps"}
    assert set(phases["gpcps"]) == {
        "forward",
        "input_gradient",
        "losses",
        "final_backward",
        "optimizer",
        "step",
    }
    assert "input_gradient" not in phases["cps"]
    assert "convolution" in (tmp_path / "gpcps_ops.txt").read_text()
    assert (tmp_path / "gpcps_trace.json").stat().st_size > 0
    assert json.loads((tmp_path / "phases.json").read_text())["phases_s"]["gpcps"]["step"] > 0


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    gpu_check = load_script("gpu_check")
    argv = [
        "--out",
        str(tmp_path),
        *TINY_ARGS,
        "--precisions",
        "32",
        "bf16",
        "--kinds",
        "cps,gpcps",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--matmul-size",
        "128",
        "--isolate",
        "no",
        "--no-profile",
    ]
    assert gpu_check.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is True
    assert summary["checks"] == {
        "finite_losses/bench_32/cps": True,
        "finite_losses/bench_32/gpcps": True,
        "finite_losses/bench_bf16/cps": True,
        "finite_losses/bench_bf16/gpcps": True,
        "finite_losses/bench_bf16_channels_last/cps": True,
        "finite_losses/bench_bf16_channels_last/gpcps": True,
        "gpcps_peak_memory_le_20GB/bench_bf16": True,
        "fp16_penalty_gradient_matches_fp32": True,
    }
    fp16 = json.loads((tmp_path / "fp16_penalty.json").read_text())
    assert fp16["finite"] and fp16["cosine"] > 0.99 and fp16["fp32_norm"] > 0
    assert summary["matmul"]["bf16_flops_per_s"] > 0
    fraction = summary["figures"]["bench_bf16/gpcps"]["fraction_of_bf16_matmul_rate"]
    assert fraction > 0
    for name in ("matmul", "bench_32", "bench_bf16", "bench_bf16_channels_last"):
        assert (tmp_path / f"{name}.json").exists()
    assert (
        json.loads((tmp_path / "bench_bf16_channels_last.json").read_text())["config"]["channels_last"]
        is True
    )
    assert summary["figures"]["bench_bf16/gpcps/projected_5000_steps_s"] > 0


def test_gpu_check_peak_memory_check_fails_over_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_check = load_script("gpu_check")
    monkeypatch.setattr(gpu_check, "MEMORY_LIMIT_BYTES", 1)  # nothing fits in one byte
    argv = ["--out", str(tmp_path), *TINY_ARGS, "--precisions", "bf16", "--kinds", "gpcps", "--steps", "3"]
    argv += ["--warmup", "1", "--matmul-size", "64", "--isolate", "no", "--no-profile", "--no-channels-last"]
    assert gpu_check.main(argv) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checks"]["gpcps_peak_memory_le_20GB/bench_bf16"] is False


# ----------------------------------------------------------------------------------------- lazy penalty
def _fixed_fusion_batch(seed: int = 0) -> SemiSupervisedBatch:
    b = random_semi_batch(n=2, size=32, seed=seed)
    eps = torch.tensor([0.3, 0.8]).reshape(2, 1, 1, 1)
    fused = eps * b.labeled + (1 - eps) * b.unlabeled
    return SemiSupervisedBatch(labeled=b.labeled, mask=b.mask, unlabeled=b.unlabeled, fused=fused, eps=eps)


def _grads(module: GPCPSModule, total: torch.Tensor) -> list[torch.Tensor]:
    params = list(module.parameters())
    return list(torch.autograd.grad(total, params, allow_unused=True))


def test_lazy_penalty_is_due_every_k_steps_with_weight_k(tiny_net: dict[str, Any]) -> None:
    batch = _fixed_fusion_batch()
    lazy = GPCPSModule(lambda_grad=1e-3, gp_every_n_steps=4, **tiny_net)
    exact_k = GPCPSModule(lambda_grad=4e-3, gp_every_n_steps=1, **tiny_net)  # same seeds: same networks
    no_penalty = GPCPSModule(lambda_grad=0.0, **tiny_net)
    assert [lazy.penalty_due(s) for s in range(9)] == [True, False, False, False] * 2 + [True]
    for step in (0, 4):
        got = lazy.compute_losses(batch, step)
        want = exact_k.compute_losses(batch, step)
        assert got.penalty.item() > 0
        assert got.total.item() == pytest.approx(want.total.item(), rel=1e-6)
        assert got.total.item() == pytest.approx((got.sup + got.semi + 4e-3 * got.penalty).item(), rel=1e-6)
        for a, b in zip(_grads(lazy, got.total), _grads(exact_k, want.total), strict=True):
            torch.testing.assert_close(a, b)
    for step in (1, 2, 3, 5):
        got = lazy.compute_losses(batch, step)
        want = no_penalty.compute_losses(batch, step)
        assert got.penalty.item() == 0.0
        assert got.total.item() == pytest.approx(want.total.item(), rel=1e-6)
        for a, b in zip(_grads(lazy, got.total), _grads(no_penalty, want.total), strict=True):
            torch.testing.assert_close(a, b)


def test_lazy_penalty_follows_the_trainer_step(tiny_net: dict[str, Any], tiny_trainer: Any) -> None:
    # The schedule is keyed to global_step, which must advance by one per training step (one optimizer).
    seen: list[tuple[int, bool]] = []

    class Spy(GPCPSModule):
        def compute_losses(self, batch: SemiSupervisedBatch, step: int = 0) -> Any:
            losses = super().compute_losses(batch, step)
            seen.append((step, bool(losses.penalty != 0)))
            return losses

    trainer: L.Trainer = tiny_trainer(max_steps=5)
    trainer.fit(Spy(gp_every_n_steps=2, **tiny_net), datamodule=RandomSemiDataModule(size=32, length=10))
    assert seen == [(0, True), (1, False), (2, True), (3, False), (4, True)]


# ----------------------------------------------------------------------------------------- non-finite flag
class _Manual:
    """Stands in for the Trainer-held optimizer in ``optimization_step``."""

    def __init__(self, module: GPCPSModule) -> None:
        self.opt = torch.optim.SGD(module.parameters(), lr=0.0)
        self.grads: list[torch.Tensor] = []
        module.optimizers = lambda: self.opt  # type: ignore[method-assign]
        module.manual_backward = lambda loss: loss.backward()  # type: ignore[method-assign]
        self.opt.step = self._record  # type: ignore[method-assign]
        self.module = module

    def _record(self, *args: Any, **kwargs: Any) -> None:
        self.grads = [p.grad.clone() for p in self.module.parameters() if p.grad is not None]


@pytest.mark.parametrize(("flag", "nan"), [(0.0, False), (math.nan, True)])
def test_nonfinite_flag_reaches_every_gradient(tiny_net: dict[str, Any], flag: float, nan: bool) -> None:
    module = GPCPSModule(**tiny_net)
    batch = _fixed_fusion_batch()
    reference = _grads(module, module.compute_losses(batch, 0).total)
    spy = _Manual(module)
    # the flag is the fp16 path's: it is added to the gradients when a gradient scaler is active
    module.active_grad_scaler = lambda: torch.amp.GradScaler("cpu")  # type: ignore[method-assign]
    module.optimization_step({"loss": module.compute_losses(batch, 0).total}, torch.tensor(flag))
    assert len(spy.grads) == len([g for g in reference if g is not None])
    for got, want in zip(spy.grads, [g for g in reference if g is not None], strict=True):
        if nan:
            assert torch.isnan(got).all()
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_other_methods_are_benchmarked_on_request() -> None:
    kinds = ["supervised", "cps", *bench.METHOD_KINDS]
    report = bench.run_benchmark(tiny_config(), kinds, isolate=False)
    assert list(report.summary) == kinds
    for kind in bench.METHOD_KINDS:
        assert report.summary[kind]["losses_finite"], kind
        assert report.summary[kind]["flops_per_step"] > report.summary["supervised"]["flops_per_step"], kind
        assert report.ratios[f"{kind}_over_supervised"]["median"] > 0
        assert f"{kind}_over_cps" in report.ratios
        assert f"{kind} / supervised step" in bench.format_report(report)
    # The default set is unchanged: the other methods run only when asked for.
    assert bench.STEP_KINDS == ("supervised", "cps", "gpcps", "gpcps_lazy", "plain")
