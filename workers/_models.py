"""Segmentation model registry, the built-in models, and checkpoint files.

Every model built here is a ``SegmentationModel``: it maps a normalised image batch
``x: [N, 3, H, W] float32`` to logits ``[N, num_classes, H, W] float32`` at the input resolution,
for any ``H, W``, and offers ``encode(x) -> [N, D, h, w]`` (features for pooled embeddings).

A builder is registered under a name with ``@register_model(name)`` and called as
``builder(num_classes, **options)``; its keyword-only parameters are the model's options, their
defaults the option defaults. ``build_model`` checks option keys against that signature, so a
misspelled option fails loudly instead of being ignored.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from strategies import Registry

if TYPE_CHECKING:
    from transformers import SegformerForSemanticSegmentation

__all__ = [
    "Builder",
    "SegmentationModel",
    "build_model",
    "check_model",
    "load_checkpoint",
    "load_model_state",
    "model_names",
    "register_model",
    "save_model_state",
]


class SegmentationModel(nn.Module):
    """What every registered model is: ``forward`` gives logits, ``encode`` features.

    ``forward(x: [N, 3, H, W] float32) -> logits [N, num_classes, H, W] float32`` for any H, W.
    ``encode(x: [N, 3, H, W] float32) -> features [N, D, h, w] float32`` (h, w model-specific).
    """

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(x)")


Builder = Callable[..., SegmentationModel]
"""``builder(num_classes: int, **options) -> SegmentationModel``; options are keyword-only parameters."""

CHECKPOINT_FORMAT = 1

REGISTRY: Registry[Builder] = Registry("model", positional=1)

# Set on every model that build_model returns, so save_model_state can record how to rebuild it.
_SPEC_ATTR = "_shoal_model_spec"


@dataclass(frozen=True)
class _ModelSpec:
    name: str
    num_classes: int
    options: dict[str, Any]  # every option, defaults filled in


# --------------------------------------------------------------------------------------------
# Registry


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name``; a name registered twice raises ValueError.

    Every parameter of the builder after ``num_classes`` must be keyword-only with a default:
    those are the model's options.
    """
    return lambda builder: REGISTRY.register(name)(builder)


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return REGISTRY.names()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain data (dict, list, str, int, float, bool, None), copied.

    Checkpoints record options and are read with ``torch.load(weights_only=True)``, which only
    unpickles plain data; converting here makes a bad value fail at build time, not at load time.
    """
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where} must be plain data (dict, list, str, number, bool, None), got {type(value).__name__}")


def _resolve(name: str, num_classes: int, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``name``, ``num_classes`` and option keys; return every option with defaults filled."""
    REGISTRY.get(name)  # an unknown name lists the registered ones
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r} (model {name!r})")
    REGISTRY.check_options(name, options or {})
    resolved = REGISTRY.options(name)
    resolved.update(options or {})
    return {key: _plain(value, f"option {key!r} of model {name!r}") for key, value in resolved.items()}


def build_model(name: str, num_classes: int, options: Mapping[str, Any] | None = None) -> SegmentationModel:
    """Build registered model ``name`` with ``num_classes`` output channels, in train mode.

    ``options`` keys must be options of that model (ValueError naming the key otherwise).
    The returned module maps ``x: [N, 3, H, W] float32`` to logits ``[N, num_classes, H, W]``.
    """
    resolved = _resolve(name, num_classes, options)
    model = REGISTRY.get(name)(num_classes, **resolved)
    if not isinstance(model, SegmentationModel):
        # Fails for the builder's author, not later in a scoring worker that calls encode().
        raise TypeError(f"builder of model {name!r} returned {type(model).__name__}, not a SegmentationModel")
    setattr(model, _SPEC_ATTR, _ModelSpec(name, num_classes, resolved))
    return model


def check_model(name: str, options: Mapping[str, Any] | None = None) -> None:
    """Raise ``ValueError`` now for what :func:`build_model` would refuse later, in a training
    worker: an unknown model, an unknown option or a bad option value. The model is built on no
    device (``torch.device("meta")``: no memory, no weights copied), so this costs about a second."""
    with torch.device("meta"):
        build_model(name, 2, options)


