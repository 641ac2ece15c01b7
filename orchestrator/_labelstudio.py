"""Label Studio: the run-length format of its ``brushlabels`` results, and how an experiment's task
folders meet a project (labeling config, image URLs, tasks).

Label Studio stores a brush mask as an RGBA image of the task's size, flattened and packed with the
``rle-pack`` bit format: a 32-bit value count, a 5-bit word size minus one, four 4-bit run-length
field sizes minus one, then chunks of ``[repeat bit][2-bit size index][run length - 1][value(s)]``.
The painted pixels have a non-zero alpha channel.

The codec is written here rather than taken from ``label_studio_sdk.converter.brush``: installing
label-studio-sdk 2.1 into Shoal's environment would move numpy down to 2.2 and opencv-python-headless
to 4.12 and add about 25 packages (black, nltk, Faker, a code generator) to every worker image. The
round trip is checked against a real Label Studio's export in ``tests/test_label_studio.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import escape

import numpy as np

_WORD = 8
_RLE_SIZES = (3, 4, 8, 16)


class _Bits:
    def __init__(self, data: Sequence[int]) -> None:
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.i = 0

    def read(self, n: int) -> int:
        if self.i + n > len(self.bits):
            raise ValueError("brush RLE ends early")
        chunk = self.bits[self.i : self.i + n]
        self.i += n
        return int(chunk.dot(1 << np.arange(n - 1, -1, -1, dtype=np.int64))) if n else 0


def decode_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio RLE -> uint8 [count] (for a brush: RGBA values of a H x W image, flattened)."""
    bits = _Bits(rle)
    num = bits.read(32)
    word = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = bits.read(1)
        j = i + 1 + bits.read(sizes[bits.read(2)])
        if j > num:
            raise ValueError(f"brush RLE run past its declared length {num}")
        if repeat:
            out[i:j] = bits.read(word)
            i = j
        else:
            while i < j:
                out[i] = bits.read(word)
                i += 1
    return out


