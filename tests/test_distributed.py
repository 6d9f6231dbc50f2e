"""GP-CPS under DDP: two CPU processes (gloo) against a one-process reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpcps_lightning import GPCPSModule, SemiSupervisedBatch
from gpcps_lightning.distributed import GradientSyncBatchNorm, GradientSyncBatchNorm2d
from gpcps_lightning.losses import (
    background_mask,
    fused_pseudo_labels,
    gradient_penalty,
    input_gradient,
    soft_dice_loss,
)

WORKER = Path(__file__).parent / "scripts" / "ddp_gradients.py"
sys.path.insert(0, str(WORKER.parent))
from ddp_gradients import TINY_NET  # noqa: E402


def _run_worker(out: Path, *flags: str, script: Path = WORKER) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, str(script), *flags, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _load(out: Path, name: str) -> dict:
    return torch.load(out / name, weights_only=False)


def _assert_grads_close(reference: GPCPSModule, grads: dict[str, torch.Tensor]) -> None:
    compared = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            continue
        scale = p.grad.abs().max().clamp(min=1e-12)
        assert (p.grad - grads[name]).abs().max() / scale < 1e-4, name
        compared += 1
    assert compared > 20


@pytest.mark.slow
def test_ddp_gradients_equal_the_mean_of_per_rank_losses(tmp_path: Path) -> None:
    _run_worker(tmp_path)
    batches = [_load(tmp_path, f"batch_rank{r}.pt") for r in range(2)]
    assert not torch.equal(batches[0].labeled, batches[1].labeled)  # each rank saw distinct samples
    g0, g1 = _load(tmp_path, "grads_rank0.pt"), _load(tmp_path, "grads_rank1.pt")
    assert g0.keys() == g1.keys()
    assert all(torch.equal(g0[k], g1[k]) for k in g0)  # all-reduced: the same on both ranks

    reference = GPCPSModule(**TINY_NET)
    reference.load_state_dict(_load(tmp_path, "init.pt"))
    loss = sum(reference.compute_losses(b).total for b in batches) / 2
    loss.backward()
    _assert_grads_close(reference, g0)

    final0, final1 = _load(tmp_path, "final_rank0.pt"), _load(tmp_path, "final_rank1.pt")
    for key in final0:
        if "running_" in key or "num_batches_tracked" in key:
            continue  # per-rank batch statistics; DDP broadcasts rank 0's at each forward
        assert torch.equal(final0[key], final1[key]), key


def _reference_loss_with_global_batch_statistics(module: GPCPSModule, batches: list[SemiSupervisedBatch]):
    """Each rank's loss, with batch norm over the union of the ranks' batches, averaged over ranks."""
    n = batches[0].batch_size
    labeled = torch.cat([b.labeled for b in batches])
    fused = torch.cat([b.fused for b in batches]).requires_grad_(True)  # type: ignore[misc]
    p1_l, p2_l = torch.sigmoid(module.net1(labeled)), torch.sigmoid(module.net2(labeled))
    p1_f, p2_f = torch.sigmoid(module.net1(fused)), torch.sigmoid(module.net2(fused))
    grad = input_gradient(p1_f.sum() + p2_f.sum(), fused)
    totals = []
    for r, b in enumerate(batches):
        s = slice(r * n, (r + 1) * n)
        sup = soft_dice_loss(p1_l[s], b.mask) + soft_dice_loss(p2_l[s], b.mask)
        semi = soft_dice_loss(p1_f[s], fused_pseudo_labels(b.mask, p2_f[s], b.eps)) + soft_dice_loss(
            p2_f[s], fused_pseudo_labels(b.mask, p1_f[s], b.eps)
        )
        penalty = gradient_penalty(grad[s], background_mask(b.mask, p1_f[s], p2_f[s]))
        totals.append(sup + module.lambda_grad * penalty + module.lambda_semi * semi)
    return sum(totals) / len(totals)


@pytest.mark.slow
def test_ddp_with_gradient_sync_batchnorm_matches_global_batch_statistics(tmp_path: Path) -> None:
    _run_worker(tmp_path, "--sync-batchnorm")
    batches = [_load(tmp_path, f"batch_rank{r}.pt") for r in range(2)]
    g0, g1 = _load(tmp_path, "grads_rank0.pt"), _load(tmp_path, "grads_rank1.pt")
    assert all(torch.equal(g0[k], g1[k]) for k in g0)

    reference = GPCPSModule(**TINY_NET)
    reference.load_state_dict(_load(tmp_path, "init.pt"))
    _reference_loss_with_global_batch_statistics(reference, batches).backward()
    _assert_grads_close(reference, g0)

    final0, final1 = _load(tmp_path, "final_rank0.pt"), _load(tmp_path, "final_rank1.pt")
    for key in final0:  # synchronised statistics: everything, running statistics too, is identical
        torch.testing.assert_close(final0[key], final1[key], rtol=1e-6, atol=1e-7, msg=key)


def test_gradient_sync_batchnorm_is_batchnorm_in_one_process() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(3)
    synced = torch.nn.BatchNorm2d(3)
    synced.load_state_dict(plain.state_dict())
    GradientSyncBatchNorm().apply(torch.nn.Sequential(synced))
    assert type(synced) is GradientSyncBatchNorm2d
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)
    GradientSyncBatchNorm().revert(torch.nn.Sequential(synced))
    assert type(synced) is torch.nn.BatchNorm2d


def test_gradient_sync_batchnorm_refuses_other_norm_layers() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\)"):
        GradientSyncBatchNorm().apply(model)


@pytest.mark.slow
def test_ddp_ranks_draw_distinct_training_samples_and_every_validation_image_once(tmp_path: Path) -> None:
    _run_worker(tmp_path, str(tmp_path / "data"), script=WORKER.parent / "ddp_data.py")
    ranks = [_load(tmp_path, f"sampler_rank{r}.pt") for r in range(2)]
    for r, info in enumerate(ranks):
        assert info["sampler_class"] == "SemiSupervisedPairSampler"  # not re-wrapped by Lightning
        assert (info["num_replicas"], info["rank"]) == (2, r)
    # 30 generated images: 24 train = 6 labeled + 18 unlabeled; batch 2 per rank on 2 ranks
    assert ranks[0]["num_train_batches"] == ranks[1]["num_train_batches"] == 6  # ceil(24 / (2 * 2))
    # Interleave the ranks' draws back into the global stream (step s of rank r holds positions
    # (2 s + r) * 2 and the next one): within one pass over a set no image is drawn twice, so the ranks
    # drew distinct samples, and together they cover the set.
    stream = [None] * 24
    for r, info in enumerate(ranks):
        for i, pair in enumerate(info["pairs_epoch0"]):
            step, j = divmod(i, 2)
            stream[(2 * step + r) * 2 + j] = pair
    assert sorted(u for _, u in stream[:18]) == list(range(18))  # 18 unlabeled images
    assert sorted(lab for lab, _ in stream[:6]) == list(range(6))  # 6 labeled images
    assert sorted(lab for lab, _ in stream[6:12]) == list(range(6))  # reshuffled next cycle
    # Fusion weights come from the data seed and the samples' positions: the ranks' differ.
    eps = [_load(tmp_path, f"eps_rank{r}.pt") for r in range(2)]
    assert eps[0].shape == eps[1].shape == (2, 1, 1, 1) and not torch.equal(eps[0], eps[1])
    for info in ranks:
        assert info["val_sampler_class"] == "UnrepeatedDistributedSampler"
    seen = sorted(ranks[0]["val_indices"] + ranks[1]["val_indices"])
    assert seen == list(range(ranks[0]["num_val_images"]))  # each validation image exactly once


def test_torch_sync_batchnorm_with_the_penalty_is_refused() -> None:
    module = GPCPSModule(**TINY_NET)
    module.net1 = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module.net1)  # as sync_batchnorm=True
    with pytest.raises(ValueError, match=r"Use the plugin gpcps_lightning\.distributed\.GradientSync"):
        module.on_fit_start()
    without_penalty = GPCPSModule(**TINY_NET, lambda_grad=0.0)
    without_penalty.net1 = torch.nn.SyncBatchNorm.convert_sync_batchnorm(without_penalty.net1)
    without_penalty.on_fit_start()  # allowed: no second-order gradient
