"""Pretrained encoder weights from a local file (``encoder_weights=<path>``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import TINY_NET, RandomSemiDataModule, checkpointing_trainer
from safetensors.torch import save_file
from torch import Tensor, nn

from gpcps_lightning import GPCPSModule, MeanTeacherModule, PSMTModule, SupervisedModule
from gpcps_lightning.inference.predict import load_module
from gpcps_lightning.networks import (
    build_network,
    encoder_weights_path,
    load_encoder_state_dict,
    load_encoder_weights,
    skip_pretrained_weights,
)

#: The seed of the network whose encoder the weights files hold (no method uses it by default).
SOURCE_SEED = 123


def tiny(**network_kwargs: Any) -> dict[str, Any]:
    """:data:`TINY_NET`, its ``network_kwargs`` updated with ``network_kwargs``."""
    return {**TINY_NET, "network_kwargs": {**TINY_NET["network_kwargs"], **network_kwargs}}


def source_network(**network_kwargs: Any) -> nn.Module:
    return build_network(seed=SOURCE_SEED, **tiny(**network_kwargs))


def encoder_file(
    tmp_path: Path, fmt: str = "pth", name: str = "encoder", **network_kwargs: Any
) -> tuple[Path, dict[str, Tensor]]:
    """A file holding the encoder's state dict of the source network, and that state dict."""
    state = {k: v.clone() for k, v in source_network(**network_kwargs).encoder.state_dict().items()}
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


def assert_state_equal(module: nn.Module, expected: dict[str, Tensor]) -> None:
    actual = module.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def networks_of(module: nn.Module) -> dict[str, nn.Module]:
    names = ("net1", "net2", "student", "teacher", "teacher1", "teacher2")
    return {n: getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)}


# ----------------------------------------------------------------- names and paths
@pytest.mark.parametrize("name", ["imagenet", "ssl", "swsl", "advprop", "imagenet+5k", "instagram"])
def test_smp_weights_names_are_not_paths(name: str) -> None:
    assert encoder_weights_path(name) is None
    assert encoder_weights_path(None) is None


@pytest.mark.parametrize(
    "value", ["w.pth", "W.PT", "dir/weights", "w.safetensors", "w.bin", "w.ckpt", "~/weights", Path("w")]
)
def test_paths_are_recognised(value: str | Path) -> None:
    assert encoder_weights_path(value) == Path(value).expanduser()


def test_an_existing_file_without_a_suffix_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert encoder_weights_path("weights") is None
    Path("weights").write_bytes(b"")
    assert encoder_weights_path("weights") == Path("weights")


def test_smp_names_pass_through_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # No download: smp.create_model is replaced by one that records what it was given.
    seen: list[Any] = []

    def fake_create_model(arch: str, **kwargs: Any) -> nn.Module:
        seen.append(kwargs["encoder_weights"])
        return nn.Identity()

    monkeypatch.setattr(smp, "create_model", fake_create_model)
    build_network(encoder_weights="imagenet", **TINY_NET)
    with skip_pretrained_weights():
        build_network(encoder_weights="imagenet", **TINY_NET)
        build_network(encoder_weights="/no/such/file.pth", **TINY_NET)  # not even checked
    build_network(encoder_weights="imagenet", **TINY_NET)  # the block is over
    assert seen == ["imagenet", None, None, "imagenet"]


def test_an_unknown_smp_weights_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no encoder_weights='imagenett' for encoder_name='resnet18'.*path"):
        build_network(encoder_name="resnet18", encoder_weights="imagenett")


# ----------------------------------------------------------------- loading into every network
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("cls", [GPCPSModule, PSMTModule, MeanTeacherModule])
def test_every_network_starts_from_the_file(tmp_path: Path, fmt: str, cls: type) -> None:
    path, state = encoder_file(tmp_path, fmt)
    module = cls(encoder_weights=str(path), **TINY_NET)
    plain = cls(**TINY_NET)
    networks, plain_networks = networks_of(module), networks_of(plain)
    assert len(networks) >= 2
    for name, net in networks.items():
        assert_state_equal(net.encoder, state)
        # Without the file the encoders are the seeds' own, which differ from the file's.
        assert not torch.equal(
            plain_networks[name].encoder.state_dict()["model.conv1.weight"], state["model.conv1.weight"]
        )
        # Decoder and head are still initialised from the method's seeds, as without the file.
        for part in ("decoder", "segmentation_head"):
            assert_state_equal(getattr(net, part), getattr(plain_networks[name], part).state_dict())
    assert module.hparams["encoder_weights"] == str(path)


def test_a_whole_networks_state_dict_gives_its_encoder_only(tmp_path: Path) -> None:
    source = source_network()
    path = tmp_path / "unet.pth"
    torch.save(source.state_dict(), path)
    net = build_network(encoder_weights=str(path), seed=7, **TINY_NET)
    assert_state_equal(net.encoder, source.encoder.state_dict())
    assert_state_equal(net.decoder, build_network(seed=7, **TINY_NET).decoder.state_dict())
    assert not torch.equal(net.segmentation_head[0].weight, source.segmentation_head[0].weight)


