"""Segment Anything in Shoal: building and loading SAM, embeddings through the cache, prompts to masks.

One code path for real and test models: ``build_sam(model_type, checkpoint)`` constructs the
architecture registered under ``model_type`` (``vit_b``, ``vit_l``, ``vit_h`` as in
``segment_anything.sam_model_registry``; ``tiny``, a two-block SAM from ``segment_anything.modeling``
for tests and benchmarks) and loads the state dict with ``torch.load(weights_only=True)``.

:class:`SamEngine` is SAM inside one process (a Ray actor or task): it takes image embeddings from the
:class:`~workers._sam_cache.EmbeddingCache` or computes and stores them, turns a rough class-id mask
into prompts, sends all prompts of an image through the prompt encoder and mask decoder in batches
(what ``SamPredictor.predict_torch`` does, on a cached embedding), and from SAM's masks computes
agreement columns or a refined class-id mask (a pre-annotation). :func:`finetune_decoder` tunes the
mask decoder on labeled masks with both encoders frozen.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from strategies import Registry

from ._data import load_image
from ._prompts import ImagePrompts, PromptSpec, agreement_columns, component_iou, jitter_prompts, prompts_from_mask
from ._sam_cache import EmbeddingCache, SamEmbedding, checkpoint_digest, file_digest

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from ._data import ClassInfo

__all__ = [
    "SamEngine",
    "SamFinetuneSpec",
    "SamSpec",
    "build_sam",
    "finetune_decoder",
    "load_decoder",
    "new_sam",
    "register_sam_model",
    "sam_checkpoint_id",
    "sam_model_types",
]

log = logging.getLogger(__name__)

SamBuilder = Callable[[], "Sam"]
"""``builder() -> Sam`` with random weights, in eval mode."""

REGISTRY: Registry[SamBuilder] = Registry("SAM model type")

OFFICIAL_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
_ENCODER_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def register_sam_model(name: str) -> Callable[[SamBuilder], SamBuilder]:
    """Decorator adding a SAM architecture under ``name``; a name registered twice raises."""
    return lambda builder: REGISTRY.register(name)(builder)


def sam_model_types() -> list[str]:
    return REGISTRY.names()


def _official(name: str) -> Sam:
    from segment_anything import sam_model_registry

    return sam_model_registry[name](checkpoint=None)


for _name in OFFICIAL_CHECKPOINTS:
    register_sam_model(_name)(partial(_official, _name))


@register_sam_model("tiny")
def build_tiny_sam() -> Sam:
    """A SAM with the official structure at toy size: 128 px input, patch 16, a two-block 32-wide
    ViT, 32-dim prompts, a one-layer two-way transformer (82k parameters, ~20 ms per image on CPU).
    No weights exist for it: tests and benchmarks save its random state dict and load it back."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, patch, prompt_dim = 128, 16, 32
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=prompt_dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
            use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size), mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_dim, iou_head_depth=2, iou_head_hidden_dim=32,
        ),
    ).eval()


def new_sam(model_type: str) -> Sam:
    """The ``model_type`` architecture with random weights (what :func:`build_sam` loads into)."""
    return REGISTRY.get(model_type)().eval()


def _guess_model_type(state: Mapping[str, Any]) -> str | None:
    weight = state.get("image_encoder.patch_embed.proj.weight")
    return _ENCODER_WIDTHS.get(int(weight.shape[0])) if isinstance(weight, torch.Tensor) else None


