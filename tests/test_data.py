"""Tests for workers/_data.py: folder datasets, decoding, the synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from workers._data import (
    SYNTHETIC_CLASSES,
    ClassInfo,
    generate_synthetic,
    image_hw,
    load_image,
    load_mask,
    read_classes,
    scan_folder_dataset,
    synthetic_sample,
)

CAMVID = Path(__file__).resolve().parents[2] / "shared/data/camvid"


def _write(path: Path, array: np.ndarray, ext: str = ".png") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(ext, array)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _classes_json(folder: Path, names: list[str] | None = None, ignore: int = 255) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"classes": names or ["a", "b", "c"], "ignore_index": ignore}
    (folder / "classes.json").write_text(json.dumps(data))


def _dataset(root: Path, images: list[str], masks: list[str]) -> Path:
    """A folder dataset whose files are named as given (contents are tiny valid PNGs)."""
    _classes_json(root)
    for name in images:
        _write(root / "images" / name, np.zeros((4, 5, 3), np.uint8), Path(name).suffix)
    for name in masks:
        _write(root / "masks" / name, np.zeros((4, 5), np.uint8))
    return root


# --------------------------------------------------------------------------------------------
# Synthetic dataset


@pytest.fixture(scope="module")
def synthetic_batch() -> list[tuple[np.ndarray, np.ndarray, dict[str, str | int | float]]]:
    return [synthetic_sample(i, 64, 80, seed=3) for i in range(200)]


def test_synthetic_sample_is_deterministic() -> None:
    image, mask, meta = synthetic_sample(7, 96, 128, seed=1)
    image2, mask2, meta2 = synthetic_sample(7, 96, 128, seed=1)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 128) and mask.dtype == np.uint8
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(mask, mask2)
    assert meta == meta2
    other, _, _ = synthetic_sample(7, 96, 128, seed=2)
    assert not np.array_equal(image, other)
    neighbour, _, _ = synthetic_sample(8, 96, 128, seed=1)
    assert not np.array_equal(image, neighbour)


def test_synthetic_classes_views_and_leak_share(synthetic_batch: list) -> None:
    seen = np.zeros(SYNTHETIC_CLASSES.num_classes, bool)
    for image, mask, _ in synthetic_batch[:60]:
        ids = np.unique(mask)
        assert set(ids.tolist()) <= set(range(5))
        seen[ids] = True
        assert image.std() > 5  # textured, not flat
    assert seen.all(), f"classes never drawn: {np.flatnonzero(~seen)}"
    metas = [meta for _, _, meta in synthetic_batch]
    leak_share = np.mean([m["has_leak"] for m in metas])
    assert 0.12 <= leak_share <= 0.28
    views = [m["camera_view"] for m in metas]
    assert set(views) == {"forward", "downward"}
    assert 0.35 <= views.count("forward") / len(views) <= 0.65
    for _, mask, meta in synthetic_batch:
        assert bool((mask == 4).any()) == bool(meta["has_leak"])
        assert (mask == 1).any()  # the pipeline is always in view
        assert 0 <= int(meta["num_rocks"]) <= 4 and 0 <= int(meta["num_anodes"]) <= 3
        assert bool((mask == 2).any()) == (int(meta["num_anodes"]) > 0)
    assert np.mean([int(m["num_anodes"]) > 0 for m in metas]) > 0.6


def test_synthetic_classes_differ_in_colour(synthetic_batch: list) -> None:
    # Learnable from local appearance: class mean colours are apart by more than the noise.
    means = np.zeros((5, 3))
    for c in range(5):
        pixels = np.concatenate([img[m == c] for img, m, _ in synthetic_batch[:100]])
        means[c] = pixels.mean(0)
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert gaps[~np.eye(5, dtype=bool)].min() > 15


def test_generate_synthetic_round_trip_and_reuse(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    classes, records = generate_synthetic(root, 6, height=48, width=64, seed=5, prefix="s")
    assert classes == SYNTHETIC_CLASSES
    assert [r.sample_id for r in records] == [f"s_{i:06d}" for i in range(6)]
    assert not list(tmp_path.glob("*.tmp-*"))
    for i, record in enumerate(records):
        assert record.mask_path is not None
        assert set(record.metadata) == {"camera_view", "has_leak", "num_rocks", "num_anodes"}
        assert isinstance(record.metadata["num_rocks"], int)
        image, mask, meta = synthetic_sample(i, 48, 64, 5)
        np.testing.assert_array_equal(load_image(record.image_path), image)
        np.testing.assert_array_equal(load_mask(record.mask_path, classes), mask)
        assert record.metadata == meta
        assert image_hw(record.image_path) == (48, 64)
    first = records[0]
    assert first.mask_path is not None
    assert load_image(first.image_path, size=(24, 32)).shape == (24, 32, 3)
    assert load_image(first.image_path, size=(96, 100)).shape == (96, 100, 3)
    small = load_mask(first.mask_path, classes, size=(24, 32), expected_hw=(48, 64))
    assert small.shape == (24, 32) and small.dtype == np.int64

    marker_mtime = (root / ".complete").stat().st_mtime_ns
    _, again = generate_synthetic(root, 6, height=48, width=64, seed=5, prefix="s")
    assert again == records
    assert (root / ".complete").stat().st_mtime_ns == marker_mtime  # reused, not rewritten
    with pytest.raises(ValueError, match="synth"):
        generate_synthetic(root, 7, height=48, width=64, seed=5, prefix="s")
    with pytest.raises(ValueError, match="synth"):
        generate_synthetic(root, 6, height=48, width=64, seed=6, prefix="s")


def test_generate_synthetic_refuses_unfinished_folder(tmp_path: Path) -> None:
    root = tmp_path / "half"
    (root / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a finished"):
        generate_synthetic(root, 2, height=32, width=32)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder (e.g. made by a caller) is filled, not refused
    _, records = generate_synthetic(empty, 2, height=32, width=32)
    assert len(records) == 2 and (empty / ".complete").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "half"]  # no temp folder left


# --------------------------------------------------------------------------------------------
# classes.json and folder scans


def test_read_classes_from_root_or_parent(tmp_path: Path) -> None:
    _classes_json(tmp_path, ["x", "y"], ignore=255)
    (tmp_path / "train").mkdir()
    assert read_classes(tmp_path) == ClassInfo(("x", "y"), 255)
    assert read_classes(tmp_path / "train").num_classes == 2


def test_read_classes_missing_names_both_paths(tmp_path: Path) -> None:
    (tmp_path / "split").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        read_classes(tmp_path / "split")
    assert str(tmp_path / "split" / "classes.json") in str(err.value)
    assert str(tmp_path / "classes.json") in str(err.value)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", "JSON"),
        ('{"ignore_index": 255}', "classes"),
        ('{"classes": "sky", "ignore_index": 255}', "classes"),
        ('{"classes": [], "ignore_index": 255}', "classes"),
        ('{"classes": ["a", "a"], "ignore_index": 255}', "duplicate"),
        ('{"classes": ["a", ""], "ignore_index": 255}', "classes"),
        ('{"classes": ["a", "b"]}', "ignore_index"),
        ('{"classes": ["a", "b"], "ignore_index": 1}', "ignore_index"),
        ('{"classes": ["a", "b"], "ignore_index": "255"}', "ignore_index"),
        ('{"classes": ["a"], "ignore_index": 255, "colours": []}', "colours"),
    ],
)
def test_read_classes_rejects_bad_files(tmp_path: Path, content: str, field: str) -> None:
    (tmp_path / "classes.json").write_text(content)
    with pytest.raises(ValueError, match=field) as err:
        read_classes(tmp_path)
    assert str(tmp_path / "classes.json") in str(err.value)


def test_scan_matches_by_stem_and_reads_metadata(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["b.JPG", "a.png", "c.tif"], ["a.png", "b.png", "c.png"])
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "metadata.csv").write_text("sample_id,view,count,score\na,down,3,0.5\nc,fwd,x7,1e3\n")
    classes, records = scan_folder_dataset(root)
    assert classes.names == ("a", "b", "c")
    assert [r.sample_id for r in records] == ["a", "b", "c"]
    assert records[1].image_path == str(root / "images" / "b.JPG")
    assert records[1].mask_path == str(root / "masks" / "b.png")
    assert Path(records[0].image_path).is_absolute()
    assert records[0].metadata == {"view": "down", "count": 3, "score": 0.5}
    assert records[1].metadata == {}
    assert records[2].metadata == {"view": "fwd", "count": "x7", "score": 1000.0}


def test_scan_does_not_open_images(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", [], [])
    (root / "images").mkdir()
    (root / "images" / "junk.png").write_bytes(b"not a png at all")
    _, records = scan_folder_dataset(root, require_masks=False)
    assert [(r.sample_id, r.mask_path) for r in records] == [("junk", None)]


def test_scan_image_without_mask(tmp_path: Path) -> None:
    names = [f"m{i}.png" for i in range(7)]
    root = _dataset(tmp_path / "ds", ["a.png", *names], ["a.png"])
    with pytest.raises(ValueError, match="images without a mask") as err:
        scan_folder_dataset(root)
    message = str(err.value)
    assert "7" in message and "m0" in message and "m4" in message and "m5" not in message
    _, records = scan_folder_dataset(root, require_masks=False)
    assert len(records) == 8 and records[0].mask_path is not None and records[1].mask_path is None


def test_scan_mask_without_image(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["a.png"], ["a.png", "ghost.png"])
    with pytest.raises(ValueError, match="ghost"):
        scan_folder_dataset(root, require_masks=False)


def test_scan_duplicate_stems(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["a.png", "a.jpg"], ["a.png"])
    with pytest.raises(ValueError, match="'a'") as err:
        scan_folder_dataset(root)
    assert str(root / "images") in str(err.value)


def test_scan_metadata_unknown_id(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["a.png"], ["a.png"])
    (root / "metadata.csv").write_text("sample_id,view\na,down\nzzz,up\n")
    with pytest.raises(ValueError, match="zzz") as err:
        scan_folder_dataset(root)
    assert "metadata.csv" in str(err.value)


def test_scan_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images"):
        scan_folder_dataset(tmp_path / "nowhere")
    root = _dataset(tmp_path / "ds", [], [])
    (root / "images").mkdir()
    with pytest.raises(ValueError, match="no images"):
        scan_folder_dataset(root)


# --------------------------------------------------------------------------------------------
# load_image


def test_load_image_converts_depths_and_channels(tmp_path: Path) -> None:
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    out = load_image(str(_write(tmp_path / "g.png", gray)))
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], gray)
    np.testing.assert_array_equal(out[:, :, 2], gray)

    bgra = np.zeros((12, 10, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 200, 10, 0  # blue, fully transparent
    out = load_image(str(_write(tmp_path / "rgba.png", bgra)))
    assert out.shape == (12, 10, 3)
    assert out[0, 0].tolist() == [10, 0, 200]  # RGB order, alpha dropped

    deep = np.full((12, 10, 3), 65535, np.uint16)
    deep[..., 1] = 128 * 257
    out = load_image(str(_write(tmp_path / "deep.png", deep)))
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [255, 128, 255]

    deep_gray = np.full((12, 10), 1000 * 65, np.uint16)
    assert load_image(str(_write(tmp_path / "dg.png", deep_gray))).shape == (12, 10, 3)


def test_load_image_resize_and_size_check(tmp_path: Path) -> None:
    path = str(_write(tmp_path / "a.jpg", np.full((40, 60, 3), 90, np.uint8), ".jpg"))
    assert load_image(path, size=(20, 30)).shape == (20, 30, 3)
    assert load_image(path, size=(80, 50)).shape == (80, 50, 3)
    assert image_hw(path) == (40, 60)
    with pytest.raises(ValueError, match="size"):
        load_image(path, size=(0, 10))


def test_load_image_bad_files_name_the_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = cv2.GaussianBlur((rng.random((64, 64, 3)) * 255).astype(np.uint8), (5, 5), 0)
    png = _write(tmp_path / "full.png", noisy).read_bytes()
    jpg = _write(tmp_path / "full.jpg", noisy, ".jpg").read_bytes()
    cases = {
        "empty.png": b"",
        "cut.png": png[: len(png) // 2],
        "cut.jpg": jpg[: len(jpg) // 2],
        "cut_late.jpg": jpg[:-2],  # only the end-of-image marker missing
        "text.png": b"hello, this is not an image",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match="cannot decode image") as err:
            load_image(str(path))
        assert str(path) in str(err.value), name
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.png"))


# --------------------------------------------------------------------------------------------
# load_mask


def test_load_mask_checks_size_and_ids(tmp_path: Path) -> None:
    classes = ClassInfo(("a", "b", "c"), ignore_index=255)
    mask = np.zeros((6, 8), np.uint8)
    mask[0, 0], mask[1, 1] = 255, 2
    path = str(_write(tmp_path / "ok.png", mask))
    out = load_mask(path, classes, expected_hw=(6, 8))
    assert out.dtype == np.int64 and out[0, 0] == 255 and out[1, 1] == 2

    with pytest.raises(ValueError, match="ok.png") as err:
        load_mask(path, classes, expected_hw=(8, 6))
    assert "(6, 8)" in str(err.value) and "(8, 6)" in str(err.value)

    mask[2, 2], mask[3, 3] = 3, 17
    bad = str(_write(tmp_path / "bad.png", mask))
    with pytest.raises(ValueError, match="bad.png") as err:
        load_mask(bad, classes)
    assert "3, 17" in str(err.value) and "0..2" in str(err.value)


def test_load_mask_channels(tmp_path: Path) -> None:
    classes = ClassInfo(("a", "b"), ignore_index=255)
    ids = np.array([[0, 1], [255, 1]], np.uint8)
    same = str(_write(tmp_path / "same.png", np.repeat(ids[:, :, None], 3, axis=2)))
    np.testing.assert_array_equal(load_mask(same, classes), ids)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (0, 0, 1)
    path = str(_write(tmp_path / "colour.png", colour))
    with pytest.raises(ValueError, match="colour.png"):
        load_mask(path, classes)


def test_load_mask_nearest_resize_keeps_valid_ids(tmp_path: Path) -> None:
    classes = ClassInfo(("a", "b", "c", "d"), ignore_index=255)
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 3, 255], np.uint8), size=(37, 53))
    path = str(_write(tmp_path / "m.png", mask))
    for size in [(10, 14), (80, 120), (37, 20)]:
        out = load_mask(path, classes, size=size)
        assert out.shape == size
        assert set(np.unique(out).tolist()) <= {0, 3, 255}


# --------------------------------------------------------------------------------------------
# CamVid


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"{CAMVID} not present")
def test_camvid_scan() -> None:
    classes, train = scan_folder_dataset(CAMVID / "train")
    _, val = scan_folder_dataset(CAMVID / "val")
    assert len(train) == 367 and len(val) == 101
    assert classes.num_classes == 11 and classes.ignore_index == 255
    assert classes.names[0] == "sky"
    assert not {r.sample_id for r in train} & {r.sample_id for r in val}
    record = train[0]
    assert record.mask_path is not None
    hw = image_hw(record.image_path)
    mask = load_mask(record.mask_path, classes, expected_hw=hw)
    values = set(np.unique(mask).tolist())
    assert values <= set(range(11)) | {255} and len(values) > 2
    assert load_image(record.image_path, size=(180, 240)).shape == (180, 240, 3)
