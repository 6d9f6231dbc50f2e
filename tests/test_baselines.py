"""Baselines: their losses on hand-worked tensors, the EMA teacher, and short Trainer runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from gpcps_lightning import CPSModule, GPCPSModule, MeanTeacherModule, SupervisedModule
from gpcps_lightning.losses import (
    add_gaussian_noise,
    consistency_loss,
    cps_loss,
    ema_decay_at,
    ema_update,
    hard_pseudo_labels,
    sigmoid_rampup,
    soft_dice_loss,
)
from tests.conftest import TINY_NET, RandomSemiDataModule, random_semi_batch

LN2, LN3 = math.log(2.0), math.log(3.0)


def _map(rows: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, 2, 2).requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------- CPS loss
def test_hard_pseudo_labels_threshold_and_detached() -> None:
    logits = _map([[0.0, LN3], [-LN3, -1e-3]], requires_grad=True)
    y = hard_pseudo_labels(logits)
    # sigmoid(0) = 0.5 >= 0.5 is foreground, as in the evaluation's binarisation.
    assert torch.equal(y, _map([[1.0, 1.0], [0.0, 0.0]]))
    assert y.dtype == torch.float32 and not y.requires_grad
    # threshold 0.75 = sigmoid(ln 3): only the ln 3 pixel reaches it.
    assert torch.equal(hard_pseudo_labels(logits, 0.75), _map([[0.0, 1.0], [0.0, 0.0]]))


def test_cps_loss_hand_worked() -> None:
    # a = [[0, ln3], [-ln3, 0]] -> Y_a = [[1, 1], [0, 1]];
    # b = [[ln3, -ln3], [-ln3, ln3]] -> Y_b = [[1, 0], [0, 1]].
    # BCE(z, y) = log(1 + e^z) - y z: softplus(0) = ln2, softplus(ln3) = ln4, softplus(-ln3) = ln(4/3).
    # BCE(a, Y_b): ln2 + ln4 + ln(4/3) + ln2 = 6 ln2 - ln3, mean (6 ln2 - ln3) / 4.
    # BCE(b, Y_a): (ln4 - ln3) + (ln(4/3) + ln3) + ln(4/3) + (ln4 - ln3) = 8 ln2 - 3 ln3, mean / 4.
    a = _map([[0.0, LN3], [-LN3, 0.0]])
    b = _map([[LN3, -LN3], [-LN3, LN3]])
    expected = (6 * LN2 - LN3) / 4 + (8 * LN2 - 3 * LN3) / 4
    torch.testing.assert_close(cps_loss(a, b), torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # symmetric in its two arguments
    torch.testing.assert_close(cps_loss(b, a), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_cps_pseudo_labels_carry_no_gradient() -> None:
    a = _map([[0.0, LN3], [-LN3, 0.0]], requires_grad=True)
    b = _map([[LN3, -LN3], [-LN3, LN3]], requires_grad=True)
    cps_loss(a, b).backward()
    # Only each network's own BCE term reaches its logits: d/dz mean BCE(z, y) = (sigmoid(z) - y) / 4.
    y_a, y_b = _map([[1.0, 1.0], [0.0, 1.0]]), _map([[1.0, 0.0], [0.0, 1.0]])
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, (torch.sigmoid(a.detach()) - y_b) / 4)
    torch.testing.assert_close(b.grad, (torch.sigmoid(b.detach()) - y_a) / 4)


def test_cps_loss_bf16_inputs_computed_in_float32() -> None:
    a = _map([[0.0, LN3], [-LN3, 0.0]]).bfloat16()
    b = _map([[LN3, -LN3], [-LN3, LN3]]).bfloat16()
    out = cps_loss(a, b)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3), {}, "same shape"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), {}, r"\(N, 1, H, W\)"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), {"threshold": 1.0}, "threshold"),
    ],
)
def test_cps_loss_errors(a: torch.Tensor, b: torch.Tensor, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cps_loss(a, b, **kwargs)


# ------------------------------------------------------------------------------ Mean Teacher loss
def test_consistency_loss_hand_worked_and_teacher_detached() -> None:
    s = _map([[0.5, 1.0], [0.0, 0.25]], requires_grad=True)
    t = _map([[0.5, 0.5], [0.5, 0.75]], requires_grad=True)
    out = consistency_loss(s, t)
    # differences 0, 0.5, -0.5, -0.5 -> squares 0, 0.25, 0.25, 0.25 -> mean 0.1875
    torch.testing.assert_close(out, torch.tensor(0.1875))
    out.backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, _map([[0.0, 0.25], [-0.25, -0.25]]))  # 2 (s - t) / 4
    assert t.grad is None


def test_consistency_loss_shape_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(torch.zeros(1, 1, 2, 2), torch.zeros(2, 1, 2, 2))


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 4) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(2, 4) == pytest.approx(math.exp(-1.25))  # phase 1/2 -> exp(-5/4)
    assert sigmoid_rampup(3, 4) == pytest.approx(math.exp(-5.0 / 16))
    assert sigmoid_rampup(4, 4) == 1.0
    assert sigmoid_rampup(100, 4) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    with pytest.raises(ValueError, match="step"):
        sigmoid_rampup(-1, 4)
    with pytest.raises(ValueError, match="rampup_steps"):
        sigmoid_rampup(0, -4)


def test_ema_decay_schedule() -> None:
    assert ema_decay_at(0, 0.99, 10) == 0.99
    assert ema_decay_at(50, 0.99, 10) == 0.99  # no after-ramp-up decay: constant
    assert ema_decay_at(9, 0.99, 10, 0.999) == 0.99
    assert ema_decay_at(10, 0.99, 10, 0.999) == 0.999
    with pytest.raises(ValueError, match="step"):
        ema_decay_at(-1, 0.99, 10)


def test_ema_update_exact_on_parameters_only() -> None:
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([1.0, 2.0]))
        teacher.bias.copy_(torch.tensor([0.0, -4.0]))
        student.weight.copy_(torch.tensor([3.0, 2.0]))
        student.bias.copy_(torch.tensor([4.0, 4.0]))
        student.running_mean.fill_(7.0)
    ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher.weight.detach(), torch.tensor([1.5, 2.0]))  # 0.75*1 + 0.25*3
    torch.testing.assert_close(teacher.bias.detach(), torch.tensor([1.0, -2.0]))  # 0.75*0 + 0.25*4
    assert torch.equal(teacher.running_mean, torch.zeros(2))  # buffers are not averaged
    assert torch.equal(student.weight.detach(), torch.tensor([3.0, 2.0]))


def test_ema_update_errors() -> None:
    with pytest.raises(ValueError, match="decay"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(nn.Linear(2, 2), nn.Conv2d(2, 2, 1, bias=False), 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 3), 0.9)


def test_add_gaussian_noise() -> None:
    x = torch.zeros(4, 3, 32, 32)
    assert add_gaussian_noise(x, 0.0) is x
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    n1, n2 = add_gaussian_noise(x, 0.15, generator=g1), add_gaussian_noise(x, 0.15, generator=g2)
    assert torch.equal(n1, n2)
    assert n1.std().item() == pytest.approx(0.15, rel=0.05)
    clipped = add_gaussian_noise(x, 1.0, clip=0.2, generator=g1)
    assert clipped.abs().max() == torch.tensor(0.2)  # float32 0.2, reached by the clipped draws
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(x, -1.0)
    with pytest.raises(ValueError, match="clip"):
        add_gaussian_noise(x, 1.0, clip=0.0)


# -------------------------------------------------------------------------------- module checks
def _net(**extra: Any) -> dict[str, Any]:
    return {**{k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_NET.items()}, **extra}


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (CPSModule, {"lambda_cps": -1.0}, "lambda_cps"),
        (CPSModule, {"seeds": (3, 3)}, "seeds"),
        (CPSModule, {"pseudo_threshold": 0.0}, "pseudo_threshold"),
        (CPSModule, {"dice": "hard"}, "dice"),
        (SupervisedModule, {"dice": "hard"}, "dice"),
        (MeanTeacherModule, {"ema_decay": 1.0}, "ema_decay"),
        (MeanTeacherModule, {"ema_decay_after_rampup": -0.1}, "ema_decay_after_rampup"),
        (MeanTeacherModule, {"consistency_weight": -1.0}, "consistency_weight"),
        (MeanTeacherModule, {"rampup_steps": -1}, "rampup_steps"),
        (MeanTeacherModule, {"noise_std": -0.1}, "noise_std"),
        (MeanTeacherModule, {"noise_clip": 0.0}, "noise_clip"),
        (SupervisedModule, {"lr": 0.0}, "lr"),
    ],
)
def test_module_argument_errors(cls: type, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**_net(**kwargs))


def test_selection_heads() -> None:
    assert GPCPSModule.selection_head == "ensemble"
    assert SupervisedModule.selection_head == "net1" and SupervisedModule.head_names == ("net1",)
    assert CPSModule.selection_head == "ensemble"
    assert CPSModule.head_names == ("net1", "net2", "ensemble")
    assert MeanTeacherModule.selection_head == "teacher"
    assert set(MeanTeacherModule.head_names) == {"teacher", "student"}
    for cls in (GPCPSModule, SupervisedModule, CPSModule, MeanTeacherModule):
        assert cls.selection_head in cls.head_names
    assert GPCPSModule(**_net()).selection_head == "ensemble"


def test_selection_head_must_be_a_head() -> None:
    class Broken(SupervisedModule):
        selection_head = "ensemble"

    with pytest.raises(ValueError, match="selection_head"):
        Broken(**_net())


def test_training_batch_type_error() -> None:
    module = SupervisedModule(**_net())
    with pytest.raises(TypeError, match="SemiSupervisedBatch"):
        module.compute_losses(torch.zeros(2, 3, 32, 32))  # type: ignore[arg-type]


def test_supervised_loss_is_gpcps_lsup_of_one_network() -> None:
    module = SupervisedModule(**_net())
    batch = random_semi_batch()
    losses = module.compute_losses(batch)
    expected = soft_dice_loss(torch.sigmoid(module.net1(batch.labeled)), batch.mask)
    torch.testing.assert_close(losses.total, expected)
    # ignores the unlabeled images
    batch.unlabeled = torch.full_like(batch.unlabeled, 1e6)
    torch.testing.assert_close(module.compute_losses(batch).total, expected)


def test_cps_module_losses_and_gradient_paths() -> None:
    torch.manual_seed(0)
    module = CPSModule(**_net(lambda_cps=2.0))
    module.eval()  # batch-norm in eval mode: the same logits on every forward pass
    batch = random_semi_batch()
    losses = module.compute_losses(batch)
    with torch.no_grad():
        x = torch.cat([batch.labeled, batch.unlabeled])
        z1, z2 = module.net1(x), module.net2(x)
    torch.testing.assert_close(losses.cps, cps_loss(z1, z2))
    torch.testing.assert_close(losses.total, losses.sup + 2.0 * losses.cps)
    # The CPS term trains net1 exactly as BCE(net1, detached labels of net2) does: nothing flows back
    # into net1 through the pseudo labels it gives net2.
    module.zero_grad()
    cps_only = cps_loss(module.net1(x), module.net2(x))
    cps_only.backward()
    # (parameters that the depth-3 encoder never uses have no gradient in either case)
    grads = [None if p.grad is None else p.grad.clone() for p in module.net1.parameters()]
    assert sum(g is not None for g in grads) > 10
    module.zero_grad()
    y2 = hard_pseudo_labels(z2)
    torch.nn.functional.binary_cross_entropy_with_logits(module.net1(x), y2).backward()
    for g, p in zip(grads, module.net1.parameters(), strict=True):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(g, p.grad)


def test_cps_without_labeled_pseudo_supervision() -> None:
    module = CPSModule(**_net(cps_on_labeled=False))
    module.eval()
    batch = random_semi_batch()
    losses = module.compute_losses(batch)
    with torch.no_grad():
        expected = cps_loss(module.net1(batch.unlabeled), module.net2(batch.unlabeled))
    torch.testing.assert_close(losses.cps, expected)


def test_mean_teacher_weight_and_noise_defaults() -> None:
    module = MeanTeacherModule(**_net())
    assert module.consistency_weight_at(0) == pytest.approx(0.1 * math.exp(-5.0))
    assert module.consistency_weight_at(1250) == pytest.approx(0.1)
    assert module.ema_decay_at(10_000) == 0.99
    assert all(not p.requires_grad for p in module.teacher.parameters())
    for t, s in zip(module.teacher.parameters(), module.student.parameters(), strict=True):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()  # a copy, not shared
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}
    assert in_optimizer == {id(p) for p in module.student.parameters()}


# ------------------------------------------------------------------------------ Trainer runs
MODULES: list[tuple[type, dict[str, Any], tuple[str, ...]]] = [
    (SupervisedModule, {}, ("train/loss", "train/loss_sup")),
    (CPSModule, {}, ("train/loss", "train/loss_sup", "train/loss_cps")),
    (
        MeanTeacherModule,
        {"rampup_steps": 2},
        ("train/loss", "train/loss_sup", "train/loss_cons", "train/cons_weight", "train/ema_decay"),
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "train_keys"), MODULES, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trains_validates_and_round_trips(
    tmp_path: Path,
    cls: type,
    kwargs: dict[str, Any],
    train_keys: tuple[str, ...],
    precision: str,
    tiny_trainer: Any,
) -> None:
    torch.manual_seed(0)
    module = cls(**_net(lr=1e-2, **kwargs))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer: L.Trainer = tiny_trainer(
        default_root_dir=tmp_path, max_steps=2, limit_val_batches=1, log_every_n_steps=1, precision=precision
    )
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=4))
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    for key in train_keys:
        assert key in metrics and torch.isfinite(metrics[key]), key
    for head in cls.head_names:
        assert f"val/dice_{head}" in metrics and f"val/iou_{head}" in metrics
    assert f"val/dice_{cls.selection_head}" in metrics
    for net in module.trained_networks():
        for name, p in net.named_parameters():
            if p.requires_grad and p.ndim > 1:
                assert not torch.equal(p.detach(), before[_state_key(module, net, name)]), "not trained"
                break

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = cls.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(module.hparams)
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    for key, value in state.items():
        assert torch.equal(value, restored_state[key]), key
    images = torch.rand(2, 3, 32, 32)
    module.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(images), restored(images))


def _state_key(module: nn.Module, net: nn.Module, name: str) -> str:
    for child_name, child in module.named_children():
        if child is net:
            return f"{child_name}.{name}"
    raise KeyError(name)


def test_mean_teacher_step_is_ema_and_teacher_gets_no_gradient(tmp_path: Path, tiny_trainer: Any) -> None:
    torch.manual_seed(0)
    module = MeanTeacherModule(**_net(lr=1e-2, ema_decay=0.99, rampup_steps=2))
    teacher_before = {k: v.detach().clone() for k, v in module.teacher.named_parameters()}
    trainer: L.Trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=4))
    assert trainer.global_step == 1
    moved = False
    for name, t in module.teacher.named_parameters():
        s = dict(module.student.named_parameters())[name].detach()
        expected = 0.99 * teacher_before[name] + (1 - 0.99) * s
        torch.testing.assert_close(t.detach(), expected, rtol=1e-6, atol=1e-9)
        assert t.grad is None and not t.requires_grad
        moved |= not torch.equal(t.detach(), teacher_before[name])
    assert moved, "the teacher did not move towards the student"
    # the student did train and differs from its teacher now
    assert any(
        not torch.equal(t, s)
        for t, s in zip(module.teacher.parameters(), module.student.parameters(), strict=True)
    )
    # the teacher's weights are in the checkpoint
    path = tmp_path / "mt.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for name, t in module.teacher.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"teacher.{name}"], t)


def test_mean_teacher_after_rampup_decay(tmp_path: Path, tiny_trainer: Any) -> None:
    torch.manual_seed(0)
    module = MeanTeacherModule(**_net(lr=1e-2, rampup_steps=1, ema_decay=0.5, ema_decay_after_rampup=0.9))
    assert module.ema_decay_at(0) == 0.5 and module.ema_decay_at(1) == 0.9
    trainer: L.Trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=4))
    assert trainer.callback_metrics["train/ema_decay"].item() == pytest.approx(0.9)
    assert trainer.callback_metrics["train/cons_weight"].item() == pytest.approx(0.1)


def test_mean_teacher_keeps_its_batch_norm_statistics_current_without_the_consistency_loss(
    tmp_path: Path, tiny_trainer: Any
) -> None:
    # Only parameters are averaged, so the teacher's batch-norm running statistics come from its own
    # forward passes. With consistency_weight 0 (an ablation) it must still run, or the teacher head, the
    # one checkpoints are selected on, would evaluate averaged weights with its initial statistics.
    torch.manual_seed(0)
    module = MeanTeacherModule(**_net(lr=1e-2, consistency_weight=0.0))
    norms = [m for m in module.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    initial = [m.state_dict()["running_mean"].clone() for m in norms]
    trainer: L.Trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=3, log_every_n_steps=1)
    trainer.fit(module, datamodule=RandomSemiDataModule(size=32, batch_size=2, length=4))
    for m, before in zip(norms, initial, strict=True):
        assert not torch.equal(m.state_dict()["running_mean"], before)
