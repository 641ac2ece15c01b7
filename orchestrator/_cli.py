"""The ``shoal`` command line: a thin layer over :class:`ActiveLearningLoop`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def _ui_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow server: {tracking_uri}"
    return (
        f"MLflow store: {tracking_uri}\n"
        f"open its UI with: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
    )


def _print_round(r: object) -> None:
    from ._loop import RoundResult

    assert isinstance(r, RoundResult)
    print(
        f"round {r.round}: labeled {r.trained_on} -> {r.labeled_count}, "
        f"val mIoU {r.val_miou:.4f}, {r.seconds:.1f} s",
        flush=True,
    )
    if "rare-class recipe" in r.extra.get("loss_used", ""):
        print(f"  trained with {r.extra['loss_used']}", flush=True)
    if r.extra.get("rare_classes"):
        print(f"  rarest classes: {r.extra['rare_classes']}", flush=True)
    for text in r.extra.get("warnings", []):
        print(f"  warning: {text}", flush=True)


def _drive(loop: object) -> int:
    from ._loop import ActiveLearningLoop

    assert isinstance(loop, ActiveLearningLoop)
    for result in loop.rounds():
        _print_round(result)
    awaiting = loop.awaiting_labels
    if awaiting is not None:
        missing = len(awaiting["requested"]) - len(awaiting["received"])
        state = loop.state
        when = " (round 0: nothing is trained before these labels)" if state is not None and state.round == 0 else ""
        print(f"awaiting labels{when}: {missing} of {len(awaiting['requested'])} selected samples, "
              f"task folder {awaiting['task_dir']}")
        print(f"import them with: shoal import-labels {loop.workdir} SOURCE, then: shoal resume {loop.workdir}")
        return 0
    print(f"stopped: {loop.stop_reason}")
    print(_ui_hint(loop.tracking_uri))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ._config import load_config
    from ._loop import ActiveLearningLoop

    cfg = load_config(args.config, args.set or [])
    workdir = Path(args.workdir or Path("runs") / cfg.experiment.name)
    args.workdir = str(workdir)
    print(f"work dir: {workdir.resolve()}", flush=True)
    return _drive(ActiveLearningLoop(cfg, workdir, progress="auto"))


def _cmd_resume(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop

    loop = ActiveLearningLoop.resume(args.workdir, progress="auto")
    if loop.done:
        print(f"nothing to resume: stopped ({loop.stop_reason})")
        return 0
    return _drive(loop)


def _cmd_status(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop
    from ._progress import read_status

    status = ActiveLearningLoop.resume(args.workdir).status()
    status["progress"] = read_status(Path(args.workdir))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for key, value in status.items():
        if key != "progress":
            print(f"{key}: {value}")
    print(f"now: {_describe_progress(status['progress'], status.get('awaiting_labels'))}")
    return 0


def _describe_progress(progress: dict | None, awaiting: dict | None = None) -> str:
    """One line on the phase running (or the last one run) from ``progress.json``; a finished
    label phase whose labels are still awaited says so (its export is done, not the labeling)."""
    if not progress:
        return "nothing has run yet"
    where = f"round {progress['round']} {progress['phase']}"
    if not progress.get("running") or progress.get("process_alive") is False:
        outcome = progress.get("outcome") or "stopped"
        if progress.get("running"):  # the process died without saying so
            outcome = f"the process {progress['pid']} is gone"
        elif awaiting is not None and progress["phase"] == "label" and outcome == "done":
            outcome = (f"tasks exported, waiting for {len(awaiting['missing'])} of {awaiting['requested']} labels "
                       "(import-labels, then resume)")
        return f"{where}: {outcome}, {progress['age_s']:.0f} s ago"
    detail = progress.get("detail") or {}
    parts = []
    train = detail.get("train")
    if train:
        parts.append(f"epoch {train['epoch']}/{train['epochs']}, step {train['step']}/{train['steps']}")
        if train.get("loss") is not None:
            parts.append(f"loss {train['loss']:.3f}")
        if train.get("val_miou") is not None:
            parts.append(f"val mIoU {train['val_miou']:.3f}")
        if train.get("eta_s") is not None:
            parts.append(f"about {train['eta_s']:.0f} s left")
    for kind, counts in detail.items():
        if kind != "train":
            parts.append(f"{kind} {counts['done']}/{counts['total']} images, {counts['images_per_s'] or 0:.1f}/s")
    return f"{where} running (pid {progress['pid']} on {progress['host']}, updated {progress['age_s']:.0f} s ago)" + \
        (": " + ", ".join(parts) if parts else "")


def _read_table_file(path: str, value_column: str | None) -> dict[str, str]:
    import csv

    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"edit file not found: {file}") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip() == "sample_id":
        rows = rows[1:]
    out: dict[str, str] = {}
    for n, row in enumerate(rows, start=1):
        if value_column is not None and len(row) < 2:
            raise ValueError(f"{file} row {n}: expected sample_id,{value_column}")
        out[row[0].strip()] = row[1].strip() if value_column is not None else ""
    return out


def _parse_bool(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"{where}: expected true/false, got {text!r}")


def _cmd_import_labels(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop

    loop = ActiveLearningLoop.resume(args.workdir)
    report = loop.import_labels(args.source, task_dir=args.task)
    if "regions" in report:  # a region run: what the answers added inside the asked regions
        print(f"{report['regions']} regions in {len(report['added'])} images added ({report['clicks']:g} clicks), "
              f"{report['unchanged']} answers without new regions; table revision {report['revision']}")
    else:
        print(f"{len(report['added'])} masks added, {report['unchanged']} unchanged; table revision {report['revision']}")
    awaiting = loop.awaiting_labels
    if awaiting is not None:
        missing = len(awaiting["requested"]) - len(awaiting["received"])
        have = f"{missing} of {len(awaiting['requested'])} selected samples still without labels" if missing else \
            f"all {len(awaiting['requested'])} selected samples labeled"
        print(f"{have}; continue with: shoal resume {args.workdir}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop

    weights = exclude = None
    relabel = None
    if args.weights:
        raw = _read_table_file(args.weights, "weight")
        try:
            weights = {k: float(v) for k, v in raw.items()}
        except ValueError as exc:
            raise ValueError(f"{args.weights}: weights must be numbers ({exc})") from None
    if args.exclude:
        exclude = {k: _parse_bool(v, f"{args.exclude} sample {k}") for k, v in _read_table_file(args.exclude, "exclude").items()}
    if args.relabel:
        relabel = list(_read_table_file(args.relabel, None))
    if not (weights or exclude or relabel):
        raise ValueError("nothing to edit: give --weights, --exclude or --relabel")
    loop = ActiveLearningLoop.resume(args.workdir)
    rev = loop.edit(weights=weights, exclude=exclude, relabel=relabel, comment=args.comment)
    print(f"table revision {rev} (parent {loop.store.info(rev).parent}): {args.comment}")
    if relabel and (loop.workdir / "relabel" / rev).exists():
        print(f"relabel task folder: {loop.workdir / 'relabel' / rev}; import with: "
              f"shoal import-labels {args.workdir} SOURCE --task {loop.workdir / 'relabel' / rev}")
    return 0


def _cmd_add_images(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop

    loop = ActiveLearningLoop.resume(args.workdir)
    report = loop.add_images(args.folder)
    print(f"{len(report['added'])} images added to the pool from {report['source']} "
          f"({len(report['labeled'])} with a label); table revision {report['revision']}")
    for path, same in report["duplicates"]:
        print(f"  skipped {path}: the same bytes as {same}, already in the pool")
    for path, error in report["unreadable"]:
        print(f"  skipped {path}: {error}")
    if report["added"]:
        print(f"the next round scores them; continue with: shoal resume {args.workdir}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ._sweep import load_sweep_config, run_sweeps, sweep_dir

    sweep, base = load_sweep_config(args.config, args.set or [])
    root = Path(args.workdir).resolve() if args.workdir else sweep_dir(sweep)
    print(f"sweep dir: {root}", flush=True)

    def show(result: object) -> None:
        from ._sweep import SweepResult

        assert isinstance(result, SweepResult)
        print(f"{result.kind} sweep: {len(result.trials)} trials, best {result.metric} {result.best_value:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in result.best_overrides.items()), flush=True)
        print(f"  best config: {result.best_config_path}  (shoal run --config {result.best_config_path})", flush=True)

    results = run_sweeps(sweep, base, only=args.only, workdir=root, verbose=1 if args.verbose else 0, on_result=show)
    print(_ui_hint(results[-1].tracking_uri))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Active learning for semantic segmentation on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start (or continue) an experiment")
    run.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    run.add_argument("--workdir", help="where everything of the experiment is kept (default runs/<name>)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.epochs=3")
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted experiment from its last finished phase")
    resume.add_argument("workdir")
    resume.set_defaults(func=_cmd_resume)

    status = sub.add_parser("status", help="where an experiment stands")
    status.add_argument("workdir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    imp = sub.add_parser("import-labels", help="validate and add masks returned by annotators")
    imp.add_argument("workdir")
    imp.add_argument("source", help="a folder of class-id PNGs (or masks/ in it), or a Label Studio JSON export")
    imp.add_argument("--task", help="a relabel task folder written by `shoal edit --relabel` (default: the awaited round)")
    imp.set_defaults(func=_cmd_import_labels)

    edit = sub.add_parser("edit", help="reweight, exclude or send back for relabeling, as a new table revision")
    edit.add_argument("workdir")
    edit.add_argument("--weights", help="CSV of sample_id,weight")
    edit.add_argument("--exclude", help="CSV of sample_id,exclude (true/false)")
    edit.add_argument("--relabel", help="file with one sample_id per line")
    edit.add_argument("--comment", required=True, help="why: kept with the revision")
    edit.set_defaults(func=_cmd_edit)

    add = sub.add_parser("add-images", help="new images join the pool of a started experiment, as a new table revision")
    add.add_argument("workdir")
    add.add_argument("folder", nargs="?", help="a folder with images/ (and masks/, read as data.masks says); "
                     "default: the pool folder data.train_dir, for images dropped there")
    add.set_defaults(func=_cmd_add_images)

    sweep = sub.add_parser("sweep", help="Ray Tune sweeps: training hyperparameters, active-learning settings")
    sweep.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep.yaml")
    sweep.add_argument("--only", action="append", choices=["train", "active_learning"],
                       help="run only this sweep (repeatable; default: every enabled one)")
    sweep.add_argument("--workdir", help="the sweep dir (default: the file's workdir, else runs/sweeps/<name>)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a sweep setting, e.g. train.num_samples=4 or overrides.train.epochs=3")
    sweep.set_defaults(func=_cmd_sweep)
    return parser


_RECEIVED: list[int] = []


def _raise_stop(signum: int, frame: object) -> None:
    """SIGTERM (Kubernetes, ``ray job stop``) or SIGINT (Ctrl-C): stop cleanly. Raised as
    KeyboardInterrupt, the one exception Ray's blocking calls (``ray.get``) pass on as it is."""
    _RECEIVED.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _install_stop_handlers() -> None:
    """Our handlers for SIGINT and SIGTERM, in place of Ray's (which print a C stack dump); called
    again once Ray has started, since starting it installs its own."""
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _raise_stop)


def _stopped(args: argparse.Namespace, signum: int) -> int:
    """One line on where the experiment stands and how to go on; the Ray processes this run
    started are stopped. Returns the exit status (128 + the signal)."""
    import workers

    workdir = getattr(args, "workdir", None)
    where = "before the experiment started"
    if workdir and (Path(workdir) / "state.json").exists():
        state = json.loads((Path(workdir) / "state.json").read_text())
        done = state.get("phase") or "none"
        where = f"in round {state['round']} (last finished phase: {done})"
    workers.stop_ray()
    resume = f"; resume with: shoal resume {workdir}" if workdir and (Path(workdir) / "state.json").exists() else ""
    print(f"shoal: stopped by {signal.Signals(signum).name} {where}{resume}", file=sys.stderr, flush=True)
    return 128 + signum


def main(argv: Sequence[str] | None = None) -> int:
    import workers

    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    workers.set_verbose(args.verbose)
    _install_stop_handlers()
    workers.after_ray_start(_install_stop_handlers)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return _stopped(args, _RECEIVED[0] if _RECEIVED else signal.SIGINT)
    except (ValueError, OSError) as exc:  # bad input, a missing file, a store that cannot be reached
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
