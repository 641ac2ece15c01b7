"""The ``shoal`` command line: a thin layer over :class:`ActiveLearningLoop`."""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _drive(loop: object) -> int:
    from ._loop import ActiveLearningLoop

    assert isinstance(loop, ActiveLearningLoop)
    while not loop.done:
        result = loop.step()
        if result is None:
            break
        _print_round(result)
    print(f"stopped: {loop.stop_reason}")
    print(_ui_hint(loop.tracking_uri))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ._config import load_config
    from ._loop import ActiveLearningLoop

    cfg = load_config(args.config, args.set or [])
    workdir = Path(args.workdir or Path("runs") / cfg.experiment.name)
    print(f"work dir: {workdir.resolve()}", flush=True)
    return _drive(ActiveLearningLoop(cfg, workdir))


def _cmd_resume(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop

    loop = ActiveLearningLoop.resume(args.workdir)
    if loop.done:
        print(f"nothing to resume: stopped ({loop.stop_reason})")
        return 0
    return _drive(loop)


def _cmd_status(args: argparse.Namespace) -> int:
    from ._loop import ActiveLearningLoop

    status = ActiveLearningLoop.resume(args.workdir).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for key, value in status.items():
        print(f"{key}: {value}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