# --------------------------------------------------------------------------------------------
# UNet


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # Up to 8 groups that divide the channel count: GroupNorm needs an exact split.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; keeps H, W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        # No conv bias: the norm that follows has its own shift.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(SegmentationModel):
    """Small UNet: ``depth`` max-pool downsamplings, channels doubling from ``base_channels``.

    Inputs of any ``H, W`` are padded (edge replication) on the bottom/right to a multiple of
    ``2**depth`` and the logits are cropped back, so the output is always ``[N, C, H, W]``.
    """

    def __init__(self, num_classes: int, base_channels: int, depth: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = _DoubleConv(3, widths[0], norm)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _DoubleConv(widths[i], widths[i + 1], norm)) for i in range(depth)
        )
        # Dropout2d drops whole feature maps; kept in the bottleneck so Monte-Carlo dropout
        # (dropout on at inference) perturbs the most global features.
        self.dropout = nn.Dropout2d(dropout)
        self.ups = nn.ModuleList(
            _DoubleConv(widths[i + 1] + widths[i], widths[i], norm) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        pad_h = -x.shape[-2] % multiple
        pad_w = -x.shape[-1] % multiple
        if pad_h == 0 and pad_w == 0:
            return x
        # Replicate rather than zero-pad: no artificial edge, and works for any size >= 1.
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

    def _encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(self._pad(x))]
        for down in self.downs:
            features.append(down(features[-1]))
        return features

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features ``[N, base_channels * 2**depth, ceil(H / 2**depth), ceil(W / 2**depth)]``.

        Taken before the bottleneck dropout, so embeddings do not change when dropout is
        switched on for Monte-Carlo scoring.
        """
        return self._encoder(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, 3, H, W] float32`` -> logits ``[N, num_classes, H, W]``."""
        height, width = x.shape[-2:]
        *skips, y = self._encoder(x)
        y = self.dropout(y)
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        return self.head(y)[..., :height, :width]


