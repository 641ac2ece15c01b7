"""Tests for workers._models: registry strictness, the model contract, checkpoints, learning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers import _models
from workers._models import (
    SegformerSegmenter,
    SegmentationModel,
    UNet,
    build_model,
    load_checkpoint,
    load_model_state,
    model_names,
    register_model,
    save_model_state,
)

TINY_SEGFORMER: dict[str, Any] = {
    "hidden_sizes": [8, 16, 24, 32],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 1, 1],
    "decoder_hidden_size": 16,
}
# Small options per registered model, so the contract tests stay fast.
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "unet": {"base_channels": 4, "depth": 3},
    "segformer": {"config": TINY_SEGFORMER},
}


def tiny(name: str, num_classes: int = 3, **extra: Any) -> SegmentationModel:
    torch.manual_seed(0)
    return build_model(name, num_classes, {**TINY_OPTIONS.get(name, {}), **extra})


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run no slower on one thread, and far faster when CI cores are contended."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register names without leaking them into the module-wide registry."""
    monkeypatch.setattr(_models, "REGISTRY", _models.REGISTRY.copy())


# ------------------------------------------------------------------------------------------
# Contract, over every registered model


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("size", [(64, 96), (90, 120)])
def test_logits_at_input_resolution(name: str, size: tuple[int, int]) -> None:
    model = tiny(name, num_classes=5)
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5, *size)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name", model_names())
def test_gradients_reach_first_layer(name: str) -> None:
    model = tiny(name)
    logits = model(torch.randn(2, 3, 90, 120))
    nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 90, 120))).backward()
    first = next(model.parameters())
    assert first.grad is not None
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", model_names())
def test_encode_is_4d(name: str) -> None:
    model = tiny(name).eval()
    with torch.no_grad():
        features = model.encode(torch.randn(2, 3, 90, 120))
    assert features.ndim == 4
    assert features.shape[0] == 2


@pytest.mark.parametrize("name", model_names())
def test_built_in_train_mode(name: str) -> None:
    assert tiny(name).training


def test_unet_default_shapes() -> None:
    model = build_model("unet", 4)  # defaults: base 16, depth 3
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 90, 120)).shape == (1, 4, 90, 120)
        # 90x120 pads to 96x120; the bottleneck is 1/8 of that, with 16 * 2**3 channels.
        assert model.encode(torch.randn(1, 3, 90, 120)).shape == (1, 128, 12, 15)
    assert isinstance(model.dropout, nn.Dropout2d)


def test_unet_group_norm() -> None:
    model = tiny("unet", norm="group")
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)


# ------------------------------------------------------------------------------------------
# Registry strictness


def test_unknown_model_lists_registered() -> None:
    with pytest.raises(ValueError) as err:
        build_model("unte", 3)
    assert str(err.value) == f"unknown model 'unte'; registered: {', '.join(model_names())}"
    assert model_names() == sorted(model_names())
    assert {"segformer", "unet"} <= set(model_names())


def test_unknown_option_names_model_key_and_valid_keys() -> None:
    with pytest.raises(ValueError, match="model 'unet' has no option 'base_chanels'; valid options: base_channels, depth, dropout"):
        build_model("unet", 3, {"base_chanels": 8})


def test_unknown_segformer_config_key() -> None:
    with pytest.raises(ValueError, match="'hiden_sizes'.*hidden_sizes"):
        build_model("segformer", 3, {"config": {"hiden_sizes": [8, 16, 24, 32]}})
    with pytest.raises(ValueError, match="num_labels"):
        build_model("segformer", 3, {"config": {"num_labels": 4}})


def test_bad_option_values() -> None:
    with pytest.raises(ValueError, match="'norm'"):
        build_model("unet", 3, {"norm": "layer"})
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet", 0)


@pytest.mark.usefixtures("scratch_registry")
def test_double_registration_raises() -> None:
    with pytest.raises(ValueError, match="'unet' is already registered"):
        register_model("unet")(lambda num_classes: UNet(num_classes, 4, 1, 0.0, "batch"))

    @register_model("dummy")
    def build_dummy(num_classes: int, *, width: int = 2) -> SegmentationModel:
        return UNet(num_classes, width, 1, 0.0, "batch")

    with pytest.raises(ValueError, match="'dummy' is already registered"):
        register_model("dummy")(build_dummy)
    assert "dummy" in model_names()
    assert build_model("dummy", 2, {"width": 3}).encode(torch.randn(2, 3, 8, 8)).shape == (2, 6, 4, 4)


@pytest.mark.usefixtures("scratch_registry")
def test_builder_options_must_be_keyword_only_with_defaults() -> None:
    def positional(num_classes: int, width: int = 2) -> SegmentationModel:
        return UNet(num_classes, width, 1, 0.0, "batch")

    with pytest.raises(ValueError, match="width"):
        register_model("positional")(positional)
    assert "positional" not in model_names()


