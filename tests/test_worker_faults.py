"""Worker faults: a Ray Train worker killed mid-run resumes from the last epoch's checkpoint and ends
with the result of an uninterrupted run; a Ray Data scoring actor killed mid-pool is restarted and
every pool sample is scored exactly once, with the scores of an uninterrupted pass.

Kills are deterministic: the worker (through ``TrainSpec.fault_injection``) or the scoring actor
(a test subclass of the scorer) writes its pid to a file at a chosen point and waits; the test then
sends SIGKILL to that pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workers._augment import AugmentSpec
from workers._train import RESUME_FILE, TrainSpec, result_from_loop, train, train_loop

from .test_training import toy_spec, write_toy_dataset

pytestmark = pytest.mark.ray

torch.set_num_threads(1)

KILL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("toy")
    return {"train": write_toy_dataset(root / "train", 16, seed=0), "val": write_toy_dataset(root / "val", 8, seed=1)}


def small_spec(toy: dict[str, Any], out: Path, **changes: Any) -> TrainSpec:
    """Dropout, augmentation and DDP sampling all draw random numbers: a resume has to restore them."""
    return toy_spec(
        toy, out, model_options={"base_channels": 4, "depth": 1, "dropout": 0.2}, epochs=4, samples_per_epoch=32,
        augment=AugmentSpec(hflip=True, color_jitter=0.2), **changes,
    )


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def kill_when_paused(pid_file: Path) -> threading.Thread:
    """A thread that SIGKILLs the pid written to ``pid_file`` as soon as it appears."""

    def run() -> None:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not pid_file.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------
# Training


def test_resuming_from_an_epoch_checkpoint_gives_the_uninterrupted_result(toy, tmp_path: Path) -> None:
    """In process, no Ray: every epoch's checkpoint directory, given back to the loop, continues
    the run bit for bit (without restoring the random state the scores differ)."""
    spec = small_spec(toy, tmp_path / "out", checkpoint_via_report=True, early_stopping_patience=3)
    kept: dict[int, Path] = {}

    def keep(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None  # rank 0 with checkpoint_via_report: every epoch
        kept[int(metrics["epoch"])] = dst = tmp_path / f"epoch-{int(metrics['epoch'])}"
        shutil.copytree(checkpoint_dir, dst)

    full = train_loop(spec, keep)
    assert sorted(kept) == [0, 1, 2, 3] and {p.name for p in kept[1].iterdir()} == {"model.pt", RESUME_FILE}
    assert full["resumed_at_epoch"] is None
    for epoch in (0, 2, 3):  # 3: the run had finished; only the per-sample signals are left
        again = train_loop(spec, resume_from=str(kept[epoch]))
        assert again["resumed_at_epoch"] == epoch + 1 and again["epochs_run"] == 4
        assert without_timing(again["history"]) == without_timing(full["history"])
        assert {k: v for k, v in again.items() if k not in ("history", "resumed_at_epoch", "loop_seconds")} == {
            k: v for k, v in full.items() if k not in ("history", "resumed_at_epoch", "loop_seconds")
        }


@pytest.mark.parametrize("num_workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_killed_train_worker_resumes_from_the_last_epoch_checkpoint(
    ray_cluster: None, toy, tmp_path: Path, num_workers: int
) -> None:
    """Rank 0 is killed after epoch 1's checkpoint is committed. The restarted worker group trains
    epochs 2 and 3 only and ends where an uninterrupted run with the same seed ends: the same
    metrics and per-sample signals and the same best weights, bit for bit. Exact, because on CPU
    with one torch thread per worker the arithmetic is deterministic and the resume restores every
    random state (without that, the per-sample signals differ, see the test above). One worker is
    compared with the loop run in this process (also one thread); two DDP workers, with a second
    Ray run (slow: ~2 extra minutes)."""
    pause_after = 1
    faults = tmp_path / "faults"
    faults.mkdir()
    workers = {"num_workers": num_workers, "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray_train")}
    if num_workers == 1:
        spec = small_spec(toy, tmp_path / "reference")
        reference = result_from_loop(spec, train_loop(spec), str(tmp_path / "reference" / "model.pt"), 0.0)
    else:
        reference = train(small_spec(toy, tmp_path / "reference"), **workers)

    killer = kill_when_paused(faults / "paused.pid")
    t0, t_start = time.perf_counter(), time.time()
    result = train(small_spec(toy, tmp_path / "killed", fault_injection=(str(faults), pause_after)), **workers)
    killer.join(timeout=1)
    killed_pid = int((faults / "paused.pid").read_text())
    lines = [line.split() for line in (faults / "epochs.log").read_text().splitlines()]
    log = [(int(epoch), int(pid)) for epoch, pid, _ in lines]
    t_epochs = [f"{float(t) - t_start:.1f}" for *_, t in lines]
    print(f"killed run: {time.perf_counter() - t0:.1f} s; rank 0 (epoch, pid): {log} at {t_epochs} s")

    # epochs 0-1 by the killed worker, 2-3 by its replacement: none trained twice
    assert [epoch for epoch, _ in log] == [0, 1, 2, 3]
    assert {pid for epoch, pid in log if epoch <= pause_after} == {killed_pid}
    assert killed_pid not in {pid for epoch, pid in log if epoch > pause_after}
    assert result.resumed_at_epoch == pause_after + 1 and reference.resumed_at_epoch is None

    assert without_timing(result.history) == without_timing(reference.history)
    assert (result.val_miou, result.best_epoch, result.epochs_run) == (reference.val_miou, reference.best_epoch, 4)
    assert result.train_loss == reference.train_loss and result.val_confusion == reference.val_confusion
    ours = torch.load(result.checkpoint_path, weights_only=True)["state_dict"]
    theirs = torch.load(reference.checkpoint_path, weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------------------------
# Scoring


def _pausing(base: type, fault_dir: str, trigger: str) -> type:
    """``base`` (a scorer class) whose actor, on the batch holding ``trigger``, writes its pid to
    ``fault_dir/paused.pid`` and waits to be killed, once; every call is logged to ``calls.log``.
    Defined in a function so Ray pickles it by value."""

    class Pausing(base):  # type: ignore[valid-type,misc]
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            d = Path(fault_dir)
            ids = [str(s) for s in batch["sample_id"]]
            with open(d / "calls.log", "a") as f:
                f.write(f"{os.getpid()} {' '.join(ids)}\n")
            if trigger in ids and not (d / "paused.pid").exists():
                (d / "paused.tmp").write_text(str(os.getpid()))
                os.replace(d / "paused.tmp", d / "paused.pid")
                time.sleep(KILL_TIMEOUT_S)
                raise RuntimeError("the paused scoring actor was not killed")
            return super().__call__(batch)  # type: ignore[no-any-return]

    return Pausing


@pytest.fixture(scope="module")
def pool(toy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """24 pool images (the toy train and val images) and a tiny model."""
    from workers._models import build_model, save_model_state

    root = tmp_path_factory.mktemp("pool")
    images = [*toy["train"][0], *toy["val"][0]]
    ids = [f"pool/{i:03d}" for i in range(len(images))]
    pq.write_table(pa.table({"sample_id": ids, "image_path": images}), root / "pool.parquet")
    torch.manual_seed(0)
    save_model_state(build_model("unet", 3, {"base_channels": 4, "depth": 1}), root / "model.pt")
    return {"root": root, "ids": ids, "parquet": str(root / "pool.parquet"), "checkpoint": str(root / "model.pt")}


def _scores(scores_dir: str) -> pd.DataFrame:
    return pq.read_table(scores_dir).to_pandas().sort_values("sample_id").reset_index(drop=True)


@pytest.mark.parametrize("function", ["score_pool", "score_pool_pass"])
def test_a_killed_scoring_worker_is_replaced_and_every_sample_scored_once(
    ray_cluster: None, pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str
) -> None:
    import ray.data

    import workers._score as score_module
    import workers._score_pass as pass_module

    def run(out: str) -> Any:
        kwargs = {"num_actors": 1, "batch_size": 4, "cpus_per_actor": 1.0}
        if function == "score_pool":
            return score_module.score_pool(pool["parquet"], pool["checkpoint"], (32, 32), out, **kwargs)
        return pass_module.score_pool_pass(pool["parquet"], pool["checkpoint"], (32, 32), out,
                                           pass_module.PassSpec(), **kwargs)

    reference = run(str(tmp_path / "reference"))
    faults = tmp_path / "faults"
    faults.mkdir()
    trigger = pool["ids"][13]  # in the 4th of 6 batches: the actor has scored 3 when it is killed
    # Swap the scorer class where it meets Ray Data (the warm tasks' factory): patching `PoolScorer`
    # in its module instead would make cloudpickle pickle the real class by value (its name no
    # longer resolves to it).
    map_batches = ray.data.Dataset.map_batches

    def pausing_map_batches(self: Any, fn: Any, **kwargs: Any) -> Any:
        fn_kwargs = dict(kwargs.pop("fn_kwargs"))
        fn_kwargs["factory"] = _pausing(fn_kwargs["factory"], str(faults), trigger)
        return map_batches(self, fn, fn_kwargs=fn_kwargs, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", pausing_map_batches)
    killer = kill_when_paused(faults / "paused.pid")
    t0 = time.perf_counter()
    result = run(str(tmp_path / "killed"))
    killer.join(timeout=1)
    killed_pid = int((faults / "paused.pid").read_text())
    calls = [line.split() for line in (faults / "calls.log").read_text().splitlines()]
    print(f"{function} with a kill: {time.perf_counter() - t0:.1f} s; batches by (killed, restarted) actor: "
          f"{sum(int(c[0]) == killed_pid for c in calls)}, {sum(int(c[0]) != killed_pid for c in calls)}")

    retried = [int(pid) for pid, *ids in calls if trigger in ids]
    assert retried[0] == killed_pid and len(retried) == 2 and retried[1] != killed_pid  # a new worker re-ran it

    scores = _scores(result.scores_dir)
    assert result.num_scored == reference.num_scored == len(pool["ids"])
    assert scores["sample_id"].tolist() == sorted(pool["ids"])  # every sample, once
    pd.testing.assert_frame_equal(scores, _scores(reference.scores_dir), check_exact=True)


# ---------------------------------------------------------------------------------------------
# The scored-once check


def test_rows_scored_twice_are_dropped_and_unscored_samples_raise(tmp_path: Path) -> None:
    from workers._score import ensure_scored_once

    pq.write_table(pa.table({"sample_id": ["a", "b", "c"]}), tmp_path / "pool.parquet")
    out = tmp_path / "scores"
    out.mkdir()
    pq.write_table(pa.table({"sample_id": ["a", "b"], "entropy_mean": [0.1, 0.2]}), out / "1.parquet")
    pq.write_table(pa.table({"sample_id": ["b", "c"], "entropy_mean": [0.2, 0.3]}), out / "2.parquet")
    assert ensure_scored_once(str(out), str(tmp_path / "pool.parquet")) == 3
    assert len(list(out.glob("*.parquet"))) == 1
    table = pq.read_table(out).to_pydict()
    assert table == {"sample_id": ["a", "b", "c"], "entropy_mean": [0.1, 0.2, 0.3]}
    assert ensure_scored_once(str(out), str(tmp_path / "pool.parquet")) == 3  # nothing left to drop

    pq.write_table(pa.table({"sample_id": ["a", "b", "c", "d"]}), tmp_path / "bigger.parquet")
    with pytest.raises(RuntimeError, match="1 of 4 pool samples were not scored, e.g. 'd'"):
        ensure_scored_once(str(out), str(tmp_path / "bigger.parquet"))