@pytest.mark.parametrize("prefix", ["net1.", "model.", "module.student."])
def test_a_prefixed_checkpoint_gives_its_encoder(tmp_path: Path, prefix: str) -> None:
    source = source_network()
    path = tmp_path / "run.ckpt"
    state = {prefix + k: v for k, v in source.state_dict().items()}
    state["skipped_steps"] = torch.zeros((), dtype=torch.long)  # not an encoder's
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"lr": 1e-4}}, path)
    net = build_network(encoder_weights=str(path), **TINY_NET)
    assert_state_equal(net.encoder, source.encoder.state_dict())


def test_several_encoders_are_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "gpcps.ckpt"
    module = GPCPSModule(**TINY_NET)
    torch.save({"state_dict": module.state_dict()}, path)
    with pytest.raises(ValueError, match="several encoders") as info:
        build_network(encoder_weights=str(path), **TINY_NET)
    message = str(info.value)
    assert str(path) in message and "'net1.encoder.'" in message and "'net2.encoder.'" in message
    assert "removeprefix('net1.encoder.')" in message  # says how to save one of them


# ----------------------------------------------------------------- errors
def test_another_encoder_depth_is_a_clear_error(tmp_path: Path) -> None:
    deeper, _ = encoder_file(tmp_path, name="deeper", encoder_depth=4, decoder_channels=[16, 8, 4, 4])
    with pytest.raises(ValueError) as info:
        build_network(encoder_weights=str(deeper), **TINY_NET)
    message = str(info.value)
    assert str(deeper) in message
    unexpected = re.search(r"(\d+) unexpected keys \(first: (\[.*?\])\)", message)
    assert unexpected is not None, message
    assert int(unexpected.group(1)) > 5 and unexpected.group(2).count("model.layer3.") == 5
    assert "missing keys" not in message and "encoder_depth" in message

    shallower, _ = encoder_file(tmp_path, name="shallower", encoder_depth=2, decoder_channels=[16, 8])
    with pytest.raises(ValueError, match=r"\d+ missing keys \(first: \['model.layer2"):
        build_network(encoder_weights=str(shallower), **TINY_NET)


def test_mismatched_shapes_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gray.safetensors"
    save_file(build_network(in_channels=1, **TINY_NET).encoder.state_dict(), str(path))
    with pytest.raises(ValueError) as info:
        GPCPSModule(encoder_weights=str(path), **TINY_NET)
    message = str(info.value)
    assert str(path) in message
    assert "1 mismatched shapes" in message
    assert "model.conv1.weight: file (64, 1, 7, 7), encoder (64, 3, 7, 7)" in message
    assert "in_channels" in message


def test_a_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "resnet34_encoder.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_network(encoder_weights=str(path), **TINY_NET)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        MeanTeacherModule(encoder_weights=str(path), **TINY_NET)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_encoder_state_dict(path)


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(garbage)) + ".*weights_only=True"):
        build_network(encoder_weights=str(garbage), **TINY_NET)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ".*safetensors"):
        build_network(encoder_weights=str(broken), **TINY_NET)
    no_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], no_state)
    with pytest.raises(ValueError, match=re.escape(str(no_state)) + " holds no state dict"):
        build_network(encoder_weights=str(no_state), **TINY_NET)


def test_a_network_without_encoder_is_a_clear_error(tmp_path: Path) -> None:
    path, _ = encoder_file(tmp_path)
    with pytest.raises(ValueError, match=r"Conv2d has no `encoder` submodule"):
        load_encoder_weights(nn.Conv2d(3, 1, 1), path)


def test_a_path_object_is_refused_by_the_module(tmp_path: Path) -> None:
    path, _ = encoder_file(tmp_path)
    with pytest.raises(TypeError, match=r"`encoder_weights` must be a string.*str\(path\)"):
        SupervisedModule(encoder_weights=path, **TINY_NET)  # type: ignore[arg-type]


# ----------------------------------------------------------------- checkpoints
def test_a_checkpoint_loads_without_the_weights_file(tmp_path: Path, tiny_trainer) -> None:
    path, state = encoder_file(tmp_path)
    module = SupervisedModule(encoder_weights=str(path), **TINY_NET)
    assert_state_equal(module.net1.encoder, state)
    root = tmp_path / "run"
    checkpointing_trainer(root).fit(module, RandomSemiDataModule())
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    assert not torch.equal(trained["net1.encoder.model.conv1.weight"], state["model.conv1.weight"])
    path.unlink()  # another machine: the weights file is not there

    for loaded in (
        SupervisedModule.load_from_checkpoint(root / "last.ckpt"),
        load_module(root / "last.ckpt"),
    ):
        assert loaded.hparams["encoder_weights"] == str(path)  # still recorded
        assert_state_equal(loaded, trained)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):  # a new module does need it
        SupervisedModule(encoder_weights=str(path), **TINY_NET)

    # The checkpoint of a one-network method is itself a weights file for another run's encoders.
    finetuned = GPCPSModule(encoder_weights=str(root / "last.ckpt"), **TINY_NET)
    encoder = {
        k.removeprefix("net1.encoder."): v for k, v in trained.items() if k.startswith("net1.encoder.")
    }
    assert_state_equal(finetuned.net1.encoder, encoder)
    assert_state_equal(finetuned.net2.encoder, encoder)
