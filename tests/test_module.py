"""GPCPSModule: wiring of the losses, ablation rows, mixed precision, Trainer, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_NET, RandomSemiDataModule, random_semi_batch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

import gpcps_lightning.losses.gpcps as objective_mod
import gpcps_lightning.methods.gpcps as method_mod
from gpcps_lightning import EvaluationBatch, GPCPSModule, SemiSupervisedBatch
from gpcps_lightning.losses import fuse_images
from gpcps_lightning.methods.base import SegmentationModule


def _params(module: GPCPSModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _fit(tiny_trainer: Any, steps: int = 2, seed: int = 0, **module_kwargs: Any) -> GPCPSModule:
    L.seed_everything(seed, verbose=False)
    module = GPCPSModule(**TINY_NET, **module_kwargs)
    tiny_trainer(max_steps=steps, deterministic=True).fit(module, RandomSemiDataModule())
    return module


# ---------------------------------------------------------------- construction
def test_networks_differ_and_are_reproducible() -> None:
    a, b = GPCPSModule(**TINY_NET), GPCPSModule(**TINY_NET)
    assert not torch.equal(_params(a.net1), _params(a.net2))
    assert torch.equal(_params(a), _params(b))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seeds": (3, 3)}, "seeds"),
        ({"lambda_grad": -1.0}, "lambda_grad"),
        ({"lambda_semi": -0.1}, "lambda_semi"),
        ({"eps_mode": "global"}, "eps_mode"),
        ({"dice": "hard"}, "dice"),
        ({"background": "gt"}, "background"),
        ({"gp_every_n_steps": 0}, "gp_every_n_steps"),
        ({"lr": 0.0}, "lr"),
        ({"threshold": 1.0}, "threshold"),
        ({"arch": "NoSuchNet"}, "arch='NoSuchNet'"),
        ({"encoder_name": "no_such_encoder"}, "no_such_encoder"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    args = {**TINY_NET, **kwargs}
    if "encoder_name" in kwargs:
        args.pop("network_kwargs")
    with pytest.raises(ValueError, match=message):
        GPCPSModule(**args)


def test_wrong_batch_type_is_a_clear_error() -> None:
    module = GPCPSModule(**TINY_NET)
    with pytest.raises(TypeError, match="SemiSupervisedBatch"):
        module.compute_losses({"labeled": torch.zeros(1)})  # type: ignore[arg-type]
    batch = random_semi_batch()
    batch.mask = batch.mask[:, :, :-1]
    with pytest.raises(ValueError, match="mask"):
        module.compute_losses(batch)


# ---------------------------------------------------------------- the penalty trains both networks
def _fixed_fused_batch() -> SemiSupervisedBatch:
    batch = random_semi_batch(n=2, size=32, seed=3)
    batch.eps = torch.tensor([0.3, 0.7]).reshape(2, 1, 1, 1)
    batch.fused = fuse_images(batch.labeled, batch.unlabeled, batch.eps)
    return batch


def test_penalty_gradient_reaches_both_networks() -> None:
    module = GPCPSModule(**TINY_NET)
    losses = module.compute_losses(_fixed_fused_batch())
    assert losses.penalty.item() > 0
    for net in (module.net1, module.net2):
        params = list(net.parameters())
        sup = torch.autograd.grad(losses.sup, params, retain_graph=True, allow_unused=True)
        pen = torch.autograd.grad(losses.penalty, params, retain_graph=True, allow_unused=True)
        # Every parameter the supervised loss trains at this point (timm zero-initialises the last
        # normalisation of each residual block, which blocks some gradients at init) gets a penalty gradient.
        trained = [i for i, g in enumerate(sup) if g is not None and g.abs().sum() > 0]
        assert len(trained) > len(params) // 2
        assert all(pen[i] is not None and pen[i].abs().sum() > 0 for i in trained)


def test_parameter_update_changes_when_only_lambda_grad_changes(tiny_trainer: Any) -> None:
    base = _fit(tiny_trainer, lambda_grad=1e-3)
    again = _fit(tiny_trainer, lambda_grad=1e-3)
    without = _fit(tiny_trainer, lambda_grad=0.0)
    stronger = _fit(tiny_trainer, lambda_grad=1e-1)
    assert torch.equal(_params(base), _params(again))  # the runs are deterministic...
    for other in (without, stronger):  # ...so the difference comes from lambda_grad alone
        for net in ("net1", "net2"):
            diff = (_params(getattr(base, net)) - _params(getattr(other, net))).abs().max()
            assert diff > 1e-7, net


# ---------------------------------------------------------------- ablation rows
class _Spy:
    def __init__(self, module: GPCPSModule, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {"net1": [], "net2": []}
        self.gradient_calls = 0
        for name in ("net1", "net2"):
            getattr(module, name).register_forward_pre_hook(
                lambda _m, args, name=name: self.inputs[name].append(args[0].detach().clone())
            )
        real = objective_mod.input_gradient

        def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.gradient_calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(objective_mod, "input_gradient", counting)


@pytest.mark.parametrize(
    ("row", "lambda_grad", "lambda_semi", "forwards", "gradient_calls"),
    [("I", 0.0, 0.0, 1, 0), ("II", 1e-3, 0.0, 2, 1), ("III", 0.0, 1.0, 2, 0), ("IV", 1e-3, 1.0, 2, 1)],
)
def test_ablation_rows_compose_the_loss(
    monkeypatch: pytest.MonkeyPatch,
    row: str,
    lambda_grad: float,
    lambda_semi: float,
    forwards: int,
    gradient_calls: int,
) -> None:
    module = GPCPSModule(**TINY_NET, lambda_grad=lambda_grad, lambda_semi=lambda_semi)
    spy = _Spy(module, monkeypatch)
    losses = module.compute_losses(_fixed_fused_batch())
    assert len(spy.inputs["net1"]) == len(spy.inputs["net2"]) == forwards, row
    assert spy.gradient_calls == gradient_calls, row
    expected = losses.sup + lambda_grad * losses.penalty + lambda_semi * losses.semi
    torch.testing.assert_close(losses.total, expected)
    assert (losses.penalty.item() > 0) == (lambda_grad > 0)
    assert (losses.semi.item() > 0) == (lambda_semi > 0)


def test_module_fuses_with_eps_when_the_batch_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    module = GPCPSModule(**TINY_NET)
    spy = _Spy(module, monkeypatch)
    eps = torch.tensor([0.25, 0.9]).reshape(2, 1, 1, 1)
    monkeypatch.setattr(method_mod, "sample_eps", lambda n, mode, device=None: eps)
    batch = random_semi_batch(n=2)
    module.compute_losses(batch)
    expected = eps * batch.labeled + (1 - eps) * batch.unlabeled
    torch.testing.assert_close(spy.inputs["net1"][1], expected)
    torch.testing.assert_close(spy.inputs["net2"][1], expected)


def test_lazy_penalty_weight_and_schedule() -> None:
    module = GPCPSModule(**TINY_NET, gp_every_n_steps=4)
    assert [module.penalty_due(s) for s in range(6)] == [True, False, False, False, True, False]
    batch = _fixed_fused_batch()
    due, skipped = module.compute_losses(batch, step=4), module.compute_losses(batch, step=5)
    torch.testing.assert_close(due.total, due.sup + 4 * 1e-3 * due.penalty + due.semi)
    assert skipped.penalty.item() == 0.0
    torch.testing.assert_close(skipped.total, skipped.sup + skipped.semi)


def test_authors_variants_run() -> None:
    module = GPCPSModule(**TINY_NET, dice="authors", background="authors", eps_mode="per_batch")
    losses = module.compute_losses(random_semi_batch())
    assert all(math.isfinite(v.item()) for v in (losses.total, losses.sup, losses.penalty, losses.semi))


def test_encoder_without_second_derivative_is_a_clear_error(tiny_trainer: Any) -> None:
    module = GPCPSModule(arch="Unet", encoder_name="tu-mobilenetv3_small_050")
    with pytest.raises(RuntimeError, match=r"second derivative.*lambda_grad=0"):
        tiny_trainer(max_steps=1, deterministic=True).fit(module, RandomSemiDataModule())


# ---------------------------------------------------------------- Trainer, precision, checkpoints
def test_fit_counts_training_steps_and_logs_every_term(tmp_path: Path, tiny_trainer: Any) -> None:
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET)
    trainer = tiny_trainer(
        default_root_dir=tmp_path, max_steps=3, limit_val_batches=2, val_check_interval=3, deterministic=True
    )
    trainer.fit(module, RandomSemiDataModule())
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_sup", "train/loss_grad", "train/loss_semi"):
        assert math.isfinite(metrics[key].item()), key
    for head in ("net1", "net2", "ensemble"):
        for name in ("dice", "iou"):
            value = metrics[f"val/{name}_{head}"].item()
            assert 0.0 <= value <= 1.0


def test_bf16_autocast_step_on_cpu(tiny_trainer: Any) -> None:
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET)
    before = _params(module)
    trainer = tiny_trainer(max_steps=2, precision="bf16-mixed", deterministic=True)
    trainer.fit(module, RandomSemiDataModule())
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/loss_grad"].item())
    assert not torch.equal(before, _params(module))


def _fp16_fit(
    tiny_trainer: Any, init_scale: float, steps: int = 2
) -> tuple[GPCPSModule, torch.amp.GradScaler, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET)
    before = _params(module)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = tiny_trainer(max_steps=steps, plugins=[precision], deterministic=True)
    trainer.fit(module, RandomSemiDataModule())
    return module, scaler, before


def test_fp16_nonfinite_input_gradient_skips_the_step(
    monkeypatch: pytest.MonkeyPatch, tiny_trainer: Any
) -> None:
    monkeypatch.setattr(objective_mod, "_nonfinite_flag", lambda g: torch.tensor(float("nan")))
    module, scaler, before = _fp16_fit(tiny_trainer, init_scale=2.0**4, steps=2)
    assert torch.equal(before, _params(module))  # both steps skipped
    assert scaler.get_scale() == 2.0**2  # and the scale backed off twice, as for any overflow


def test_checkpoint_round_trip_and_resume(tmp_path: Path, tiny_trainer: Any) -> None:
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET, lambda_grad=2e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = tiny_trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[checkpoint],
        deterministic=True,
    )
    trainer.fit(module, RandomSemiDataModule())
    path = tmp_path / "last.ckpt"
    restored = GPCPSModule.load_from_checkpoint(path)
    assert restored.lambda_grad == 2e-3
    for key, value in module.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    state = torch.load(path, weights_only=False)
    (optimizer_state,) = state["optimizer_states"]
    assert len(optimizer_state["param_groups"]) == 2  # one group per network
    assert all(s["step"].item() == 2 for s in optimizer_state["state"].values())

    resumed_trainer = tiny_trainer(default_root_dir=tmp_path, max_steps=4, deterministic=True)
    resumed_trainer.fit(restored, RandomSemiDataModule(), ckpt_path=path)
    assert resumed_trainer.global_step == 4


# ---------------------------------------------------------------- evaluation and prediction
class _Oracle(SegmentationModule):
    """Returns preset probabilities, to check the evaluation arithmetic."""

    head_names = ("net1",)

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__(**TINY_NET)
        self.probs = probs
        self.net = torch.nn.Linear(1, 1)

    def trained_networks(self):  # type: ignore[no-untyped-def]
        return (self.net,)

    def head_probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"net1": self.probs}


def _evaluate(module: SegmentationModule, batch: EvaluationBatch) -> dict[str, float]:
    module.val_metrics["net1"].reset()
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    module.validation_step(batch, 0)
    return {k: v.item() for k, v in module.val_metrics["net1"].compute().items()}


def test_metrics_are_per_image_means_at_original_resolution() -> None:
    probs = torch.zeros(2, 1, 4, 4)
    probs[0, :, :2, :] = 0.9  # image 0 predicts the top half
    probs[1, :, :, :] = 0.8  # image 1 predicts everything
    oracle = _Oracle(probs)
    top_half = torch.zeros(1, 8, 8)
    top_half[:, :4, :] = 1.0
    quarter = torch.zeros(1, 8, 8)
    quarter[:, :4, :4] = 1.0
    batch = EvaluationBatch(
        image=torch.zeros(2, 3, 4, 4),
        mask=torch.zeros(2, 1, 4, 4),
        original_masks=[top_half, quarter],
        names=["a", "b"],
    )
    values = _evaluate(oracle, batch)
    # image 0 is perfect (dice 1, iou 1); image 1: 16 of 64 pixels -> dice 2*16/(64+16) = 0.4, iou 0.25
    assert values["val/dice_net1"] == pytest.approx((1.0 + 0.4) / 2)
    assert values["val/iou_net1"] == pytest.approx((1.0 + 0.25) / 2)


def test_metrics_at_training_size_when_no_original_masks() -> None:
    probs = torch.zeros(1, 1, 4, 4)
    probs[..., :2, :] = 0.9
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :1, :] = 1.0  # 4 of the 8 predicted pixels are right: dice 8/12, iou 4/8
    values = _evaluate(_Oracle(probs), EvaluationBatch(image=torch.zeros(1, 3, 4, 4), mask=mask))
    assert values["val/dice_net1"] == pytest.approx(8 / 12)
    assert values["val/iou_net1"] == pytest.approx(0.5)


def test_predict_step_returns_the_ensemble_probabilities() -> None:
    module = GPCPSModule(**TINY_NET).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = module.predict_step(images, 0)
        p1, p2 = torch.sigmoid(module.net1(images)), torch.sigmoid(module.net2(images))
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out, (p1 + p2) / 2)
    with pytest.raises(TypeError, match="EvaluationBatch"):
        module.predict_step([images], 0)  # type: ignore[arg-type]


def test_evaluation_resizes_probabilities_bilinearly() -> None:
    # a soft edge: after bilinear upsampling, the 0.5 crossing lands between the two source pixels
    probs = torch.tensor([[0.0, 1.0]]).reshape(1, 1, 1, 2)
    resized = F.interpolate(probs, size=(1, 4), mode="bilinear", align_corners=False)
    mask = (resized >= 0.5).float().reshape(1, 1, 4)
    values = _evaluate(
        _Oracle(probs),
        EvaluationBatch(image=torch.zeros(1, 3, 1, 2), mask=torch.zeros(1, 1, 1, 2), original_masks=[mask]),
    )
    assert values["val/dice_net1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- penalty share diagnostic
def test_penalty_share_is_the_loss_and_gradient_norm_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET, lambda_grad=0.5, penalty_share_every_n_steps=1)
    batch = random_semi_batch(n=2, size=32)
    eps = torch.full((2, 1, 1, 1), 0.3)
    batch = SemiSupervisedBatch(
        labeled=batch.labeled, mask=batch.mask, unlabeled=batch.unlabeled,
        fused=fuse_images(batch.labeled, batch.unlabeled, eps), eps=eps,
    )  # fmt: skip
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    losses = module.compute_losses(batch)
    module._log_penalty_share(losses, batch_size=2)
    params = [p for p in module.parameters() if p.requires_grad]

    def norm(value: torch.Tensor) -> float:
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))

    weighted = 0.5 * losses.penalty
    assert logged["train/penalty_share_loss"].item() == pytest.approx((weighted / losses.total).item())
    expected = norm(weighted) / norm(losses.total)
    assert 0.0 < expected < 10.0
    assert logged["train/penalty_share_grad_norm"].item() == pytest.approx(expected, rel=1e-4)
    assert module.penalty_share_history[-1][1:] == pytest.approx(
        (logged["train/penalty_share_loss"].item(), expected), rel=1e-4
    )


def test_penalty_share_changes_nothing_in_training(tiny_trainer: Any) -> None:
    plain = _fit(tiny_trainer, steps=3)
    measured = _fit(tiny_trainer, steps=3, penalty_share_every_n_steps=2)
    assert torch.equal(_params(plain), _params(measured))
    assert [step for step, _, _ in measured.penalty_share_history] == [0, 2]
    with pytest.raises(ValueError, match="penalty_share_every_n_steps"):
        GPCPSModule(**TINY_NET, penalty_share_every_n_steps=-1)


def _checkpoint_after_two_steps(tiny_trainer: Any, path: Path) -> Path:
    L.seed_everything(0, verbose=False)
    module = GPCPSModule(**TINY_NET, penalty_share_every_n_steps=1)
    trainer = tiny_trainer(max_steps=2, deterministic=True)
    trainer.fit(module, RandomSemiDataModule(length=4))  # two steps an epoch: resumed at its end
    trainer.save_checkpoint(path)
    return path


def test_a_resumed_fit_continues_the_penalty_share_history(tiny_trainer: Any, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    whole = GPCPSModule(**TINY_NET, penalty_share_every_n_steps=1)
    tiny_trainer(max_steps=4, deterministic=True).fit(whole, RandomSemiDataModule(length=4))
    path = _checkpoint_after_two_steps(tiny_trainer, tmp_path / "step2.ckpt")
    L.seed_everything(0, verbose=False)
    resumed = GPCPSModule(**TINY_NET, penalty_share_every_n_steps=1)
    trainer = tiny_trainer(max_steps=4, deterministic=True)
    trainer.fit(resumed, RandomSemiDataModule(length=4), ckpt_path=path)
    # the restored steps 0-1 and the resumed steps 2-3, equal to the uninterrupted run's
    assert [step for step, _, _ in resumed.penalty_share_history] == [0, 1, 2, 3]
    shares = [share for entry in resumed.penalty_share_history for share in entry[1:]]
    assert shares == pytest.approx([share for entry in whole.penalty_share_history for share in entry[1:]])
    assert resumed.penalty_share_history_complete
    # loading weights is not resuming: the history stays empty
    assert GPCPSModule.load_from_checkpoint(path).penalty_share_history == []


def test_a_checkpoint_without_the_history_resumes_with_a_partial_one(
    tiny_trainer: Any, tmp_path: Path
) -> None:
    from gpcps_lightning.checkpointing import CHECKPOINT_KEY

    path = _checkpoint_after_two_steps(tiny_trainer, tmp_path / "older.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint[CHECKPOINT_KEY]["penalty_share_history"]  # as an earlier version wrote it
    torch.save(checkpoint, path)
    resumed = GPCPSModule(**TINY_NET, penalty_share_every_n_steps=1)
    tiny_trainer(max_steps=3).fit(resumed, RandomSemiDataModule(length=4), ckpt_path=path)
    assert [step for step, _, _ in resumed.penalty_share_history] == [2]
    assert not resumed.penalty_share_history_complete