@pytest.mark.usefixtures("scratch_registry")
def test_builder_must_return_a_segmentation_model() -> None:
    register_model("plain")(lambda num_classes: nn.Conv2d(3, num_classes, 1))  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="'plain' returned Conv2d, not a SegmentationModel"):
        build_model("plain", 2)


# ------------------------------------------------------------------------------------------
# SegFormer from pretrained weights


def test_segformer_pretrained_local_path(tmp_path: Path) -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(1)
    source = SegformerForSemanticSegmentation(SegformerConfig(**{**TINY_SEGFORMER, "num_labels": 3}))
    source.save_pretrained(tmp_path / "tiny")

    model = build_model("segformer", 5, {"pretrained": str(tmp_path / "tiny")})

    assert isinstance(model, SegformerSegmenter)
    assert model.training  # from_pretrained returns eval mode; build_model must not
    saved = source.segformer.state_dict()
    loaded = model.model.segformer.state_dict()
    assert saved.keys() == loaded.keys()
    assert torch.equal(loaded["stages.0.patch_embeddings.proj.weight"], saved["stages.0.patch_embeddings.proj.weight"])
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)  # the whole encoder
    assert model.model.decode_head.state_dict()["classifier.weight"].shape[0] == 5  # a new 5-class head
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_segformer_pretrained_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: Any, **kwargs: Any) -> None:
        assert kwargs["local_files_only"] is False
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    # A real attempt without network retries for ~20 s; what matters is how the failure reads.
    monkeypatch.setattr(transformers.SegformerForSemanticSegmentation, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match="no network is available.*local folder"):
        build_model("segformer", 3, {"pretrained": "nvidia/mit-b0"})


def test_segformer_pretrained_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("segformer", 3, {"pretrained": str(tmp_path / "nope")})


def test_segformer_pretrained_and_config_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exclusive"):
        build_model("segformer", 3, {"pretrained": str(tmp_path), "config": TINY_SEGFORMER})


# ------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("name", model_names())
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    model = tiny(name)
    # One training step so the weights and BatchNorm running statistics differ from init.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    optimizer.step()
    path = tmp_path / "ckpt" / "model.pt"
    save_model_state(model, path)

    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == 1
    assert (payload["model"], payload["num_classes"]) == (name, 3)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind

    x = torch.randn(2, 3, 40, 56)
    options = {**TINY_OPTIONS.get(name, {})}
    for restored in (load_model_state(name, 3, options, path), load_checkpoint(path)):
        assert restored.training
        with torch.no_grad():
            assert torch.equal(restored.eval()(x), model.eval()(x))


def test_checkpoint_mismatch_names_file_and_values(tmp_path: Path) -> None:
    path = tmp_path / "unet.pt"
    save_model_state(tiny("unet"), path)
    with pytest.raises(ValueError, match=r"unet\.pt.*num_classes=3.*num_classes=5"):
        load_model_state("unet", 5, TINY_OPTIONS["unet"], path)
    with pytest.raises(ValueError, match=r"unet\.pt.*'unet'.*'segformer'"):
        load_model_state("segformer", 3, TINY_OPTIONS["segformer"], path)
    with pytest.raises(ValueError, match=r"unet\.pt.*does not fit"):
        load_model_state("unet", 3, {"base_channels": 8}, path)


def test_checkpoint_records_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model_state(build_model("unet", 2, {"depth": 2}), path)
    options = torch.load(path, map_location="cpu", weights_only=True)["options"]
    assert options == {"base_channels": 16, "depth": 2, "dropout": 0.1, "norm": "batch"}


def test_options_become_plain_data(tmp_path: Path) -> None:
    from types import MappingProxyType

    config = MappingProxyType({**TINY_SEGFORMER, "depths": (1, 1, 1, 1)})
    save_model_state(build_model("segformer", 2, {"config": config}), tmp_path / "m.pt")
    options = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)["options"]
    assert options["config"]["depths"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="option 'norm' of model 'unet' must be plain data"):
        build_model("unet", 2, {"norm": object()})


def test_save_unwraps_data_parallel(tmp_path: Path) -> None:
    model = tiny("unet")
    save_model_state(nn.DataParallel(model), tmp_path / "m.pt")
    keys = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"].keys()
    assert not any(k.startswith("module.") for k in keys)


def test_save_rejects_foreign_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not built by build_model"):
        save_model_state(nn.Conv2d(3, 2, 1), tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"weights\.pt is not a Shoal model checkpoint"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------
# Learning


def test_unet_learns_a_simple_mask() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    masks = (images[:, 0] > 0.5).long()  # class 1 where the red channel is bright
    model = build_model("unet", 2, {"base_channels": 8})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