@register_model("unet")
def _build_unet(
    num_classes: int,
    *,
    base_channels: int = 16,
    depth: int = 3,
    dropout: float = 0.1,
    norm: str = "batch",
) -> SegmentationModel:
    if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels < 1:
        raise ValueError(f"unet option 'base_channels' must be an int >= 1, got {base_channels!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"unet option 'depth' must be an int >= 1, got {depth!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"unet option 'dropout' must be in [0, 1), got {dropout!r}")
    if norm not in ("batch", "group"):
        raise ValueError(f"unet option 'norm' must be 'batch' or 'group', got {norm!r}")
    return UNet(num_classes, base_channels, depth, float(dropout), norm)


# --------------------------------------------------------------------------------------------
# SegFormer

# MiT-b0 sized; SegformerConfig keys. num_labels is not here: it comes from num_classes.
_SEGFORMER_DEFAULTS: dict[str, Any] = {
    "hidden_sizes": [32, 64, 160, 256],
    "depths": [2, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "decoder_hidden_size": 256,
}
# Set by the wrapper: the class count comes from num_classes, and forward/encode rely on the
# output being a dataclass with a 4-D last hidden state.
_SEGFORMER_FIXED_KEYS = frozenset({"num_labels", "id2label", "label2id", "return_dict", "reshape_last_stage"})
# Bookkeeping fields of every transformers config, not architecture.
_SEGFORMER_META_KEYS = frozenset({"architectures", "model_type", "transformers_version"})


class SegformerSegmenter(SegmentationModel):
    """Wraps ``transformers.SegformerForSemanticSegmentation`` to give logits at input size."""

    def __init__(self, model: SegformerForSemanticSegmentation) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, 3, H, W] float32`` -> logits ``[N, num_classes, H, W]``.

        SegFormer predicts at 1/4 of the input size; the logits are upsampled bilinearly
        (before any softmax, as the SegFormer paper and HF's own loss do).
        """
        logits = self.model(pixel_values=x).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Last encoder hidden state ``[N, hidden_sizes[-1], ~H/32, ~W/32]``."""
        return self.model.segformer(pixel_values=x).last_hidden_state


def _looks_like_local_path(name: str) -> bool:
    # Hub ids look like "org/name", as do relative paths; only these forms are surely paths.
    return os.path.isabs(name) or name.startswith((".", "~"))


def _load_pretrained_segformer(pretrained: str, num_classes: int) -> SegformerForSemanticSegmentation:
    from transformers import SegformerForSemanticSegmentation

    local = os.path.expanduser(pretrained)
    if os.path.exists(local):
        # ignore_mismatched_sizes: an encoder checkpoint (or one with another class count)
        # loads its encoder and gets a freshly initialised num_classes head.
        model = SegformerForSemanticSegmentation.from_pretrained(
            local, num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True
        )
        return model
    if _looks_like_local_path(pretrained):
        raise FileNotFoundError(f"segformer option 'pretrained' is a path that does not exist: {pretrained!r}")
    try:
        model = SegformerForSemanticSegmentation.from_pretrained(
            pretrained, num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=False
        )
    except OSError as err:  # transformers reports unreachable or missing hub files as OSError
        raise RuntimeError(
            f"cannot load SegFormer weights {pretrained!r}: they are not in the local cache and"
            " no network is available to reach the model hub. Download them where there is"
            " network (SegformerForSemanticSegmentation.from_pretrained(...).save_pretrained(dir))"
            f" and pass the local folder as options {{'pretrained': '/path/to/dir'}}. Cause: {err}"
        ) from err
    return model


@register_model("segformer")
def _build_segformer(
    num_classes: int,
    *,
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> SegmentationModel:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    if pretrained is not None:
        if config is not None:
            # The architecture comes from the checkpoint; overrides would silently re-initialise
            # every mismatched weight (ignore_mismatched_sizes), so refuse them.
            raise ValueError("segformer options 'pretrained' and 'config' are exclusive; pass one")
        model = _load_pretrained_segformer(pretrained, num_classes)
    else:
        overrides = dict(config or {})
        taken = sorted(set(overrides) & _SEGFORMER_FIXED_KEYS)
        if taken:
            raise ValueError(
                f"segformer option config[{taken[0]!r}] is not allowed: the wrapper sets"
                f" {', '.join(sorted(_SEGFORMER_FIXED_KEYS))} (num_labels from num_classes)"
            )
        valid = {
            key
            for key in SegformerConfig().to_dict()
            if not key.startswith("_") and key not in _SEGFORMER_META_KEYS | _SEGFORMER_FIXED_KEYS
        }
        unknown = sorted(set(overrides) - valid)
        if unknown:
            # SegformerConfig keeps unknown kwargs as attributes without complaint.
            raise ValueError(
                f"unknown key {unknown[0]!r} in segformer option 'config'; valid: {', '.join(sorted(valid))}"
            )
        hf_config = SegformerConfig(**{**_SEGFORMER_DEFAULTS, **overrides, "num_labels": num_classes})
        model = SegformerForSemanticSegmentation(hf_config)
    wrapper = SegformerSegmenter(model)
    # from_pretrained returns eval mode, a fresh model train mode: make both paths alike.
    wrapper.train()
    return wrapper


# --------------------------------------------------------------------------------------------
# Checkpoints


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the model in .module, torch.compile in
    # ._orig_mod; saving the inner model keeps state_dict keys free of their prefixes.
    while not isinstance(model.__dict__.get(_SPEC_ATTR), _ModelSpec):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            break
    return model


def save_model_state(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model`` (built by ``build_model``) to the checkpoint file ``path``, atomically.

    The file holds ``{"format": 1, "model": name, "num_classes": int, "options": dict,
    "state_dict": {name: tensor on CPU}}``. It is written to a temporary file in the same
    directory, fsynced and renamed over ``path``, so a reader never sees a partial file.
    """
    model = _unwrap(model)
    spec = model.__dict__.get(_SPEC_ATTR)
    if not isinstance(spec, _ModelSpec):
        raise ValueError(
            f"cannot save {type(model).__name__} to {os.fspath(path)}: it was not built by"
            " build_model(), so its model name and options are unknown"
        )
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": spec.name,
        "num_classes": spec.num_classes,
        "options": spec.options,
        "state_dict": state_dict,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    # Make the rename itself durable; best effort (not every filesystem allows it).
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{os.fspath(path)} is not a Shoal model checkpoint of format {CHECKPOINT_FORMAT}"
            f" (found format {found!r}); write it with save_model_state()"
        )
    missing = {"model", "num_classes", "options", "state_dict"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint {os.fspath(path)} lacks fields: {', '.join(sorted(missing))}")
    return payload


def _restore(payload: dict[str, Any], model: SegmentationModel, path: str | os.PathLike[str]) -> SegmentationModel:
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {os.fspath(path)} does not fit model {payload['model']!r} built with"
            f" options {getattr(model, _SPEC_ATTR).options!r} (saved with options"
            f" {payload['options']!r}): {err}"
        ) from err
    return model


def load_model_state(
    name: str,
    num_classes: int,
    options: Mapping[str, Any] | None,
    path: str | os.PathLike[str],
) -> SegmentationModel:
    """Build ``name`` with ``num_classes`` and ``options`` and load the weights saved at ``path``.

    Raises ValueError naming the file if it holds another model or class count. The model is
    returned on CPU in train mode, like ``build_model``.
    """
    payload = _read_checkpoint(path)
    if payload["model"] != name or payload["num_classes"] != num_classes:
        raise ValueError(
            f"checkpoint {os.fspath(path)} holds model {payload['model']!r} with num_classes="
            f"{payload['num_classes']}, but model {name!r} with num_classes={num_classes} was asked for"
        )
    return _restore(payload, build_model(name, num_classes, options), path)


def load_checkpoint(path: str | os.PathLike[str]) -> SegmentationModel:
    """Rebuild the model saved at ``path`` from the checkpoint's own name, classes and options."""
    payload = _read_checkpoint(path)
    model = build_model(payload["model"], payload["num_classes"], payload["options"])
    return _restore(payload, model, path)
