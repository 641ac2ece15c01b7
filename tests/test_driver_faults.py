"""The driver killed (SIGKILL, by its own process id) at every phase boundary and inside every phase,
then resumed, ends exactly where an uninterrupted run with the same seed ends: the same labeled set
(ids and rounds), sample weights, model weights and round count, one table revision lineage without
forks, and one MLflow run per round.

Kill points are named checkpoints in the loop (``orchestrator/_faults.py``), armed for one process
through ``SHOAL_TEST_KILL_AT``. A scenario is a chain: each process is killed at the next point of
the chain, the next process resumes and is killed at the following one, so one experiment (one
uninterrupted run's cost plus a process start per point) covers many points. Every kill is checked
to have happened at its point (SIGKILL exit and the checkpoint's own line on stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from orchestrator import TableStore
from orchestrator._faults import ENV_VAR

from .conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "orchestrator"]
TIMEOUT_S = 400


def shoal(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in its own process group; SIGKILL what is left of the group afterwards (the
    local Ray cluster a killed driver started)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop(ENV_VAR, None)
    if kill_at:
        env[ENV_VAR] = kill_at
    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_args(workdir: Path, **sections: dict) -> list[str]:
    return ["run", "--config", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(workdir),
            *tiny_overrides(**sections)]


def killed_at(out: subprocess.CompletedProcess[str], point: str) -> None:
    assert out.returncode == -signal.SIGKILL, f"{point}: not killed (rc {out.returncode}): {out.stderr[-3000:]}"
    assert f"{ENV_VAR}={point}: killing process" in out.stderr, f"{point}: killed elsewhere: {out.stderr[-3000:]}"


def ok(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def state_of(workdir: Path) -> dict:
    return json.loads((workdir / "state.json").read_text())


def outcome(workdir: Path) -> dict:
    """What must not depend on interruptions: labeled set, sample weights, model weights, rounds."""
    import torch

    state = state_of(workdir)
    df = TableStore(workdir / "table").read(state["revision"])
    labeled = df[df.labeled]
    models = {}
    for r in range(1, len(state["history"]) + 1):
        ckpt = torch.load(workdir / "rounds" / f"round-{r:03d}" / "model.pt", weights_only=True)
        models[r] = {k: v.numpy().tobytes() for k, v in ckpt["state_dict"].items()}
    return {
        "labeled": dict(zip(labeled.sample_id, labeled.round_labeled.astype(int))),
        "weights": dict(zip(df.sample_id, df.weight.astype(float))),
        "rounds": (state["round"], len(state["history"]), state["stopped"]),
        "added": [sorted(h["added"]) for h in state["history"]],
        "models": models,
    }


def check_lineage(workdir: Path) -> None:
    """Every stored revision is on the final revision's lineage: no duplicate or orphan revision."""
    store = TableStore(workdir / "table")
    lineage = [i.id for i in store.lineage(state_of(workdir)["revision"])]
    assert sorted(lineage) == store.revisions(), f"revisions off the lineage: {set(store.revisions()) - set(lineage)}"


