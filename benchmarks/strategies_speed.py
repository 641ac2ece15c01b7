"""Selection speed and memory of the strategies on large synthetic score tables (a script, not a test).

    .venv/bin/python benchmarks/strategies_speed.py

Times ``select`` on a 1,000,000-row table (entropy, margin, class_balance over 11 classes, fusion,
power) and core-set (and cluster_uncertainty) on 100,000 x 128 float32 embeddings, each against a
baseline measured in the same process on the same data (``np.argsort`` of one score column), and
records peak memory: tracemalloc's peak of Python/numpy allocations during one run, and the growth
of the process's peak RSS (``ru_maxrss``, only visible when a run exceeds every earlier peak). Writes
``benchmarks/results/strategies_speed.json`` and ``.md``. Targets: selection on 1M rows < 2 s,
core-set on 100k x 128 < 60 s. The machine may be shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strategies import Strategy, build_strategy, columns  # noqa: E402

SELECTION_TARGET_S = 2.0
CORESET_TARGET_S = 60.0
NUM_CLASSES = 11


def score_table(rows: int, labeled_share: float, seed: int) -> pd.DataFrame:
    """A scorer-like table: sorted string ids, ~1% labeled, mean uncertainties, 11 class shares
    with a realistic imbalance (road/sky common, pole/sign rare)."""
    rng = np.random.default_rng(seed)
    labeled = np.zeros(rows, dtype=bool)
    labeled[rng.choice(rows, int(rows * labeled_share), replace=False)] = True
    prevalence = np.array([30, 20, 15, 10, 8, 6, 4, 3, 2, 1, 0.5])
    shares = rng.dirichlet(prevalence / prevalence.sum() * 5, rows)
    data: dict[str, Any] = {
        "sample_id": pd.array([f"s{i:07d}" for i in range(rows)], dtype="str"),
        "labeled": labeled,
        columns.ENTROPY_MEAN: rng.gamma(2.0, 0.3, rows),
        columns.MARGIN_MEAN: rng.beta(5, 2, rows),
    }
    for c in range(NUM_CLASSES):
        data[columns.class_fraction_column(c)] = shares[:, c].astype(np.float64)
    return pd.DataFrame(data)


def embeddings(rows: int, dim: int, seed: int) -> np.ndarray:
    """float32 [rows, dim]: a mixture of 50 Gaussian blobs (embeddings are clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(50, dim)).astype(np.float32)
    out = centers[rng.integers(0, 50, rows)]
    out += rng.standard_normal((rows, dim), dtype=np.float32)
    return out


def run_select(strategy: Strategy, table: pd.DataFrame, budget: int, emb: np.ndarray | None = None) -> list[str]:
    """One selection with a fresh generator, so every timed run does the same work."""
    return strategy.select(table, budget, np.random.default_rng(0), embeddings=emb)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def peak_memory(fn: Callable[[], Any]) -> dict[str, float]:
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tracemalloc_peak_mib": peak / 2**20, "ru_maxrss_growth_mib": (after_rss - before_rss) / 1024}


def case(name: str, fn: Callable[[], Any], repeats: int, baseline_s: float | None, target_s: float,
         detail: str) -> dict[str, Any]:
    print(f"  {name} ...", flush=True)
    times, result = timed(fn, repeats)
    memory = peak_memory(fn)
    median = statistics.median(times)
    row = {
        "case": name,
        "detail": detail,
        "seconds_median": median,
        "seconds_all": times,
        "ratio_to_baseline": None if baseline_s is None else median / baseline_s,
        "target_s": target_s,
        "meets_target": median < target_s,
        **memory,
        "load_avg_after": os.getloadavg()[0],
    }
    if isinstance(result, list):
        row["selected"] = len(result)
    print(f"    {median:.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}), "
          f"tracemalloc peak {memory['tracemalloc_peak_mib']:.0f} MiB", flush=True)
    return row


