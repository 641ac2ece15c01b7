"""A corpus of bad inputs: each is refused with a clear error naming the file or field, and the
work dir is unchanged afterwards (a refused start leaves no work dir behind, or an existing one
byte for byte as it was). Grayscale, RGBA and 16-bit images are accepted (converted to 8-bit RGB);
an unreadable pool image is skipped when ``data.skip_unreadable`` says so."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, TableStore, config_from_dict, load_config
from orchestrator._cli import main as shoal_main
from orchestrator._train import weight_overrides
from strategies import build_strategy, manual_override
from workers import generate_synthetic, load_image

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


def colour_mask(data: Path) -> Path:
    mask = first(data / "val/masks")
    m = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(mask), np.dstack([m, m, (m + 1) % 5]).astype(np.uint8))
    return mask


def duplicate_metadata_id(data: Path) -> Path:
    stem = first(data / "train/images").stem
    path = data / "train/metadata.csv"
    path.write_text(f"sample_id,camera\n{stem},a\n{stem},b\n")
    return path


def pool_image(data: Path) -> Path:
    """A train image the initial random set (seed 0, 4 of 10) does not take: a pool image."""
    return sorted((data / "train/images").iterdir())[-1]


# (name, corrupt(data) -> the path the error must name (or None), config overrides, message regex)
CASES: list[tuple[str, Callable[[Path], Path | None], dict, str]] = [
    ("truncated_png", lambda d: (truncate(first(d / "val/images")), first(d / "val/images"))[1], {}, "cannot decode image"),
    ("zero_byte_image", lambda d: (first(d / "val/images").write_bytes(b""), first(d / "val/images"))[1], {}, "cannot decode image"),
    ("truncated_jpeg", write_jpeg_truncated, {}, "cannot decode image"),
    ("truncated_pool_png", lambda d: (truncate(pool_image(d)), pool_image(d))[1], {},
     r"cannot decode image.*data\.skip_unreadable"),
    ("zero_byte_pool_image", lambda d: (pool_image(d).write_bytes(b""), pool_image(d))[1], {},
     r"empty \(0 bytes\).*data\.skip_unreadable"),
    ("mask_wrong_size", resize_mask, {}, "does not match its image"),
    ("class_id_out_of_range", bad_ids, {}, "invalid class id"),
    ("colour_mask", colour_mask, {}, "channels that differ"),
    ("duplicate_sample_id", duplicate_id, {}, "share the stem|duplicate"),
    ("duplicate_metadata_id", duplicate_metadata_id, {}, "appears twice"),
    ("labeled_sample_without_mask", mask_missing, {}, "without a mask|no mask"),
    ("empty_pool", empty_pool, {}, "no images|empty"),
    ("budget_larger_than_pool", lambda d: None, {"loop": {"initial_labeled": 4, "budget": 7}}, r"loop\.budget"),
    ("initial_larger_than_pool", lambda d: None, {"loop": {"initial_labeled": 11}}, r"loop\.initial_labeled"),
    ("misspelled_config_key", lambda d: None, {"data": {"skip_unreadabel": True}},
     r"unknown config key 'data\.skip_unreadabel'"),
    ("wrong_type_in_config", lambda d: None, {"loop": {"budget": "two"}}, r"loop\.budget: expected an integer"),
    ("wrong_type_bool_in_config", lambda d: None, {"data": {"skip_unreadable": "yes"}},
     r"data\.skip_unreadable: expected true or false"),
]


def digest(folder: Path) -> str | None:
    """A hash of every file under ``folder`` (names and bytes); None when it does not exist."""
    if not folder.exists():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def folder_config(root: Path, name: str, **overrides: dict) -> dict:
    cfg: dict = {
        "experiment": {"name": name},
        "data": {"kind": "folder", "train_dir": str(root / "train"), "val_dir": str(root / "val"), "image_size": [24, 32]},
        "loop": {"initial_labeled": 4, "budget": 2},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.mark.parametrize("existing", [False, True], ids=["new_workdir", "existing_workdir"])
@pytest.mark.parametrize("name, corrupt, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_it(clean: Path, tmp_path: Path, name, corrupt, overrides, message, existing) -> None:
    data = tmp_path / "data"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("gen_*"))
    named = corrupt(data)
    workdir = tmp_path / "work"
    if existing:  # a folder the user pointed --workdir at: left exactly as it was
        workdir.mkdir()
        (workdir / "notes.txt").write_text("mine\n")
    before = digest(workdir)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        ActiveLearningLoop(config_from_dict(folder_config(data, name, **overrides)), workdir).step()
    if named is not None:
        assert named.stem in str(err.value) or str(named) in str(err.value)
    assert digest(workdir) == before


# -------------------------------------------------------------------------- accepted pixel formats


def test_grayscale_rgba_and_16_bit_images_are_converted_to_8_bit_rgb(tmp_path: Path) -> None:
    """Accepted, not refused: grey is replicated to 3 channels, alpha dropped, 16-bit scaled with
    rounding (8-bit data stored as 16-bit, v * 257, maps back to v)."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    bgr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rgb = bgr[:, :, ::-1]
    files = {
        "grey.png": (grey, np.dstack([grey] * 3)),
        "grey.jpg": (grey, None),  # lossy: shape only
        "rgba.png": (np.dstack([bgr, np.full((6, 5), 7, np.uint8)]), rgb),
        "grey16.png": (grey.astype(np.uint16) * 257, np.dstack([grey] * 3)),
        "rgb16.png": (bgr.astype(np.uint16) * 257, rgb),
        "rgba16.png": (np.dstack([bgr, grey]).astype(np.uint16) * 257, rgb),
    }
    for name, (stored, expected) in files.items():
        path = tmp_path / name
        assert cv2.imwrite(str(path), stored)
        image = load_image(str(path))
        assert image.dtype == np.uint8 and image.shape == (6, 5, 3), name
        if expected is not None:
            assert (image == expected).all(), name
        assert load_image(str(path), size=(12, 10)).shape == (12, 10, 3)
    float_tiff = tmp_path / "float.tiff"
    assert cv2.imwrite(str(float_tiff), rng.random((6, 5)).astype(np.float32))
    with pytest.raises(ValueError, match=f"{re.escape(str(float_tiff))}.*unsupported pixel type float32"):
        load_image(str(float_tiff))