def check_mlflow(workdir: Path, rounds: int) -> None:
    """One parent run and exactly one finished child run per round, read back from the work dir's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("shoal.run_kind") == "experiment"]
    children = [r for r in runs if r.data.tags.get("shoal.run_kind") == "round"]
    assert len(parents) == 1 and len(runs) == 1 + rounds, [r.data.tags.get("mlflow.runName") for r in runs]
    assert sorted(r.data.tags["shoal.round"] for r in children) == [str(i) for i in range(1, rounds + 1)]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert parents[0].data.metrics["rounds"] == rounds and "shoal.model_uri" in parents[0].data.tags


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("ref") / "work"
    ok(shoal(*run_args(workdir)))
    check_lineage(workdir)
    check_mlflow(workdir, 2)
    return outcome(workdir)


def assert_same_as_reference(workdir: Path, reference: dict) -> None:
    got = outcome(workdir)
    for key in ("rounds", "labeled", "added", "weights"):
        assert got[key] == reference[key], key
    assert got["models"].keys() == reference["models"].keys()
    for r, params in got["models"].items():
        assert params == reference["models"][r], f"round {r}: model weights differ from the uninterrupted run"
    check_lineage(workdir)
    check_mlflow(workdir, 2)


def answer(workdir: Path, folder: Path) -> None:
    """Annotators return the ground-truth masks of the awaited selection, named like the tasks."""
    state = state_of(workdir)
    request = state["round_info"]["label_request"]
    manifest = json.loads((Path(request["task_dir"]) / "manifest.json").read_text())
    truth = TableStore(workdir / "table").read(state["revision"]).set_index("sample_id")["mask_path"]
    (folder / "masks").mkdir(parents=True)
    for s in manifest["samples"]:
        mask = cv2.imread(truth[s["sample_id"]], cv2.IMREAD_UNCHANGED)
        assert mask is not None
        cv2.imwrite(str(folder / "masks" / f"{s['name']}.png"), mask)


def run_killing_at(chain: list[str], oracle: str, tmp_path: Path) -> Path:
    """Drive an experiment to its end as a user would (``shoal run``, then ``shoal resume`` or, while
    labels are awaited, ``shoal import-labels``), each process armed with the next kill point of
    ``chain``; a process that ends without reaching it (a pause for people, an import) leaves it
    armed for the next. Every point must be reached, in order."""
    workdir = tmp_path / "work"
    points = list(chain)
    started = False
    for _ in range(3 * len(chain) + 12):
        state = state_of(workdir) if started else {}
        if state.get("stopped"):
            break
        request = state["round_info"].get("label_request") if state.get("phase") == "select" else None
        if request and len(request["received"]) < len(request["requested"]):
            answers = tmp_path / f"answers-{state['round']}"
            if not answers.exists():
                answer(workdir, answers)
            args = ["import-labels", str(workdir), str(answers)]
        else:
            args = ["resume", str(workdir)] if started else run_args(workdir, oracle={"kind": oracle})
        point = points[0] if points else None
        out = shoal(*args, kill_at=point)
        started = True
        if out.returncode == -signal.SIGKILL:
            killed_at(out, str(point))
            points.pop(0)
        else:
            ok(out)
    else:
        raise AssertionError("the experiment did not finish")
    assert points == [], f"kill points never reached: {points}"
    return workdir


# Chains of kill points, in the order a run reaches them. A process is killed at the next point of
# the chain, so one experiment covers several. The last round's ``track:after`` comes after the
# parent run was finished and the model logged, the state still saying the round is being tracked.
BOUNDARIES = [f"{phase}:{where}" for phase in ("train", "score", "select", "label", "track") for where in ("before", "after")]
CHAINS = {
    # the default run: inside every phase, the label import included (people label through a task folder)
    "folder-inside-every-phase": ("folder", [
        "train:inside", "score:inside", "select:inside", "label:inside", "import:inside", "import:after",
        "track:inside"]),
    "simulated-every-boundary": ("simulated", [*BOUNDARIES, "train:before", "track:after"]),
    "simulated-inside-every-phase": ("simulated", [
        "train:inside", "score:inside", "select:inside", "label:inside", "track:parent", "track:inside",
        "score:inside", "track:inside"]),
    "folder-boundaries-and-round-2": ("folder", [
        "label:before", "label:after", "track:parent", "import:inside", "import:after", "label:after", "track:after"]),
}
# Each chain runs an experiment twice over (the uninterrupted reference, then the killed one, a
# process start per point): all are marked slow, `make test-slow` (and CI after `make test`) runs
# them; the default run keeps the cheap start and edit kills below.
SLOW = set(CHAINS)


@pytest.mark.parametrize(
    "oracle, chain",
    [pytest.param(*CHAINS[name], id=name, marks=[pytest.mark.slow] if name in SLOW else []) for name in CHAINS])
def test_killed_at_each_point_and_resumed_matches_an_uninterrupted_run(reference, oracle, chain, tmp_path: Path) -> None:
    """The masks people return are the ground truth, so with either oracle the experiment ends like
    the uninterrupted simulated run."""
    workdir = run_killing_at(chain, oracle, tmp_path)
    assert_same_as_reference(workdir, reference)
    if oracle == "folder":  # one import revision per round, whatever was killed in between
        comments = [i.comment for i in TableStore(workdir / "table").lineage(state_of(workdir)["revision"])]
        assert [c.split(":")[0] for c in comments] == ["import labels", "import labels", "initial"]


def test_a_killed_start_or_edit_is_retried_without_a_second_revision(tmp_path: Path) -> None:
    """A start killed after its first revision (no state yet) and an edit killed after its revision
    (state not updated) leave a revision nothing records: the retry reuses it, so the lineage has
    one first revision and one edit revision, as without the kills."""
    workdir = tmp_path / "work"
    store = TableStore(workdir / "table")
    killed_at(shoal(*run_args(workdir), kill_at="start:inside"), "start:inside")
    assert not (workdir / "state.json").exists()
    [first] = store.revisions()
    # The retry starts (reusing the revision), saves its state, and is stopped before any training.
    killed_at(shoal(*run_args(workdir), kill_at="train:before"), "train:before")
    assert store.revisions() == [first] and state_of(workdir)["revision"] == first

    df = store.read(first)
    sid = str(df.loc[df.labeled, "sample_id"].iloc[0])
    weights = tmp_path / "weights.csv"
    weights.write_text(f"sample_id,weight\n{sid},0.25\n")
    edit = ["edit", str(workdir), "--weights", str(weights), "--comment", "down-weight a blurry frame"]
    killed_at(shoal(*edit, kill_at="edit:inside"), "edit:inside")
    [_, edited] = store.revisions()
    assert state_of(workdir)["revision"] == first  # the state never heard of it
    ok(shoal(*edit))
    assert store.revisions() == [first, edited] and state_of(workdir)["revision"] == edited
    table = store.read(edited)
    assert table.loc[table.sample_id == sid, "weight"].item() == 0.25
    assert store.info(edited).parent == first