def encode_rle(values: np.ndarray) -> list[int]:
    """uint8 [count] -> Label Studio RLE bytes (runs only; readable by Label Studio's decoder)."""
    flat = np.asarray(values, dtype=np.uint8).ravel()
    out: list[str] = [f"{len(flat):032b}", f"{_WORD - 1:05b}", *(f"{s - 1:04b}" for s in _RLE_SIZES)]
    if len(flat):
        change = np.flatnonzero(np.diff(flat)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(flat)]])
        longest = 1 << _RLE_SIZES[-1]
        for start, end, value in zip(starts, ends, flat[starts]):
            length = int(end - start)
            while length > 0:
                run = min(length, longest)
                idx = next(k for k, s in enumerate(_RLE_SIZES) if run - 1 < (1 << s))
                out.append(f"1{idx:02b}{run - 1:0{_RLE_SIZES[idx]}b}{int(value):08b}")
                length -= run
    bits = "".join(out)
    bits += "0" * (-len(bits) % 8)
    return np.packbits(np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")).tolist()


def mask_to_brush(region: np.ndarray) -> list[int]:
    """bool [H, W] region -> RLE of an RGBA image that is opaque white on the region."""
    rgba = np.repeat(region.astype(np.uint8)[:, :, None] * 255, 4, axis=2)
    return encode_rle(rgba.ravel())


def brush_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """RLE of an RGBA brush image -> bool [H, W] (alpha > 0)."""
    values = decode_rle(rle)
    if values.size != height * width * 4:
        raise ValueError(
            f"brush RLE holds {values.size} values; a {height}x{width} RGBA image needs {height * width * 4}"
        )
    return values.reshape(height, width, 4)[:, :, 3] > 0


# ---------------------------------------------------------------------------------------------
# Projects: the labeling config, image URLs, tasks and exports


@dataclass(frozen=True)
class LabelStudioSpec:
    """How an experiment's task folders meet a Label Studio project.

    names / colors: the label name and ``#rrggbb`` colour of each class id (``oracle.label_map``,
    default the class names): the project's ``BrushLabels`` and the pre-annotations use them.
    Image URLs point at the task folders' copies: ``<url_prefix>/<path under the work dir>`` when
    the work dir is served over HTTP (``oracle.image_root_url``), else Label Studio's own file
    serving, ``/data/local-files/?d=<path under local_files_root>`` (a Local Storage of the project
    covering the work dir). Both stay valid in every round: each round's folder is under the work dir.
    """

    names: tuple[str, ...]
    colors: tuple[str, ...]
    workdir: Path
    url_prefix: str | None
    local_files_root: Path

    def image_url(self, path: Path | str) -> str:
        """The URL Label Studio loads ``path`` (a file under the work dir, or an object storage URI,
        which a cloud storage of the project resolves) from."""
        if "://" in str(path):
            return str(path)
        path = Path(path).resolve()
        if self.url_prefix:
            return f"{self.url_prefix.rstrip('/')}/{quote(path.relative_to(self.workdir).as_posix())}"
        try:
            relative = path.relative_to(self.local_files_root)
        except ValueError:
            raise ValueError(f"oracle.local_files_root: {self.local_files_root} does not hold {path}; it must be the "
                             "work dir or a folder above it") from None
        return f"/data/local-files/?d={quote(relative.as_posix())}"

    def label_config(self) -> str:
        """The project's labeling config: the image and a ``BrushLabels`` with every class."""
        labels = "\n".join(f'    <Label value="{escape(n, {chr(34): "&quot;"})}" background="{c}"/>'
                           for n, c in zip(self.names, self.colors))
        return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
                f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')

    def by_name(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


FROM_NAME = "tag"
TO_NAME = "image"
LOCAL_FILES_PREFIX = "/data/local-files/?d="


def label_studio_spec(names: tuple[str, ...], label_map: Mapping[str, int] | None, workdir: Path,
                      url_prefix: str | None, local_files_root: str | None) -> LabelStudioSpec:
    """The spec of an experiment with classes ``names``; ``label_map`` (Label Studio name -> class
    id) must name every class once at least (the first name of a class is the one shown)."""
    from workers import class_colors

    shown: dict[int, str] = {}
    if label_map:
        for name, class_id in label_map.items():
            if not isinstance(class_id, int) or not 0 <= class_id < len(names):
                raise ValueError(f"oracle.label_map: '{name}' -> {class_id!r} is not a class id (0..{len(names) - 1})")
            shown.setdefault(class_id, name)
        missing = [f"{i} ({names[i]})" for i in range(len(names)) if i not in shown]
        if missing:
            raise ValueError(f"oracle.label_map: no Label Studio name for class {', '.join(missing)}")
    label_names = tuple(shown.get(i, n) for i, n in enumerate(names))
    colors = tuple("#" + "".join(f"{int(v):02x}" for v in rgb) for rgb in class_colors(len(names)))
    root = Path(local_files_root).resolve() if local_files_root else workdir.resolve()
    return LabelStudioSpec(label_names, colors, workdir.resolve(), url_prefix, root)


def task_for(entry: Mapping[str, Any], image_path: Path | str, pre: np.ndarray | None, ignore_index: int,
             spec: LabelStudioSpec, round_index: int, todo_path: Path | None = None) -> dict[str, Any]:
    """One Label Studio task of a task folder ``entry``: the image URL, the sample id and name, and
    the pre-annotation as brush predictions named by the label map."""
    task: dict[str, Any] = {"data": {"image": spec.image_url(image_path), "sample_id": entry["sample_id"],
                                     "name": entry["name"]}}
    if todo_path is not None:  # a region task: where to label (the pre-annotation covers only these regions)
        task["data"]["todo"] = spec.image_url(todo_path)
        task["data"]["regions"] = entry["regions"]
    if pre is not None:
        results = []
        for class_id in np.unique(pre):
            if class_id == ignore_index or class_id >= len(spec.names):
                continue
            results.append({
                "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
                "original_width": entry["width"], "original_height": entry["height"], "image_rotation": 0,
                "value": {"format": "rle", "rle": mask_to_brush(pre == class_id),
                          "brushlabels": [spec.names[int(class_id)]]},
            })
        task["predictions"] = [{"model_version": f"shoal-round-{round_index}", "result": results}]
    return task


def url_stem(url: str) -> str:
    """The file stem an image URL points at: ``/data/local-files/?d=a/b/x.png``, ``http://h/p/x.jpg?sig=..``
    and ``s3://bucket/key/x.png`` all give ``x``."""
    parsed = urlparse(str(url))
    path = parsed.path
    if parsed.query and "d=" in parsed.query and path.rstrip("/").endswith("local-files"):
        path = parse_qs(parsed.query).get("d", [""])[0]
    return Path(unquote(path)).stem