def test_an_experiment_on_grayscale_rgba_and_16_bit_images_starts(clean: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("gen_*"))
    for split in ("train", "val"):
        images = sorted((data / split / "images").iterdir())
        for path, convert in zip(images, (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY),
                                          lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2BGRA),
                                          lambda im: im.astype(np.uint16) * 257)):
            cv2.imwrite(str(path), convert(cv2.imread(str(path))))
    loop = ActiveLearningLoop(config_from_dict(folder_config(data, "formats", loop={"initial_labeled": 8})), tmp_path / "w")
    state = loop.start()  # the checks of a start, without training (no Ray)
    assert loop.store.info(state.revision).num_labeled == 8


# -------------------------------------------------------------------------- unreadable pool images


def test_unreadable_pool_images_are_logged_and_left_out_with_skip_unreadable(
        clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("gen_*"))
    images = sorted((data / "train/images").iterdir())
    truncate(images[-1])
    images[-2].write_bytes(b"")
    bad = {images[-1].stem, images[-2].stem}
    cfg = folder_config(data, "skip", data={"skip_unreadable": True}, loop={"initial_labeled": 6})
    loop = ActiveLearningLoop(config_from_dict(cfg), tmp_path / "work")
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        state = loop.start()
    table = loop.store.read(state.revision)
    assert not bad & set(table.sample_id) and len(table) == N_TRAIN - 2 + N_VAL
    assert table.labeled.sum() == 6 and loop.status()["labeled"] == 6
    listed = pd.read_csv(loop.workdir / "unreadable.csv")
    assert set(listed.sample_id) == bad and listed.error.str.contains("cannot decode image").all()
    assert set(listed.image_path) == {str(images[-1]), str(images[-2])}
    logged = [r.getMessage() for r in caplog.records if "skip_unreadable" in r.getMessage()]
    assert len(logged) == 2 and all(any(stem in m for m in logged) for stem in bad)


# -------------------------------------------------------------------------- NaN and inf in arrays


def score_table(**columns: list[float]) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], **columns})


@pytest.mark.parametrize("name, column", [("entropy", "entropy_mean"), ("margin", "margin_mean"),
                                          ("least_confidence", "least_confidence_mean")])
def test_nan_scores_rank_last(name: str, column: str) -> None:
    """NaN is "the scorer could not score this image": never preferred, taken last."""
    values = [0.2, np.nan, 0.5, 0.4, np.nan]
    picked = build_strategy(name).select(score_table(**{column: values}), 5, np.random.default_rng(0))
    assert set(picked[-2:]) == {"s1", "s4"}


def test_infinite_scores_are_refused_naming_the_sample() -> None:
    with pytest.raises(ValueError, match="entropy_mean.*s1|s1.*entropy_mean"):
        build_strategy("entropy").select(score_table(entropy_mean=[0.2, np.inf, 0.5]), 1, np.random.default_rng(0))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_refused_naming_the_sample(value: float) -> None:
    table = score_table(entropy_mean=[0.1, 0.2, 0.3, 0.4])
    embeddings = np.ones((4, 3), np.float32)
    embeddings[2, 1] = value
    with pytest.raises(ValueError, match="embedding of sample_id 's2' is not finite"):
        build_strategy("coreset").select(table, 2, np.random.default_rng(0), embeddings)


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0])
def test_non_finite_weight_overrides_are_refused_naming_the_sample(value: float) -> None:
    weights = pd.Series([1.0, 1.0], index=pd.Index(["a", "b"], name="sample_id"))
    with pytest.raises(ValueError, match="sample_id 'b'.*not a finite number >= 0"):
        manual_override(weights, {"b": value})