def build_sam(model_type: str, checkpoint: str | os.PathLike[str]) -> Sam:
    """SAM of ``model_type`` with the weights in ``checkpoint`` (a state dict, e.g. the official
    ``sam_vit_b_01ec64.pth``), loaded with ``torch.load(weights_only=True)``; eval mode, on CPU.

    Raises FileNotFoundError for a missing file and ValueError naming the file and the model type
    when the file is not a state dict or its keys or shapes do not fit the architecture.
    """
    model = new_sam(model_type)
    path = Path(checkpoint)
    if not path.is_file():
        hint = f" (the official weights are {OFFICIAL_CHECKPOINTS[model_type]})" if model_type in OFFICIAL_CHECKPOINTS else ""
        raise FileNotFoundError(f"SAM checkpoint not found: {path} (sam.checkpoint for sam.model_type {model_type!r}){hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"SAM checkpoint {path}: not a state dict torch.load(weights_only=True) can read ({exc})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SAM checkpoint {path}: expected a state dict of tensors, got {type(state).__name__}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            problems.append(f"{len(shapes)} tensors of another shape (e.g. {k}: {list(state[k].shape)} in the file, "
                            f"{list(expected[k].shape)} in {model_type})")
        guess = _guess_model_type(state)
        hint = f"; it looks like a {guess!r} checkpoint: set sam.model_type: {guess}" if guess and guess != model_type else ""
        raise ValueError(f"SAM checkpoint {path} does not fit sam.model_type {model_type!r}: {', '.join(problems)}{hint}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def sam_checkpoint_id(model_type: str, checkpoint: str | os.PathLike[str]) -> str:
    """The identity of a SAM's weights for the embedding cache: ``<model_type>-<sha256[:16]>``."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint} (sam.checkpoint)")
    return f"{model_type}-{checkpoint_digest(checkpoint)[:16]}"


def load_decoder(model: Sam, path: str | os.PathLike[str]) -> None:
    """Replace ``model``'s mask decoder weights with a tuned decoder's state dict at ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.mask_decoder.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class SamFinetuneSpec:
    """Mask decoder fine-tuning (the ``sam.finetune`` config section)."""

    enabled: bool = False
    steps: int = 200
    lr: float = 1e-4
    prompts_per_step: int = 16
    box_jitter: float = 0.1
    holdout_fraction: float = 0.2


@dataclass(frozen=True)
class SamSpec:
    """Everything a SAM worker needs; built from the ``sam`` config section by :meth:`from_config`."""

    model_type: str
    checkpoint: str
    cache_uri: str
    """Root of the embedding cache: a directory or a pyarrow filesystem URI."""
    prompts: PromptSpec = field(default_factory=PromptSpec)
    multimask_output: bool = False
    """Ask SAM for three masks per prompt and keep the one with the highest predicted IoU (for
    ambiguous single-point prompts); one mask otherwise."""
    embed_batch_size: int = 4
    """Images per image-encoder forward pass."""
    prompt_batch_size: int = 64
    """Prompts per mask-decoder call (bounds memory: the decoder copies the embedding per prompt)."""
    finetune: SamFinetuneSpec = field(default_factory=SamFinetuneSpec)

    @classmethod
    def from_config(cls, values: Mapping[str, Any], cache_uri: str) -> SamSpec:
        """From the ``sam`` config section as a mapping (``dataclasses.asdict(cfg.sam)``); the
        section's ``cache_uri`` is resolved by the caller (default: ``<workdir>/sam_cache``)."""
        v = dict(values)
        v.pop("enabled", None)
        v.pop("cache_uri", None)
        checkpoint = v.pop("checkpoint", None)
        if checkpoint is None:
            raise ValueError("sam.checkpoint: required to use SAM (a path to the official weights of sam.model_type)")
        prompts = PromptSpec(**v.pop("prompts", {}))
        finetune = SamFinetuneSpec(**v.pop("finetune", {}))
        return cls(checkpoint=os.path.abspath(checkpoint), cache_uri=cache_uri, prompts=prompts, finetune=finetune, **v)

    def checkpoint_id(self) -> str:
        """:func:`sam_checkpoint_id` of this checkpoint (hashed once per process and file version)."""
        return sam_checkpoint_id(self.model_type, self.checkpoint)


# --------------------------------------------------------------------------------------------
# The engine


def _nearest(values: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``values`` [h, w] resized to ``out_hw`` by nearest neighbour (pixel centres), any dtype."""
    h, w = values.shape
    rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * h / out_hw[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * w / out_hw[1]).astype(np.int64), w - 1)
    return values[rows[:, None], cols[None, :]]


class SamEngine:
    """SAM in one process: the model (with an optional tuned decoder) and its embedding cache.

    ``images_encoded`` counts images that went through the image encoder (cache misses).
    """

    def __init__(self, spec: SamSpec, checkpoint_id: str, device: str | torch.device = "cpu",
                 decoder: str | None = None) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.spec = spec
        self.device = torch.device(device)
        self.sam = build_sam(spec.model_type, spec.checkpoint).to(self.device)
        if decoder is not None:
            load_decoder(self.sam, decoder)
        self.img_size = int(self.sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)
        self.cache = EmbeddingCache(spec.cache_uri, checkpoint_id)
        self.images_encoded = 0

    # -- embeddings ------------------------------------------------------------------------------

    def embed(self, images: Sequence[np.ndarray]) -> list[SamEmbedding]:
        """Run the image encoder on uint8 RGB images ``[H, W, 3]`` (any sizes), ``embed_batch_size`` at a time."""
        out: list[SamEmbedding] = []
        size = self.spec.embed_batch_size
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            inputs, input_hws = [], []
            for image in chunk:
                resized = self.transform.apply_image(image)
                input_hws.append((int(resized.shape[0]), int(resized.shape[1])))
                x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float()
                inputs.append(self.sam.preprocess(x))  # normalise, pad to img_size x img_size
            with torch.no_grad():
                features = self.sam.image_encoder(torch.stack(inputs))
            self.images_encoded += len(chunk)
            out += [SamEmbedding(f.half().cpu().numpy(), hw, (int(im.shape[0]), int(im.shape[1])))
                    for f, hw, im in zip(features, input_hws, chunk)]
        return out

    def embeddings(self, paths: Sequence[str]) -> tuple[list[SamEmbedding], np.ndarray]:
        """The embeddings of the images at ``paths`` and bool [N], True where the cache had it.

        Misses are decoded at their own size, encoded ``embed_batch_size`` at a time and stored;
        the same file content twice in ``paths`` is encoded once.
        """
        digests = [file_digest(p) for p in paths]
        found: dict[str, SamEmbedding] = {}
        missing: dict[str, str] = {}
        cached = np.zeros(len(paths), dtype=bool)
        for i, (path, digest) in enumerate(zip(paths, digests)):
            if digest in found or digest in missing:
                cached[i] = digest in found
                continue
            entry = self.cache.get(digest)
            if entry is None:
                missing[digest] = str(path)
            else:
                found[digest] = entry
                cached[i] = True
        todo = list(missing.items())
        size = self.spec.embed_batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            for (digest, _), entry in zip(chunk, self.embed([load_image(p) for _, p in chunk])):
                self.cache.put(digest, entry)
                found[digest] = entry
        return [found[d] for d in digests], cached

    # -- prompts to masks ------------------------------------------------------------------------

    def _input_frame(self, prompts: ImagePrompts, entry: SamEmbedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes [K, 4], point coords [K, P, 2] and labels [K, P] in SAM's input frame.

        Prompts live in the mask's frame (``prompts.hw``, e.g. data.image_size); SAM embedded the
        image at its own size (``entry.original_hw``) resized to ``entry.input_hw``.
        """
        (mh, mw), (oh, ow), (ih, iw) = prompts.hw, entry.original_hw, entry.input_hw
        sx, sy = ow / mw, oh / mh
        boxes = prompts.boxes.astype(np.float64)
        # A box spans its pixels' footprints; a point is a pixel's centre.
        boxes = np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 2] + 1) * sx - 1, (boxes[:, 3] + 1) * sy - 1], 1)
        points = prompts.points.astype(np.float64)
        points = np.stack([(points[..., 0] + 0.5) * sx - 0.5, (points[..., 1] + 0.5) * sy - 0.5], -1)
        scale = np.array([iw / ow, ih / oh] * 2)  # ResizeLongestSide.apply_coords
        return (
            torch.as_tensor(boxes * scale, dtype=torch.float32, device=self.device),
            torch.as_tensor(points * scale[:2], dtype=torch.float32, device=self.device),
            torch.as_tensor(prompts.labels, dtype=torch.int64, device=self.device),
        )

    def _upscale(self, low_res: torch.Tensor, input_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
        """Low-res logits [K, 1, l, l] (covering the padded img_size square) -> [K, *out_hw] over the
        image only: one bilinear resampling, instead of SAM's upsample to img_size, crop, resize."""
        (ih, iw), (oh, ow) = input_hw, out_hw
        ys = ((torch.arange(oh, device=low_res.device) + 0.5) * ih / oh) / self.img_size * 2 - 1
        xs = ((torch.arange(ow, device=low_res.device) + 0.5) * iw / ow) / self.img_size * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        out = F.grid_sample(low_res.transpose(0, 1), grid.to(low_res.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out[0]

    def logits(self, entry: SamEmbedding, prompts: ImagePrompts, out_hw: tuple[int, int] | None = None,
               *, grad: bool = False) -> torch.Tensor:
        """SAM's mask logits [K, *out_hw] (default: the prompts' frame) for every prompt of one image,
        ``prompt_batch_size`` prompts per decoder call; ``> 0`` is SAM's mask."""
        out_hw = out_hw or prompts.hw
        if len(prompts) == 0:
            return torch.zeros((0, *out_hw), device=self.device)
        features = torch.as_tensor(entry.features, device=self.device).float()[None]
        boxes, coords, labels = self._input_frame(prompts, entry)
        outs = []
        with torch.set_grad_enabled(grad):
            dense_pe = self.sam.prompt_encoder.get_dense_pe()
            for start in range(0, len(prompts), self.spec.prompt_batch_size):
                rows = slice(start, start + self.spec.prompt_batch_size)
                points = (coords[rows], labels[rows]) if coords.shape[1] else None
                sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes[rows], masks=None)
                low_res, iou = self.sam.mask_decoder(
                    image_embeddings=features, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense, multimask_output=self.spec.multimask_output,
                )
                if low_res.shape[1] > 1:  # keep the mask SAM rates best
                    best = iou.argmax(1)
                    low_res = low_res[torch.arange(len(best)), best][:, None]
                outs.append(self._upscale(low_res, entry.input_hw, out_hw))
        return torch.cat(outs)

    def masks(self, entry: SamEmbedding, prompts: ImagePrompts) -> np.ndarray:
        """bool [K, H, W]: SAM's mask for every prompt, in the prompts' frame."""
        return (self.logits(entry, prompts) > self.sam.mask_threshold).cpu().numpy()

    # -- what the scorer and the pre-annotator need ----------------------------------------------

    def agreement(self, paths: Sequence[str], predictions: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
        """Per-image SAM columns (``strategies.columns``) for images at ``paths`` whose predicted
        class-id masks are ``predictions`` (int [N, h, w])."""
        from strategies import columns as col

        entries, cached = self.embeddings(paths)
        rows = []
        for entry, pred in zip(entries, predictions):
            prompts = prompts_from_mask(pred, self.spec.prompts)
            rows.append(agreement_columns(prompts, component_iou(prompts, self.masks(entry, prompts)), num_classes))
        out = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]} if rows else {}
        out[col.SAM_EMBEDDING_CACHED] = cached.astype(np.float64)
        return out

    def refine(self, path: str, prediction: np.ndarray, ignore_index: int) -> np.ndarray:
        """A pre-annotation: uint8 [H, W] class ids at the image's own size.

        Every prompted component of ``prediction`` (int [h, w], the model's class ids) is replaced
        by SAM's mask for it, with the component's class; larger components are painted first, so
        small objects stay on top. Pixels the model gave to a prompted component that no SAM mask
        claims take the first of ``prompts.skip_classes`` (the background class, by convention), or
        ``ignore_index`` (unlabeled: the annotator decides) when no class is skipped. Unprompted
        regions (skipped classes, components below the minimum area) keep the model's class.
        """
        entry = self.embeddings([path])[0][0]
        prompts = prompts_from_mask(prediction, self.spec.prompts)
        hw = entry.original_hw
        base = _nearest(np.asarray(prediction), hw)
        prompted = _nearest(prompts.components, hw) > 0
        skip = self.spec.prompts.skip_classes
        out = np.where(prompted, skip[0] if skip else ignore_index, base)
        order = np.argsort(-prompts.areas, kind="stable")
        for start in range(0, len(order), self.spec.prompt_batch_size):
            rows = order[start:start + self.spec.prompt_batch_size]
            chunk = prompts.take(rows)
            masks = (self.logits(entry, chunk, hw) > self.sam.mask_threshold).cpu().numpy()
            for k in range(len(chunk)):
                out[masks[k]] = chunk.class_ids[k]
        if out.max(initial=0) > 255:
            raise ValueError(f"{path}: class id {int(out.max())} does not fit an 8-bit pre-annotation PNG")
        return out.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Decoder fine-tuning


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of binary cross-entropy plus soft Dice loss; ``logits``, ``target`` [K, H, W]."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def _mean_iou(engine: SamEngine, items: Sequence[tuple[SamEmbedding, ImagePrompts]]) -> float:
    """Mean over every prompt of ``items`` of the IoU between SAM's mask and the labeled component."""
    ious = [component_iou(p, engine.masks(e, p)) for e, p in items if len(p)]
    return float(np.concatenate(ious).mean()) if ious else float("nan")


def finetune_decoder(
    spec: SamSpec,
    checkpoint_id: str,
    sample_ids: Sequence[str],
    image_paths: Sequence[str],
    mask_paths: Sequence[str],
    classes: ClassInfo,
    image_size: tuple[int, int],
    out_path: str,
    *,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Fine-tune SAM's mask decoder on labeled masks; write its state dict to ``out_path``.

    The image and prompt encoders stay frozen and embeddings come from the cache, so a step costs
    one decoder pass. Prompts come from the labeled masks (loaded at ``image_size``) with jitter
    (:func:`~workers._prompts.jitter_prompts`). ``holdout_fraction`` of the images (at least one when
    there are two or more) are held out; the mean mask IoU over their prompts, before and after
    tuning, is returned with the decoder path and counts. Always starts from the checkpoint's decoder.
    """
    from ._data import load_mask

    t0 = time.perf_counter()
    tune = spec.finetune
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    engine = SamEngine(spec, checkpoint_id, device)
    entries, _ = engine.embeddings(list(image_paths))
    items = []
    for entry, mask_path in zip(entries, mask_paths):
        mask = load_mask(str(mask_path), classes, size=tuple(image_size))  # type: ignore[arg-type]
        items.append((entry, prompts_from_mask(mask, spec.prompts, ignore_index=classes.ignore_index)))
    order = np.argsort(np.asarray(sample_ids, dtype=str), kind="stable")
    order = order[rng.permutation(len(order))]
    n_holdout = min(max(round(tune.holdout_fraction * len(items)), 1), len(items) - 1) if len(items) > 1 else 0
    holdout = [items[i] for i in order[:n_holdout]]
    train = [items[i] for i in order[n_holdout:] if len(items[i][1])]
    before = _mean_iou(engine, holdout)

    decoder = engine.sam.mask_decoder
    for p in engine.sam.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=tune.lr)
    decoder.train()
    losses = []
    for _ in range(tune.steps if train else 0):
        entry, prompts = train[int(rng.integers(len(train)))]
        rows = rng.choice(len(prompts), size=min(tune.prompts_per_step, len(prompts)), replace=False)
        batch = jitter_prompts(prompts.take(rows), rng, tune.box_jitter)
        target = torch.as_tensor(np.stack([batch.mask(k) for k in range(len(batch))]), dtype=torch.float32,
                                 device=engine.device)
        loss = _dice_bce(engine.logits(entry, batch, grad=True), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    decoder.eval()
    after = _mean_iou(engine, holdout)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=out.name, suffix=".tmp", delete=False) as fh:
        torch.save(decoder.state_dict(), fh)
    os.replace(fh.name, out)
    result = {
        "decoder_path": str(out), "val_iou_before": before, "val_iou_after": after,
        "train_images": len(train), "holdout_images": len(holdout),
        "train_prompts": int(sum(len(p) for _, p in train)), "holdout_prompts": int(sum(len(p) for _, p in holdout)),
        "steps": len(losses), "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "images_encoded": engine.images_encoded, "seconds": time.perf_counter() - t0,
    }
    log.info("SAM decoder fine-tuned: held-out mask IoU %.3f -> %.3f over %d prompts", before, after,
             result["holdout_prompts"])
    return result
