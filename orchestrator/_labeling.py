"""People in the loop: export label tasks, validate and import the masks annotators return.

A task folder (``<workdir>/rounds/round-NNN/tasks``) holds ``manifest.json``, the selected images
and, when available, pre-annotation PNGs. A region task (``kind: region``, region-level runs) also
holds, per image, its region map (``regions/<name>.png``, 16-bit region ids) and the regions to label
(``todo/<name>.png``, 255 inside them, 0 elsewhere); its manifest lists each image's region ids.
Annotators answer with either a folder of class-id PNGs
named like the task images (``<source>/masks/<name>.png`` or ``<source>/<name>.png``) or a Label
Studio JSON export. Every mask is validated before anything is added; a bad file is reported by
name and nothing is imported.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from workers import is_uri, read_bytes

from ._atomic import atomic_write, atomic_write_json
from ._labelstudio import LabelStudioSpec, brush_to_mask, task_for, url_stem
from ._table import IMAGE_PATH, SAMPLE_ID

MANIFEST = "manifest.json"
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def task_name(sample_id: str) -> str:
    """A file-name-safe, collision-free stem for a sample id."""
    if _SAFE.match(sample_id) and not sample_id.startswith("."):
        return sample_id
    digest = hashlib.sha1(sample_id.encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', sample_id).lstrip('.')[:40]}-{digest}"


@dataclass
class TaskExport:
    task_dir: str
    sample_ids: list[str]
    files: dict[str, str] = field(default_factory=dict)
    """sample id -> task file stem."""


def export_folder_tasks(
    table: pd.DataFrame,
    sample_ids: Sequence[str],
    task_dir: Path,
    classes: Any,
    *,
    round_index: int,
    kind: str = "label",
    preannotations: Mapping[str, np.ndarray] | None = None,
    label_studio: LabelStudioSpec | None = None,
    regions: Mapping[str, tuple[np.ndarray, Sequence[int]]] | None = None,
    workdir: Path | None = None,
) -> TaskExport:
    """Write a task folder for ``sample_ids``: images, pre-annotations, manifest, a README for the
    annotation lead (and, with ``label_studio``, ``tasks.json`` with brush pre-annotations and
    ``label_config.xml``, the project's labeling config). ``workdir``: the experiment's, named in
    the README's commands.

    ``regions`` (a region task, ``kind="region"``): sample id -> (int region map [h, w] at any
    size, the region ids to label). The map is enlarged to the image's own size with nearest
    neighbour and written with a todo mask of the asked regions; the sample's pre-annotation keeps
    its classes inside them only (the ignore index elsewhere), so nobody is shown work outside the
    request."""
    if kind == "region" and regions is None:
        raise ValueError("a region task needs the region maps and asked region ids of its samples")
    rows = table.set_index(SAMPLE_ID).loc[list(sample_ids)]
    tmp = task_dir.with_name(task_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    files: dict[str, str] = {}
    samples = []
    ls_tasks = []
    for sid, row in rows.iterrows():
        sid = str(sid)
        name = task_name(sid)
        src = str(row[IMAGE_PATH])
        image_file = f"images/{name}{Path(src.split('?')[0]).suffix.lower()}"
        data = read_bytes(src)  # a pool image in a bucket: downloaded once, for its size
        in_store = label_studio is not None and is_uri(src)  # Label Studio reads it from the store: no copy
        if in_store:
            image_file = src
        else:
            (tmp / image_file).write_bytes(data)
        height, width = _image_hw(src, data)
        entry: dict[str, Any] = {"sample_id": sid, "name": name, "image": image_file,
                                 "height": height, "width": width, "preannotation": None}
        pre = (preannotations or {}).get(sid)
        if regions is not None:
            todo = _write_region_files(tmp, entry, *regions[sid])
            if pre is not None:
                pre = np.where(todo, pre, classes.ignore_index)
        if pre is not None:
            (tmp / "preannotations").mkdir(exist_ok=True)
            entry["preannotation"] = f"preannotations/{name}.png"
            cv2.imwrite(str(tmp / entry["preannotation"]), pre.astype(np.uint8))
        samples.append(entry)
        files[sid] = name
        if label_studio is not None:  # URLs of the files where they will be once the folder is in place
            ls_tasks.append(task_for(entry, image_file if in_store else task_dir / image_file, pre, classes.ignore_index,
                                     label_studio, round_index, task_dir / entry["todo"] if "todo" in entry else None))
    manifest = {
        "format": 1, "kind": kind, "round": round_index, "classes": list(classes.names),
        "ignore_index": classes.ignore_index, "samples": samples,
        "instructions": REGION_INSTRUCTIONS if regions is not None else INSTRUCTIONS,
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    if label_studio is not None:
        atomic_write_json(tmp / "tasks.json", ls_tasks)
        (tmp / "label_config.xml").write_text(label_studio.label_config())
    (tmp / "README.md").write_text(task_readme(task_dir, workdir, label_studio, kind, len(samples),
                                               preannotated=(tmp / "preannotations").is_dir()))
    if task_dir.exists():
        shutil.rmtree(task_dir)
    tmp.rename(task_dir)
    return TaskExport(task_dir=str(task_dir), sample_ids=list(map(str, sample_ids)), files=files)


def task_readme(task_dir: Path, workdir: Path | None, spec: LabelStudioSpec | None, kind: str, count: int,
                preannotated: bool = True) -> str:
    """What the annotation lead does with this folder, from opening it to importing the answers
    (``preannotated``: the folder holds the model's masks; round 0 of an unlabeled pool has no model)."""
    work = str(workdir) if workdir is not None else "WORKDIR"
    what = {"label": "images to label", "region": "images with regions to label", "relabel": "images to relabel"}[kind]
    lines = [f"# {count} {what}", "", f"Task folder `{task_dir}` of the Shoal experiment `{work}`.", ""]
    if spec is None:
        lines += [
            "1. Draw one mask per image in `images/`: a single-channel PNG of class ids, the same size as the "
            "image, named like it (`masks/<name>.png`); unlabeled pixels hold `ignore_index` (see manifest.json)."
            + (" `preannotations/` holds the model's masks to start from." if preannotated else "") + (
                " Only pixels inside the todo regions (`todo/<name>.png`) count." if kind == "region" else ""),
            f"2. `shoal import-labels {work} {task_dir}`" + (f" --task {task_dir}" if kind == "relabel" else ""),
            f"3. `shoal resume {work}`",
        ]
    else:
        served = (f"the work dir served at {spec.url_prefix}" if spec.url_prefix else
                  f"Label Studio's local files under {spec.local_files_root}")
        lines += [
            f"Images load from {served}.",
            "",
            "1. Start Label Studio (once) with local files served:"
            if not spec.url_prefix else "1. Start Label Studio (once).",
        ]
        if not spec.url_prefix:
            lines += ["", "       LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true \\",
                      f"       LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={spec.local_files_root} \\",
                      "       label-studio start --internal-host 127.0.0.1 --port 8080", ""]
        lines += [
            "2. Create a project (once per experiment); in Settings > Labeling Interface > Code paste "
            "`label_config.xml` from this folder.",
        ]
        if not spec.url_prefix:
            lines.append(f"3. In Settings > Cloud Storage add a Local Storage (source) with the absolute local path "
                         f"`{spec.workdir}` (no sync needed: it lets the project read every round's images).")
        else:
            lines.append("3. Nothing to add: the images load over HTTP.")
        lines += [
            "4. Import `tasks.json` from this folder (Import > Upload files): one task per image, with the model's "
            "masks as predictions.",
            "5. Annotate (brush), then Export > JSON.",
            f"6. `shoal import-labels {work} EXPORT.json`" + (f" --task {task_dir}" if kind == "relabel" else "")
            + f", then `shoal resume {work}`.",
            "",
            "Tasks that Label Studio made by syncing a storage (without `sample_id` in their data) are matched by "
            "the image's file name.",
        ]
    return "\n".join(lines) + "\n"


INSTRUCTIONS = ("Save one single-channel PNG of class ids per image in masks/, named like the image "
                "(<name>.png), same size as the image; unlabeled pixels = ignore_index.")
REGION_INSTRUCTIONS = (
    "Label the pixels inside the todo regions of each image (todo/<name>.png: 255 = to label; "
    "regions/<name>.png holds the region ids listed under 'regions'). Save one single-channel PNG of "
    "class ids per image in masks/, named like the image (<name>.png), same size as the image. Pixels "
    "outside the todo regions are ignored; a todo region left at ignore_index stays unlabeled and may "
    "be asked again in a later round.")


def _write_region_files(folder: Path, entry: dict[str, Any], region_map: np.ndarray,
                        asked: Sequence[int]) -> np.ndarray:
    """Write ``regions/<name>.png`` (uint16 region ids at the image's size) and ``todo/<name>.png``
    (uint8, 255 inside the ``asked`` regions) for a manifest ``entry`` and record them in it; returns
    the todo mask, bool [H, W]."""
    from workers import resize_regions

    full = resize_regions(region_map, (entry["height"], entry["width"]))
    ids = [int(r) for r in asked]
    if full.min(initial=0) < 0 or full.max(initial=0) >= 2**16:
        raise ValueError(f"sample {entry['sample_id']}: region ids must lie in 0..65535 for a 16-bit PNG, "
                         f"got {int(full.min())}..{int(full.max())}")
    todo = np.isin(full, ids)
    missing = sorted(set(ids) - set(np.unique(full[todo]).tolist()))
    if missing:
        raise ValueError(f"sample {entry['sample_id']}: asked region(s) {missing[:5]} are not in its region map")
    for sub in ("regions", "todo"):
        (folder / sub).mkdir(exist_ok=True)
    entry["regions"] = ids
    entry["region_map"] = f"regions/{entry['name']}.png"
    entry["todo"] = f"todo/{entry['name']}.png"
    if not cv2.imwrite(str(folder / entry["region_map"]), full.astype(np.uint16)):
        raise OSError(f"cannot write {folder / entry['region_map']}")
    if not cv2.imwrite(str(folder / entry["todo"]), todo.astype(np.uint8) * 255):
        raise OSError(f"cannot write {folder / entry['todo']}")
    return todo


def _image_hw(path: str, data: bytes) -> tuple[int, int]:
    from workers import load_image

    image = load_image(path, data=data)
    return int(image.shape[0]), int(image.shape[1])


def read_manifest(task_dir: Path) -> dict[str, Any]:
    path = task_dir / MANIFEST
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"no task manifest at {path}") from None


# ---------------------------------------------------------------------------- import


@dataclass
class ImportedMask:
    sample_id: str
    mask: np.ndarray
    source: str


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _check_mask(mask: np.ndarray, source: str, expected_hw: tuple[int, int], classes: Any) -> None:
    if mask.ndim != 2:
        raise ValueError(f"{source}: a mask must be single-channel, got shape {mask.shape}")
    if tuple(mask.shape) != tuple(expected_hw):
        raise ValueError(f"{source}: size (height, width) {tuple(mask.shape)} does not match its image {tuple(expected_hw)}")
    values = np.unique(mask)
    bad = values[(values >= len(classes.names)) & (values != classes.ignore_index)]
    if bad.size:
        raise ValueError(
            f"{source}: invalid class id(s) {', '.join(map(str, bad[:5]))}; valid ids are "
            f"0..{len(classes.names) - 1} and ignore_index {classes.ignore_index}"
        )


def read_folder_answers(source: Path, manifest: Mapping[str, Any], classes: Any) -> list[ImportedMask]:
    """Masks in ``source/masks/`` (or ``source/``) named like the manifest's task names."""
    folder = source / "masks" if (source / "masks").is_dir() else source
    if not folder.is_dir():
        raise FileNotFoundError(f"label source {source} is not a folder of masks")
    by_name = {s["name"]: s for s in manifest["samples"]}
    found: list[ImportedMask] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: label masks must be PNG files")
        if not _inside(path, source):
            raise ValueError(f"{path}: resolves outside the label source {source}")
        entry = by_name.get(path.stem)
        if entry is None:
            raise ValueError(f"{path}: '{path.stem}' is not one of the {len(by_name)} samples of this task")
        mask = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise ValueError(f"{path}: cannot decode the mask")
        if mask.ndim == 3 and mask.shape[2] in (3, 4) and (mask[:, :, :3] == mask[:, :, :1]).all():
            mask = mask[:, :, 0]
        _check_mask(mask, str(path), (entry["height"], entry["width"]), classes)
        found.append(ImportedMask(entry["sample_id"], mask.astype(np.uint8), str(path)))
    return found


def read_label_studio_answers(export: Path, manifest: Mapping[str, Any], classes: Any,
                              label_map: Mapping[str, int] | None = None) -> list[ImportedMask]:
    """Masks from a Label Studio JSON export (brush results, the latest annotation of each task).

    A task is matched to the request by its ``sample_id`` (tasks Shoal wrote), else by the file name
    its image URL points at (tasks Label Studio made by syncing a storage); a task that matches
    nothing in the request, or more than one image, is refused. Errors name Label Studio's task id.
    ``label_map`` maps Label Studio label names to class ids (default: the class names)."""
    try:
        tasks = json.loads(export.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{export}: not valid JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise ValueError(f"{export}: a Label Studio export is a JSON list of tasks")
    names = label_map or {n: i for i, n in enumerate(classes.names)}
    by_id = {s["sample_id"]: s for s in manifest["samples"]}
    by_stem: dict[str, list[dict[str, Any]]] = {}
    for s in manifest["samples"]:
        for stem in {s["name"], Path(s["image"]).stem, Path(str(s["sample_id"])).name}:
            by_stem.setdefault(stem, []).append(s)
    found: list[ImportedMask] = []
    for k, task in enumerate(tasks):
        task = task if isinstance(task, dict) else {}
        where = f"{export}: Label Studio task {task['id']}" if "id" in task else f"{export}: task {k} (no id)"
        data = task.get("data", {}) or {}
        image = str(data.get("image", ""))
        entry = by_id.get(data.get("sample_id"))
        if entry is None and data.get("sample_id") is not None:
            raise ValueError(f"{where}: sample {data['sample_id']!r} is not in this request ({len(by_id)} images, "
                             f"round {manifest.get('round')}): an export of another project or round?")
        if entry is None:
            matches = {s["sample_id"]: s for s in by_stem.get(url_stem(image), [])}
            if len(matches) > 1:
                raise ValueError(f"{where}: image {image!r} matches {len(matches)} requested images "
                                 f"({', '.join(sorted(matches))}); give the task a sample_id")
            if not matches:
                raise ValueError(f"{where}: image {image!r} is not one of the {len(by_id)} images of this request "
                                 f"(round {manifest.get('round')}): an export of another project or round?")
            entry = next(iter(matches.values()))
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations:
            continue  # not annotated yet: a partial import
        ann = max(annotations, key=lambda a: (str(a.get("updated_at", "")), a.get("id", 0)))
        height, width = entry["height"], entry["width"]
        mask = np.full((height, width), classes.ignore_index, dtype=np.uint8)
        for result in ann.get("result", []):
            if result.get("type") != "brushlabels":
                continue
            value = result.get("value", {})
            labels = value.get("brushlabels") or []
            if len(labels) != 1 or labels[0] not in names:
                raise ValueError(f"{where}: label {labels!r} is not in the label map ({', '.join(names)})")
            rh, rw = result.get("original_height", height), result.get("original_width", width)
            if (rh, rw) != (height, width):
                raise ValueError(f"{where}: brush size {(rh, rw)} does not match its image {(height, width)}")
            region = brush_to_mask(value.get("rle", []), height, width)
            mask[region] = names[labels[0]]
        _check_mask(mask, where, (height, width), classes)
        found.append(ImportedMask(entry["sample_id"], mask, where))
    return found


def read_answers(source: Path, manifest: Mapping[str, Any], classes: Any,
                 label_map: Mapping[str, int] | None = None) -> list[ImportedMask]:
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        found = read_label_studio_answers(source, manifest, classes, label_map)
    elif source.is_dir():
        found = read_folder_answers(source, manifest, classes)
    else:
        raise FileNotFoundError(f"label source {source} is neither a folder of masks nor a Label Studio .json export")
    seen: set[str] = set()
    for item in found:
        if item.sample_id in seen:
            raise ValueError(f"{item.source}: a second mask for sample {item.sample_id}")
        seen.add(item.sample_id)
    return found


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask).tobytes() + str(mask.shape).encode()).hexdigest()[:16]