def selection_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The 1M-row cases; the tables are freed when this returns."""
    print(f"building a {args.rows:,}-row table ...", flush=True)
    table = score_table(args.rows, labeled_share=0.01, seed=0)
    shuffled = table.sample(frac=1.0, random_state=1).reset_index(drop=True)
    entropy = table[columns.ENTROPY_MEAN].to_numpy()
    baseline_times, _ = timed(lambda: np.argsort(entropy), args.repeats)
    baseline = statistics.median(baseline_times)
    print(f"  baseline np.argsort of one column: {baseline:.3f} s", flush=True)

    results: list[dict[str, Any]] = [{
        "case": "baseline: np.argsort(entropy_mean)", "detail": f"{args.rows:,} float64",
        "seconds_median": baseline, "seconds_all": baseline_times, "ratio_to_baseline": 1.0,
        "target_s": None, "meets_target": None, **peak_memory(lambda: np.argsort(entropy)),
        "load_avg_after": os.getloadavg()[0],
    }]
    selection: dict[str, dict[str, Any]] = {
        "entropy": {},
        "margin": {},
        "class_balance": {},
        "fusion": {"members": {"entropy": 0.7, "class_balance": 0.3}},
        "power": {"base": "entropy", "beta": 2.0},
    }
    for budget in args.budgets:
        for name, options in selection.items():
            strategy = build_strategy(name, **options)
            results.append(case(
                f"{name} budget {budget}",
                functools.partial(run_select, strategy, table, budget),
                args.repeats, baseline, SELECTION_TARGET_S,
                f"{args.rows:,} rows, {NUM_CLASSES} classes, options {options or 'default'}",
            ))
    strategy = build_strategy("entropy")
    results.append(case(
        f"entropy budget {args.budgets[-1]}, rows shuffled",
        lambda: strategy.select(shuffled, args.budgets[-1], np.random.default_rng(0)),
        args.repeats, baseline, SELECTION_TARGET_S,
        "rows not in sample_id order: includes sorting the string ids",
    ))
    return results


def coreset_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Core-set on the embedding matrix, 1% of the rows labeled (their embeddings are the centers)."""
    print(f"building {args.coreset_rows:,} x {args.dim} embeddings ...", flush=True)
    small = score_table(args.coreset_rows, labeled_share=0.01, seed=1)
    emb = embeddings(args.coreset_rows, args.dim, seed=2)
    emb_baseline_times, _ = timed(lambda: np.argsort(small[columns.ENTROPY_MEAN].to_numpy()), args.repeats)
    emb_baseline = statistics.median(emb_baseline_times)
    coreset = build_strategy("coreset")
    results: list[dict[str, Any]] = []
    for budget in args.budgets:
        results.append(case(
            f"coreset budget {budget}",
            functools.partial(run_select, coreset, small, budget, emb),
            1, emb_baseline, CORESET_TARGET_S,
            f"{args.coreset_rows:,} x {args.dim} float32, {int(small.labeled.sum()):,} labeled rows as centers; "
            f"baseline np.argsort of one {args.coreset_rows:,}-row column = {emb_baseline:.4f} s",
        ))
    cluster = build_strategy("cluster_uncertainty")
    for budget in args.budgets:
        results.append(case(
            f"cluster_uncertainty budget {budget}",
            functools.partial(run_select, cluster, small, budget, emb),
            1, emb_baseline, CORESET_TARGET_S,
            f"k-means into {budget} clusters (k-means++ and 10 Lloyd iterations) on the same embeddings; "
            f"no target was set, the core-set one is shown",
        ))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the selection table")
    parser.add_argument("--coreset-rows", type=int, default=100_000, help="rows of the embedding matrix")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 1000], help="samples to select")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per selection case (median reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "strategies_speed")
    args = parser.parse_args(argv)

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/strategies_speed.py", *sys.argv[1:]])
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)

    results = selection_cases(args) + coreset_cases(args)

    load_after = os.getloadavg()
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "pandas": pd.__version__},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "targets": {"selection_1m_rows_s": SELECTION_TARGET_S, "coreset_100k_x_128_s": CORESET_TARGET_S},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Strategy selection speed",
        "",
        f"Command: `{report['command']}` (from the repository root)",
        "",
        f"{report['date']}; {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, numpy {m['numpy']}, "
        f"pandas {m['pandas']}. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_after'])} (a shared machine: other jobs ran).",
        "",
        "Seconds are the median of the timed runs; the ratio is against the baseline in the same run "
        "(`np.argsort` of one float64 column of the same table). Memory: tracemalloc peak of Python and "
        "numpy allocations during one run (the table itself not included), and growth of the process "
        "peak RSS (0 when the run stayed under an earlier peak).",
        "",
        "| case | seconds | x baseline | target | tracemalloc peak MiB | RSS growth MiB | detail |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for r in report["results"]:
        ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.1f}"
        target = "" if r["target_s"] is None else f"< {r['target_s']:g} s: {'yes' if r['meets_target'] else 'NO'}"
        lines.append(
            f"| {r['case']} | {r['seconds_median']:.3f} | {ratio} | {target} | "
            f"{r['tracemalloc_peak_mib']:.0f} | {r['ru_maxrss_growth_mib']:.0f} | {r['detail']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
