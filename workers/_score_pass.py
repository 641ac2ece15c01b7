"""The extended pool scoring pass: everything strategies declared, in one decode of the pool.

Like :func:`~workers._score.score_pool` (a Ray Data ``map_batches`` over an actor pool, results
written as Parquet by the cluster), and on top of the uncertainty columns, as asked by
:class:`PassSpec`:

- SAM agreement: prompts from the model's predicted mask, SAM's masks for them (embeddings from the
  cache), per-image disagreement columns and a per-class breakdown (``strategies.columns``);
- BALD from ``mc_dropout_passes`` Monte-Carlo dropout passes (``bald_mean``);
- pooled encoder embeddings, written by the actors as Parquet files (``sample_id``, ``embedding``)
  beside the scores, read back in table order with :func:`read_embeddings`.

Also :func:`sam_preannotate`, which runs SAM's refinement over the selected samples as Ray tasks with
the scoring actors' resources and writes class-id PNGs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strategies import columns as col

from ._data import load_image
from ._models import load_checkpoint
from ._sam import SamEngine, SamSpec
from ._score import PoolScorer, ScoreResult, ensure_scored_once
from ._train import to_tensor
from ._warm import map_warm

__all__ = ["POOL_FLAG", "PassResult", "PassScorer", "PassSpec", "SamPreannotator", "read_embeddings", "sam_preannotate",
           "score_pool_pass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassSpec:
    """What the pass computes besides the uncertainty columns."""

    sam: SamSpec | None = None
    """SAM agreement columns when set; then ``sam_checkpoint_id`` is required."""
    sam_checkpoint_id: str | None = None
    """:func:`~workers._sam.sam_checkpoint_id` of ``sam.checkpoint``, computed once by the driver."""
    sam_decoder: str | None = None
    """A fine-tuned mask decoder's state dict to use instead of the checkpoint's."""
    mc_dropout_passes: int = 0
    """Monte-Carlo dropout passes per image for ``bald_mean``; 0 = none."""
    embeddings_dir: str | None = None
    """Where to write pooled encoder embeddings; None = none."""
    seed: int = 0
    """Seeds the dropout masks, per image, so a re-run scores the same."""


POOL_FLAG = "pool"
"""Optional bool column of the input rows: True for unlabeled pool rows, the only ones SAM and
MC dropout score (labeled and validation rows, when the pass reviews them too, get NaN). Without
the column every row is a pool row."""


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(1)


class _Recorder(torch.nn.Module):
    """Wraps the base scorer's model and keeps the last batch's input and logits, so the extensions
    reuse its one forward pass instead of decoding the images and running the model again."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.x: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x, self.logits = x, self.model(x)
        return self.logits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)  # type: ignore[operator,no-any-return]