def save_answers(answers: Sequence[ImportedMask], folder: Path) -> dict[str, str]:
    """Write each answer's mask to ``folder/<task name>-<digest>.png``; sample id -> path.

    Named by content, a file is never rewritten: a revision that points to it keeps its mask."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for a in answers:
        path = folder / f"{task_name(a.sample_id)}-{mask_digest(a.mask)}.png"
        if not path.exists():
            png: bytes = cv2.imencode(".png", a.mask)[1].tobytes()
            atomic_write(path, partial(Path.write_bytes, data=png))
        paths[a.sample_id] = str(path)
    return paths


def write_back(answers: Sequence[ImportedMask], image_paths: Mapping[str, str]) -> list[str]:
    """Write each answer's mask next to its image in the pool: ``<pool>/masks/<image stem>.png``
    beside ``<pool>/images/`` (``data.write_back_masks``; a local folder or a bucket). Returns the
    paths written."""
    from workers import base_name, join_path, parent_path, write_bytes

    written = []
    for a in answers:
        image = str(image_paths[a.sample_id])
        target = join_path(parent_path(parent_path(image)), "masks", f"{Path(base_name(image)).stem}.png")
        write_bytes(target, cv2.imencode(".png", a.mask)[1].tobytes())
        written.append(target)
    return written
