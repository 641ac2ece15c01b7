"""A corpus of bad inputs: each is refused with a clear error naming the file or field, and a
refused start leaves no work dir behind."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from orchestrator import ActiveLearningLoop, config_from_dict, load_config
from workers import generate_synthetic

from .conftest import ROOT

N_TRAIN, N_VAL = 10, 4


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    generate_synthetic(root / "gen_train", N_TRAIN, 24, 32, seed=0, prefix="t")
    generate_synthetic(root / "gen_val", N_VAL, 24, 32, seed=1, prefix="v")
    for split in ("train", "val"):
        shutil.copytree(root / f"gen_{split}", root / split, ignore=shutil.ignore_patterns(".complete"))
    return root


def first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def write_jpeg_truncated(data: Path) -> Path:
    img = first(data / "val/images")
    image = cv2.imread(str(img))
    jpg = img.with_suffix(".jpg")
    cv2.imwrite(str(jpg), image)
    img.unlink()
    jpg.write_bytes(jpg.read_bytes()[:200])
    return jpg


def resize_mask(data: Path) -> Path:
    mask = first(data / "val/masks")
    cv2.imwrite(str(mask), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)[:-3])
    return mask


def bad_ids(data: Path) -> Path:
    mask = first(data / "val/masks")
    m = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    m[0, 0] = 9
    cv2.imwrite(str(mask), m)
    return mask


def duplicate_id(data: Path) -> Path:
    img = first(data / "train/images")
    dup = img.with_suffix(".jpg")
    cv2.imwrite(str(dup), cv2.imread(str(img)))
    return dup


def mask_missing(data: Path) -> Path:
    mask = first(data / "train/masks")
    mask.unlink()
    return mask


def empty_pool(data: Path) -> Path:
    for p in (data / "train/images").iterdir():
        p.unlink()
    for p in (data / "train/masks").iterdir():
        p.unlink()
    return data / "train/images"


# (name, corrupt(data) -> the path the error must name (or None), config overrides, message regex)
CASES: list[tuple[str, Callable[[Path], Path | None], dict, str]] = [
    ("truncated_png", lambda d: (truncate(first(d / "val/images")), first(d / "val/images"))[1], {}, "cannot decode image"),
    ("zero_byte_image", lambda d: (first(d / "val/images").write_bytes(b""), first(d / "val/images"))[1], {}, "cannot decode image"),
    ("truncated_jpeg", write_jpeg_truncated, {}, "cannot decode image"),
    ("mask_wrong_size", resize_mask, {}, "does not match its image"),
    ("class_id_out_of_range", bad_ids, {}, "invalid class id"),
    ("duplicate_sample_id", duplicate_id, {}, "share the stem|duplicate"),
    ("labeled_sample_without_mask", mask_missing, {}, "without a mask|no mask"),
    ("empty_pool", empty_pool, {}, "no images|empty"),
    ("budget_larger_than_pool", lambda d: None, {"loop": {"initial_labeled": 4, "budget": 7}}, r"loop\.budget"),
    ("initial_larger_than_pool", lambda d: None, {"loop": {"initial_labeled": 11}}, r"loop\.initial_labeled"),
]


@pytest.mark.parametrize("name, corrupt, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_it(clean: Path, tmp_path: Path, name, corrupt, overrides, message) -> None:
    data = tmp_path / "data"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("gen_*"))
    named = corrupt(data)
    cfg = {
        "experiment": {"name": name},
        "data": {"kind": "folder", "train_dir": str(data / "train"), "val_dir": str(data / "val"), "image_size": [24, 32]},
        "loop": {"initial_labeled": 4, "budget": 2, **overrides.get("loop", {})},
    }
    workdir = tmp_path / "work"
    loop = ActiveLearningLoop(config_from_dict(cfg), workdir)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        loop.step()
    if named is not None:
        assert named.stem in str(err.value) or str(named) in str(err.value)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "override, message",
    [("train.epoch=3", r"unknown config key 'train\.epoch'"), ("train.epochs=three", r"train\.epochs: expected an integer")],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs/quickstart.yaml", [override])
    assert list(tmp_path.iterdir()) == []


def test_no_unsafe_loading_in_the_code() -> None:
    """torch.load only with weights_only=True, yaml only through safe_load, no eval/exec/pickle."""
    problems = []
    for path in [*ROOT.glob("orchestrator/*.py"), *ROOT.glob("workers/*.py"), *ROOT.glob("strategies/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                problems.append(f"{path.name}:{n}: torch.load without weights_only=True")
            if re.search(r"yaml\.(load|unsafe_load|full_load)\(", code):
                problems.append(f"{path.name}:{n}: yaml loader other than safe_load")
            if re.search(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(|allow_pickle=True", code):
                problems.append(f"{path.name}:{n}: {code.strip()}")
    assert problems == []


def test_torch_load_refuses_pickled_code(tmp_path: Path) -> None:
    """A checkpoint carrying an arbitrary object is refused by the loader, not executed."""
    import torch

    from workers import load_checkpoint

    class Payload:
        def __reduce__(self):  # pragma: no cover - must never run
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|not allowed|global"):
        load_checkpoint(path)
    _ = np  # numpy used by the corpus helpers
