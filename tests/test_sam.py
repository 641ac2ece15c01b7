"""SAM without Ray: loading checkpoints, the embedding cache, prompts to masks, agreement,
pre-annotations, decoder fine-tuning and the extended scoring pass's batch function.

Every test uses the ``tiny`` SAM (128 px, two ViT blocks) with random weights, saved to a file and
loaded back through the same loader as the official weights.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from strategies import columns as col
from workers import (
    EmbeddingCache,
    PassScorer,
    PassSpec,
    PromptSpec,
    SamEngine,
    SamFinetuneSpec,
    SamSpec,
    build_model,
    build_sam,
    finetune_decoder,
    new_sam,
    prompts_from_mask,
    read_embeddings,
    sam_checkpoint_id,
    sam_model_types,
)


def tiny_checkpoint(path: Path, seed: int = 0) -> str:
    """A random tiny SAM's state dict saved at ``path`` (what tests use instead of official weights)."""
    torch.manual_seed(seed)
    torch.save(new_sam("tiny").state_dict(), path)
    return str(path)


def scene(seed: int, hw: tuple[int, int] = (96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB image and its class-id mask: a class-1 rectangle and a class-2 disk on class 0."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (*hw, 3), dtype=np.uint8)
    mask = np.zeros(hw, np.uint8)
    x, y = 8 + seed % 5 * 4, 10 + seed % 3 * 6
    mask[y:y + 30, x:x + 40] = 1
    cv2.circle(mask, (90 - seed % 4 * 5, 55), 14, 2, thickness=-1)
    image[mask == 1] = (200, 60, 40)
    image[mask == 2] = (40, 180, 220)
    return image, mask


def write_scenes(root: Path, n: int) -> tuple[list[str], list[str]]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    images, masks = [], []
    for i in range(n):
        image, mask = scene(i)
        images.append(str(root / "images" / f"s{i}.png"))
        masks.append(str(root / "masks" / f"s{i}.png"))
        cv2.imwrite(images[-1], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(masks[-1], mask)
    return images, masks


@pytest.fixture()
def spec(tmp_path: Path) -> SamSpec:
    return SamSpec(model_type="tiny", checkpoint=tiny_checkpoint(tmp_path / "tiny.pt"), cache_uri=str(tmp_path / "cache"),
                   prompts=PromptSpec(skip_classes=(0,), min_area_px=8), embed_batch_size=2)


def count_encoder_calls(engine: SamEngine) -> list[int]:
    """Images seen by the image encoder, counted by a forward hook (not the engine's own counter)."""
    seen = [0]
    engine.sam.image_encoder.register_forward_hook(lambda module, args, out: seen.__setitem__(0, seen[0] + len(args[0])))
    return seen


# -- loading ------------------------------------------------------------------------------------------


def test_build_sam_loads_the_saved_weights(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path / "tiny.pt", seed=3)
    torch.manual_seed(3)
    reference = new_sam("tiny").state_dict()
    loaded = build_sam("tiny", path)
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert {"vit_b", "vit_l", "vit_h", "tiny"} <= set(sam_model_types())
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'.*registered: tiny, vit_b"):
        build_sam("vit_x", path)


def test_missing_and_mismatched_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pth .*sam\.model_type 'vit_b'.*sam_vit_b_01ec64\.pth"):
        build_sam("vit_b", tmp_path / "missing.pth")
    state = new_sam("tiny").state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)  # a vit_b patch embedding
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt does not fit sam\.model_type 'tiny': 1 missing keys "
                                         r"\(e\.g\. mask_decoder\.iou_token\.weight\), 1 tensors of another shape.*"
                                         r"looks like a 'vit_b' checkpoint"):
        build_sam("tiny", tmp_path / "odd.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a state dict torch\.load\(weights_only=True\) can read"):
        build_sam("tiny", tmp_path / "garbage.pt")
    torch.save({"model": {"a": 1}}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        build_sam("tiny", tmp_path / "nested.pt")


def test_checkpoint_id_follows_the_file_content(tmp_path: Path) -> None:
    a = sam_checkpoint_id("tiny", tiny_checkpoint(tmp_path / "a.pt", seed=0))
    assert a.startswith("tiny-") and a == sam_checkpoint_id("tiny", tmp_path / "a.pt")
    shutil.copyfile(tmp_path / "a.pt", tmp_path / "b.pt")
    assert sam_checkpoint_id("tiny", tmp_path / "b.pt") == a  # same bytes, same id, wherever the file lies
    assert sam_checkpoint_id("tiny", tiny_checkpoint(tmp_path / "a.pt", seed=1)) != a  # rewritten file


# -- the embedding cache ------------------------------------------------------------------------------


def test_cache_hits_skip_the_encoder_and_a_changed_image_misses(tmp_path: Path, spec: SamSpec) -> None:
    paths, _ = write_scenes(tmp_path / "data", 4)
    ckpt = spec.checkpoint_id()
    cold = SamEngine(spec, ckpt)
    calls = count_encoder_calls(cold)
    first, cached = cold.embeddings(paths + paths[:1])  # a duplicate is encoded once
    assert calls[0] == 4 and cold.images_encoded == 4 and not cached.any()
    assert first[0].features.dtype == np.float16 and first[0].features.shape == (32, 8, 8)
    assert first[0].original_hw == (96, 128) and first[0].input_hw == (96, 128)

    warm = SamEngine(spec, ckpt)  # a later round: another process, same cache
    calls = count_encoder_calls(warm)
    again, cached = warm.embeddings(paths)
    assert calls[0] == 0 and cached.all() and warm.cache.hits == 4
    for a, b in zip(first, again):
        assert np.array_equal(a.features, b.features)

    image, _ = scene(7)
    cv2.imwrite(paths[2], image)  # the image's content changed: re-embedded
    _, cached = warm.embeddings(paths)
    assert calls[0] == 1 and cached.tolist() == [True, True, False, True]

    other = SamEngine(spec, "tiny-otherweights")  # another checkpoint never reads these entries
    _, cached = other.embeddings(paths[:1])
    assert not cached.any()


def test_cache_files_are_sharded_atomic_and_damage_is_a_miss(tmp_path: Path, spec: SamSpec) -> None:
    from workers._sam_cache import file_digest

    paths, _ = write_scenes(tmp_path / "data", 2)
    engine = SamEngine(spec, "tiny-abc")
    engine.embeddings(paths)
    digest = file_digest(paths[0])
    entry = tmp_path / "cache" / "tiny-abc" / digest[:2] / f"{digest}.npz"
    assert entry.is_file() and digest in engine.cache
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated file
    cache = EmbeddingCache(str(tmp_path / "cache"), "tiny-abc")
    assert cache.get(digest) is None and cache.misses == 1
    _, cached = engine.embeddings(paths)
    assert cached.tolist() == [False, True] and cache.get(digest) is not None  # rewritten


# -- prompts to masks ---------------------------------------------------------------------------------


def test_prompts_map_to_sam_input_frame_and_logits_match_sam_postprocessing(tmp_path: Path, spec: SamSpec) -> None:
    paths, masks = write_scenes(tmp_path / "data", 1)
    engine = SamEngine(spec, "tiny-x")
    entry = engine.embeddings(paths)[0][0]
    small = cv2.resize(cv2.imread(masks[0], cv2.IMREAD_UNCHANGED), (64, 48), interpolation=cv2.INTER_NEAREST)
    prompts = prompts_from_mask(small, spec.prompts)
    boxes, coords, labels = engine._input_frame(prompts, entry)
    # 48 x 64 mask -> 96 x 128 image (x2) -> 96 x 128 SAM input (x1): a box spans its pixels' footprints
    x0, y0, x1, y1 = prompts.boxes[0]
    assert boxes[0].tolist() == [2 * x0, 2 * y0, 2 * x1 + 1, 2 * y1 + 1]
    assert coords[0, 0].tolist() == [2 * prompts.points[0, 0, 0] + 0.5, 2 * prompts.points[0, 0, 1] + 0.5]
    logits = engine.logits(entry, prompts, out_hw=(96, 128))
    assert logits.shape == (len(prompts), 96, 128) and torch.isfinite(logits).all()
    # Our one-step resampling equals SAM's upsample-crop-resize where the sizes agree.
    low = torch.randn(3, 1, 32, 32)
    ours = engine._upscale(low, entry.input_hw, entry.original_hw)
    theirs = engine.sam.postprocess_masks(low, entry.input_hw, entry.original_hw)[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert engine.masks(entry, prompts).shape == (len(prompts), 48, 64)


def _answer_with(engine: SamEngine, monkeypatch: pytest.MonkeyPatch, respond) -> None:  # type: ignore[no-untyped-def]
    """Make SAM answer every prompt with ``respond(prompts, k) -> bool mask`` (in the prompts' frame)."""

    def logits(entry, prompts, out_hw=None, *, grad=False):  # type: ignore[no-untyped-def]
        hw = out_hw or prompts.hw
        masks = [cv2.resize(respond(prompts, k).astype(np.uint8), hw[::-1], interpolation=cv2.INTER_NEAREST)
                 for k in range(len(prompts))]
        return torch.as_tensor(np.stack(masks) if masks else np.zeros((0, *hw)), dtype=torch.float32) * 20 - 10

    monkeypatch.setattr(engine, "logits", logits)


def test_agreement_is_one_when_sam_returns_the_model_mask_and_drops_when_not(
    tmp_path: Path, spec: SamSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, masks = write_scenes(tmp_path / "data", 3)
    predictions = np.stack([cv2.imread(m, cv2.IMREAD_UNCHANGED) for m in masks]).astype(np.int64)
    engine = SamEngine(spec, "tiny-x")
    _answer_with(engine, monkeypatch, lambda p, k: p.mask(k))
    same = engine.agreement(paths, predictions, num_classes=3)
    assert same[col.SAM_DISAGREEMENT_MEAN] == pytest.approx([0, 0, 0])
    assert same[col.SAM_COMPONENTS].tolist() == [2, 2, 2]
    assert np.isnan(same[col.sam_class_column(0)]).all()  # skipped class
    assert same[col.SAM_EMBEDDING_CACHED].tolist() == [0, 0, 0]

    _answer_with(engine, monkeypatch, lambda p, k: np.roll(p.mask(k), 6, axis=1) if p.class_ids[k] == 2 else p.mask(k))
    shifted = engine.agreement(paths, predictions, num_classes=3)
    assert (shifted[col.SAM_DISAGREEMENT_MEAN] > 0.05).all()
    assert shifted[col.sam_class_column(1)] == pytest.approx([0, 0, 0])
    assert (shifted[col.sam_class_column(2)] > 0.2).all()
    assert (shifted[col.SAM_DISAGREEMENT_MAX] == shifted[col.sam_class_column(2)]).all()
    assert shifted[col.SAM_EMBEDDING_CACHED].tolist() == [1, 1, 1]


def test_refine_paints_sam_masks_with_the_model_classes(tmp_path: Path, spec: SamSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, masks = write_scenes(tmp_path / "data", 1)
    truth = cv2.imread(masks[0], cv2.IMREAD_UNCHANGED)
    rough = cv2.resize(truth, (64, 48), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    rough[:27][rough[:27] == 2] = 0  # the model misses the disk's upper half ...
    engine = SamEngine(spec, "tiny-x")
    # ... and SAM, prompted with the half disk, returns the whole disk (at the image's own size).
    _answer_with(engine, monkeypatch, lambda p, k: cv2.resize(truth, p.hw[::-1], interpolation=cv2.INTER_NEAREST)
                 == p.class_ids[k])
    refined = engine.refine(paths[0], rough, ignore_index=255)
    assert refined.dtype == np.uint8 and refined.shape == truth.shape
    assert (refined == truth).mean() > 0.99
    assert (cv2.resize(rough, (128, 96), interpolation=cv2.INTER_NEAREST) == truth).mean() < 0.98
    # Pixels no SAM mask claims fall back to the first skipped (background) class, else to unlabeled.
    _answer_with(engine, monkeypatch, lambda p, k: np.zeros(p.hw, bool))
    assert (engine.refine(paths[0], rough, ignore_index=255) == 0).all()
    no_skip = SamEngine(SamSpec(**{**spec.__dict__, "prompts": PromptSpec(min_area_px=8)}), "tiny-x")
    _answer_with(no_skip, monkeypatch, lambda p, k: np.zeros(p.hw, bool))
    assert (no_skip.refine(paths[0], rough, ignore_index=255) == 255).all()


# -- decoder fine-tuning ------------------------------------------------------------------------------


def test_finetune_trains_only_the_decoder_from_cached_embeddings(tmp_path: Path, spec: SamSpec) -> None:
    from workers import ClassInfo

    paths, masks = write_scenes(tmp_path / "data", 5)
    tuned_spec = SamSpec(**{**spec.__dict__, "finetune": SamFinetuneSpec(enabled=True, steps=6, lr=1e-3, holdout_fraction=0.4)})
    SamEngine(tuned_spec, spec.checkpoint_id()).embeddings(paths)  # cached by an earlier scoring pass
    classes = ClassInfo(names=("water", "pipe", "anode"), ignore_index=255)
    out = finetune_decoder(tuned_spec, spec.checkpoint_id(), [f"s{i}" for i in range(5)], paths, masks, classes,
                           (48, 64), str(tmp_path / "round" / "sam_decoder.pt"), seed=1)
    assert out["images_encoded"] == 0  # every embedding came from the cache
    assert out["steps"] == 6 and out["holdout_images"] == 2 and out["train_images"] == 3
    assert out["holdout_prompts"] == 4 and 0 <= out["val_iou_before"] <= 1 and 0 <= out["val_iou_after"] <= 1
    assert math.isfinite(out["final_loss"])
    base = build_sam("tiny", spec.checkpoint).state_dict()
    tuned = SamEngine(spec, spec.checkpoint_id(), decoder=out["decoder_path"]).sam.state_dict()
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"mask_decoder"}  # image and prompt encoders frozen


# -- the extended scoring pass, one batch without Ray -------------------------------------------------


def test_pass_scorer_adds_sam_bald_and_embeddings_to_the_pool_rows(tmp_path: Path, spec: SamSpec) -> None:
    from workers._models import save_model_state

    torch.manual_seed(0)
    save_model_state(build_model("unet", 3, {"base_channels": 4, "depth": 2, "dropout": 0.3}), tmp_path / "model.pt")
    paths, _ = write_scenes(tmp_path / "data", 4)
    ids = np.array(["a", "b", "c", "d"])
    pass_spec = PassSpec(sam=spec, sam_checkpoint_id=spec.checkpoint_id(), mc_dropout_passes=3,
                         embeddings_dir=str(tmp_path / "emb"), seed=5)
    scorer = PassScorer(pass_spec, checkpoint_path=str(tmp_path / "model.pt"), image_size=(48, 64))
    out = scorer({"sample_id": ids, "image_path": np.array(paths), "pool": np.array([True, True, False, True])})
    assert list(out["sample_id"]) == list(ids)
    assert all(np.asarray(v).shape == (4,) for v in out.values())
    assert {col.ENTROPY_MEAN, col.BALD_MEAN, *col.SAM_COLUMNS, col.sam_class_column(2)} <= set(out)
    assert np.isnan(out[col.SAM_DISAGREEMENT_MEAN][2]) and np.isnan(out[col.BALD_MEAN][2])  # not a pool row
    pool = [0, 1, 3]
    assert (out[col.BALD_MEAN][pool] >= 0).all() and (out[col.BALD_MEAN][pool] > 0).any()
    assert (out[col.SAM_COMPONENTS][pool] >= 0).all()
    assert out[col.SAM_EMBEDDING_CACHED][pool].tolist() == [0, 0, 0] and scorer.sam is not None
    assert scorer.sam.images_encoded == 3
    assert read_embeddings(str(tmp_path / "emb"), ["d", "a"]).shape == (2, 16)
    # BALD does not depend on the batch an image lands in (its dropout masks are seeded by its id).
    alone = scorer({"sample_id": ids[3:], "image_path": np.array(paths[3:])})
    assert alone[col.BALD_MEAN][0] == pytest.approx(out[col.BALD_MEAN][3])
    assert alone[col.SAM_EMBEDDING_CACHED].tolist() == [1.0]


def test_mc_dropout_needs_a_dropout_layer(tmp_path: Path) -> None:
    from workers._models import save_model_state

    save_model_state(build_model("unet", 3, {"base_channels": 4, "depth": 2, "dropout": 0.0}), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="no dropout layer with p > 0"):
        PassScorer(PassSpec(mc_dropout_passes=4), checkpoint_path=str(tmp_path / "model.pt"), image_size=(48, 64))