def test_duplicate_ids_empty_pool_and_too_large_budget_in_a_score_table() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="duplicate sample_id 's1'"):
        build_strategy("entropy").select(pd.DataFrame({"sample_id": ["s0", "s1", "s1"], "entropy_mean": [1.0, 2, 3]}), 1, rng)
    labeled = score_table(entropy_mean=[0.1, 0.2]).assign(labeled=True)
    with pytest.raises(ValueError, match="budget of 1 samples exceeds the 0 unlabeled samples"):
        build_strategy("entropy").select(labeled, 1, rng)
    with pytest.raises(ValueError, match="budget of 3 samples exceeds the 2 unlabeled samples"):
        build_strategy("entropy").select(score_table(entropy_mean=[0.1, 0.2]), 3, rng)


@pytest.fixture(scope="module")
def started(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An experiment started on the clean folder dataset (initial set labeled, no round run)."""
    root = tmp_path_factory.mktemp("started")
    loop = ActiveLearningLoop(config_from_dict(folder_config(clean, "started")), root / "work")
    loop.start()
    return loop.workdir


@pytest.mark.parametrize("value, message", [
    ("nan", "weights: sample {sid}: weight must be finite and >= 0, got nan"),
    ("inf", "weights: sample {sid}: weight must be finite and >= 0, got inf"),
    ("-inf", "weights: sample {sid}: weight must be finite and >= 0, got -inf"),
    ("heavy", "{csv}: weights must be numbers"),
])
def test_shoal_edit_refuses_non_finite_weights_and_changes_nothing(
        started: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str) -> None:
    state = json.loads((started / "state.json").read_text())
    sid = str(TableStore(started / "table").read(state["revision"]).query("labeled").sample_id.iloc[0])
    csv = tmp_path / "weights.csv"
    csv.write_text(f"sample_id,weight\n{sid},{value}\n")
    before = digest(started)
    assert shoal_main(["edit", str(started), "--weights", str(csv), "--comment", "bad weights"]) == 2
    assert message.format(sid=sid, csv=csv) in capsys.readouterr().err
    assert digest(started) == before


@pytest.mark.parametrize("edit_config, message", [
    (lambda c: c["data"].update(skip_unreadabel=True), r"unknown config key 'data\.skip_unreadabel'"),
    (lambda c: c["loop"].update(budget="two"), r"loop\.budget: expected an integer, got 'two'"),
])
def test_resume_refuses_a_bad_config_snapshot_naming_the_key(started: Path, tmp_path: Path, edit_config, message) -> None:
    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(started, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    edit_config(cfg)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = digest(copy)
    with pytest.raises(ValueError, match=message):
        ActiveLearningLoop.resume(copy)
    assert digest(copy) == before


@pytest.mark.parametrize(
    "override, message",
    [("train.epoch=3", r"unknown config key 'train\.epoch'"), ("train.epochs=three", r"train\.epochs: expected an integer"),
     # YAML's .nan and .inf parse as floats and would pass every range check (nan > 0 is False, but so is nan <= 0)
     ("train.lr=.nan", r"train\.lr: expected a finite number, got nan"),
     ("cost.purity_threshold=.inf", r"cost\.purity_threshold: expected a finite number, got inf"),
     ("loop.stopping.min_delta=-.inf", r"loop\.stopping\.min_delta: expected a finite number, got -inf")],
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


@pytest.mark.parametrize("content, message", [
    ("sample_id,weight\na,1\na,2\n", "sample_id 'a' appears more than once"),
    ("sample_id,weight\na,heavy\n", "row 2: weight 'heavy' is not a finite number"),
    ("sample_id,weight\na,inf\n", "row 2: weight 'inf' is not a finite number"),
    ("id,w\na,1\n", "expected the header sample_id,weight"),
])
def test_bad_weight_override_files_are_refused_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "weights.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        weight_overrides(str(path))
    assert str(path) in str(info.value)


def test_a_missing_weight_override_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="loop.reweighting.override_file: .*nowhere.csv"):
        weight_overrides(str(tmp_path / "nowhere.csv"))


@pytest.mark.parametrize("section, message", [
    ({"reweighting": {"policy": "lossy"}}, "loop.reweighting.policy: unknown policy 'lossy'"),
    ({"reweighting": {"policy": "loss", "options": {"cap": 3}}}, "loop.reweighting.options: policy 'loss' has no option 'cap'"),
    ({"stopping": {"plateau_rounds": 0}}, "loop.stopping.plateau_rounds: must be >= 1"),
    ({"initial_strategy": "kmeans"}, "loop.initial_strategy"),
])
def test_bad_loop_settings_name_the_field(section: dict, message: str) -> None:
    from .conftest import tiny_config

    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(tiny_config(loop=section))