class PassScorer:
    """Ray Data callable class: the :class:`~workers._score.PoolScorer` columns of a batch plus what
    ``spec`` asks for. ``scorer_kwargs`` go to ``PoolScorer`` unchanged."""

    def __init__(self, spec: PassSpec, **scorer_kwargs: Any) -> None:
        self.base = PoolScorer(**scorer_kwargs)
        self.recorder = _Recorder(self.base.model)
        self.base.model = self.recorder  # type: ignore[assignment]
        self.model = self.recorder.model
        self.device = self.base.device
        self.spec = spec
        self.sam: SamEngine | None = None
        if spec.sam is not None:
            if spec.sam_checkpoint_id is None:
                raise ValueError("PassSpec.sam_checkpoint_id is required with PassSpec.sam")
            self.sam = SamEngine(spec.sam, spec.sam_checkpoint_id, self.device, decoder=spec.sam_decoder)
        self.dropout = [m for m in self.model.modules()
                        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
        if spec.mc_dropout_passes and not self.dropout:
            raise ValueError(
                f"the strategy needs {spec.mc_dropout_passes} Monte-Carlo dropout passes but the model in "
                f"{scorer_kwargs.get('checkpoint_path')} has no dropout layer with p > 0 (unet: set model.options.dropout > 0)"
            )

    def _bald(self, x: torch.Tensor, sample_ids: np.ndarray) -> np.ndarray:
        """Mean pixel mutual information over ``mc_dropout_passes`` dropout masks, per image (nats).

        Each image runs as one batch of T copies with its own seed (from its sample id), so its
        score does not depend on which batch it landed in.
        """
        t = self.spec.mc_dropout_passes
        out = np.empty(len(x))
        for m in self.dropout:
            m.train()
        try:
            with torch.no_grad():
                for i in range(len(x)):
                    torch.manual_seed(zlib.crc32(str(sample_ids[i]).encode()) ^ self.spec.seed)
                    probs = torch.softmax(self.model(x[i:i + 1].expand(t, -1, -1, -1)).double(), dim=1)
                    mean = probs.mean(0, keepdim=True)
                    # >= 0 in exact arithmetic (Jensen); clamp the rounding noise of near-equal passes
                    out[i] = float((_entropy(mean)[0] - _entropy(probs).mean(0)).clamp_min(0).mean())
        finally:
            for m in self.dropout:
                m.eval()
        return out

    def _write_embeddings(self, sample_ids: np.ndarray, x: torch.Tensor) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self.spec.embeddings_dir is not None
        with torch.no_grad():
            pooled = self.recorder.encode(x).float().mean(dim=(2, 3)).cpu().numpy().astype(np.float32)
        out = Path(self.spec.embeddings_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "sample_id": pa.array([str(s) for s in sample_ids]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(pooled.ravel()), pooled.shape[1]),
        })
        name = f"part-{uuid.uuid4().hex}.parquet"
        pq.write_table(table, out / f".{name}.tmp")
        os.replace(out / f".{name}.tmp", out / name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.base(batch)
        x, logits = self.recorder.x, self.recorder.logits
        ids = np.asarray(batch["sample_id"])
        assert x is not None and logits is not None and len(x) == len(ids), "PoolScorer ran its model once per batch"
        n, num_classes = len(ids), int(logits.shape[1])
        pool = np.asarray(batch[POOL_FLAG], dtype=bool) if POOL_FLAG in batch else np.ones(n, dtype=bool)
        rows = np.flatnonzero(pool)
        if self.spec.mc_dropout_passes:
            out[col.BALD_MEAN] = np.full(n, np.nan)
            if len(rows):
                out[col.BALD_MEAN][rows] = self._bald(x[rows], ids[rows])
        if self.spec.embeddings_dir is not None:
            self._write_embeddings(ids, x)
        if self.sam is not None:
            # Every batch carries every column (NaN where not scored): the Parquet files share a schema.
            sam_cols = {k: np.full(n, np.nan) for k in (*col.SAM_COLUMNS, *map(col.sam_class_column, range(num_classes)))}
            if len(rows):
                predictions = logits[rows].argmax(1).cpu().numpy()
                paths = [str(batch["image_path"][i]) for i in rows]
                for key, values in self.sam.agreement(paths, predictions, num_classes).items():
                    sam_cols[key][rows] = values
            out.update(sam_cols)
        return out


@dataclass(frozen=True)
class PassResult(ScoreResult):
    sam_images_encoded: int = 0
    """Pool images that went through SAM's image encoder this pass (the rest came from the cache)."""
    embeddings_dir: str | None = None


def _ray_map(ds: Any, fn: type, kwargs: dict[str, Any], *, num_actors: int, batch_size: int,
             cpus_per_actor: float, gpus_per_actor: float, progress_dir: str | None = None,
             name: str | None = None) -> Any:
    # warm tasks: a task whose worker dies is retried in another process (see score_pool)
    return map_warm(ds, fn, kwargs, batch_size=batch_size, workers=num_actors, cpus=cpus_per_actor,
                    gpus=gpus_per_actor, progress_dir=progress_dir, name=name)


def score_pool_pass(
    pool_parquet: str,
    checkpoint_path: str,
    image_size: tuple[int, int],
    out_dir: str,
    spec: PassSpec,
    *,
    num_actors: int = 1,
    batch_size: int = 16,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    progress_dir: str | None = None,
    name: str | None = None,
    **scorer_kwargs: Any,
) -> PassResult:
    """:func:`~workers._score.score_pool` plus what ``spec`` asks for, in the same pass: every row of
    ``pool_parquet`` (``sample_id``, ``image_path``, the optional columns ``PoolScorer`` reads and
    :data:`POOL_FLAG`) is scored and the per-image columns are written as Parquet under ``out_dir``
    (replaced, like ``spec.embeddings_dir``). ``scorer_kwargs`` (``class_names``, ...) go to
    ``PoolScorer``; ``gpus_per_actor`` may be a fraction."""
    import pyarrow.parquet as pq
    import ray

    for d in (out_dir, spec.embeddings_dir):
        if d is not None and Path(d).exists():  # left by an interrupted attempt
            shutil.rmtree(d)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(pool_parquet)
    kwargs = {"spec": spec, "checkpoint_path": checkpoint_path, "image_size": tuple(image_size),
              "use_gpu": gpus_per_actor > 0, **scorer_kwargs}
    scored = _ray_map(ds, PassScorer, kwargs, num_actors=num_actors, batch_size=batch_size,
                      cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, progress_dir=progress_dir,
                      name=name)
    scored.write_parquet(out_dir)
    num = ensure_scored_once(out_dir, pool_parquet)  # a batch retried after its actor died is not counted twice
    files = sorted(Path(out_dir).glob("*.parquet"))
    encoded = 0
    if spec.sam is not None and files:
        cached = pq.read_table(out_dir, columns=[col.SAM_EMBEDDING_CACHED]).column(0).to_numpy(zero_copy_only=False)
        encoded = int((cached == 0).sum())
    return PassResult(scores_dir=out_dir, num_scored=num, seconds=time.perf_counter() - t0,
                      sam_images_encoded=encoded, embeddings_dir=spec.embeddings_dir)


def read_embeddings(embeddings_dir: str, sample_ids: Any) -> np.ndarray:
    """float32 [N, D]: the pooled embeddings written by :func:`score_pool_pass`, row i for
    ``sample_ids[i]``; raises ValueError naming an id without one."""
    import pyarrow.parquet as pq

    table = pq.read_table(embeddings_dir)
    ids = table.column("sample_id").to_pylist()
    flat = table.column("embedding").combine_chunks()
    matrix = flat.flatten().to_numpy().reshape(len(ids), -1).astype(np.float32)
    row = {s: i for i, s in enumerate(ids)}  # a retried task may have written a row twice: keep the last
    missing = [s for s in sample_ids if str(s) not in row]
    if missing:
        raise ValueError(f"{embeddings_dir}: no embedding for sample_id {missing[0]!r} ({len(missing)} missing)")
    return matrix[[row[str(s)] for s in sample_ids]]


# --------------------------------------------------------------------------------------------
# Pre-annotations


class SamPreannotator:
    """Ray Data callable class: ``{sample_id, image_path, name}`` -> SAM-refined class-id PNGs in
    ``out_dir`` (``<name>.png``, at each image's own size); returns ``{sample_id, path}``."""

    def __init__(self, checkpoint_path: str, image_size: tuple[int, int], sam: SamSpec, sam_checkpoint_id: str,
                 out_dir: str, ignore_index: int, sam_decoder: str | None = None, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint_path).to(self.device).eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.engine = SamEngine(sam, sam_checkpoint_id, self.device, decoder=sam_decoder)
        self.out_dir = Path(out_dir)
        self.ignore_index = ignore_index

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import cv2

        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = [str(p) for p in batch["image_path"]]
        x = torch.stack([to_tensor(load_image(p, size=self.image_size)) for p in paths]).to(self.device)
        with torch.no_grad():
            predictions = self.model(x).argmax(1).cpu().numpy()
        written = []
        for path, name, pred in zip(paths, batch["name"], predictions):
            mask = self.engine.refine(path, pred, self.ignore_index)
            target = self.out_dir / f"{name}.png"
            tmp = self.out_dir / f".{name}.{uuid.uuid4().hex}.png"
            if not cv2.imwrite(str(tmp), mask):
                raise OSError(f"cannot write pre-annotation {tmp}")
            os.replace(tmp, target)
            written.append(str(target))
        return {"sample_id": np.asarray(batch["sample_id"]), "path": np.asarray(written)}


def sam_preannotate(
    sample_ids: list[str],
    image_paths: list[str],
    names: list[str],
    checkpoint_path: str,
    image_size: tuple[int, int],
    sam: SamSpec,
    sam_checkpoint_id: str,
    out_dir: str,
    ignore_index: int,
    *,
    sam_decoder: str | None = None,
    num_actors: int = 1,
    batch_size: int = 4,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> dict[str, str]:
    """SAM-refined pre-annotations of the selected samples: ``<out_dir>/<name>.png`` class-id masks
    at each image's own size (see :meth:`~workers._sam.SamEngine.refine`). Returns sample id -> path.

    A selection is a round's budget, not a pool: it is split over up to ``num_actors`` Ray tasks
    with the scoring actors' resources (a Ray Data pipeline would cost more to start than to run).
    """
    import ray

    kwargs = {"checkpoint_path": checkpoint_path, "image_size": tuple(image_size), "sam": sam,
              "sam_checkpoint_id": sam_checkpoint_id, "out_dir": out_dir, "ignore_index": ignore_index,
              "sam_decoder": sam_decoder, "use_gpu": gpus_per_actor > 0}

    def run(rows: list[tuple[str, str, str]]) -> dict[str, np.ndarray]:
        annotate = SamPreannotator(**kwargs)  # type: ignore[arg-type]
        done: dict[str, list[str]] = {"sample_id": [], "path": []}
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            out = annotate({k: np.asarray([r[i] for r in chunk]) for i, k in enumerate(("sample_id", "image_path", "name"))})
            done["sample_id"] += out["sample_id"].tolist()
            done["path"] += out["path"].tolist()
        return {k: np.asarray(v) for k, v in done.items()}

    rows = list(zip(sample_ids, image_paths, names))
    parts = [rows[i::num_actors] for i in range(min(num_actors, len(rows)))]
    task = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)(run)
    results = ray.get([task.remote(part) for part in parts])
    return {str(s): str(p) for r in results for s, p in zip(r["sample_id"], r["path"])}


def finetune_sam_decoder(*args: Any, cpus: float = 1.0, gpus: float = 0.0, **kwargs: Any) -> dict[str, Any]:
    """:func:`~workers._sam.finetune_decoder` as one Ray task with ``cpus`` and ``gpus`` (fractions
    allowed), on the GPU when given one."""
    import ray

    from ._sam import finetune_decoder

    def run(*a: Any, **kw: Any) -> dict[str, Any]:
        return finetune_decoder(*a, device="cuda" if gpus > 0 and torch.cuda.is_available() else "cpu", **kw)

    return ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus)(run).remote(*args, **kwargs))  # type: ignore[no-any-return]
