"""Reproduce docs/results.md: real datasets x models x seeds, through the `dinrec` CLI.

    python benchmarks/results.py run   --datasets ml-1m,grocery,beauty --models base,wide_deep,pnn,din
    python benchmarks/results.py table > docs/results-table.md

``run`` prepares each dataset once (from ``--data``, default ``../shared/data``) and
trains every (model, seed) into ``--root`` (default ``runs/results``), skipping runs
whose ``metrics.json`` exists; ``--jobs 2`` runs two trainings at a time, each on one
thread. Every command it runs is printed (and kept in ``commands.txt``), so any row of
the table can be reproduced by hand. ``table`` prints mean +- std over seeds of test
AUC / GAUC / logloss, the model being the one with the best validation AUC.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATASETS: dict[str, list[str]] = {
    "ml-1m": ["movielens", "{data}/movielens-1m/ratings_users_0001-2999.dat.gz",
              "{data}/movielens-1m/movies.dat"],
    "grocery": ["events", "{data}/amazon-grocery-5core-rechorus/train.csv", "--sep", "\\t",
                "--user-col", "user_id", "--item-col", "item_id", "--time-col", "time",
                "--item-cats", "{data}/amazon-grocery-5core-rechorus/item_meta.csv",
                "--item-cats-cols", "item_id,i_category"],
    "beauty": ["sequences", "{data}/amazon-beauty-5core-s3rec/Beauty.txt",
               "{data}/amazon-beauty-5core-s3rec/Beauty_item2attributes.json"],
}
# The tables of docs/results.md were made in the DIEN reference configuration (dinrec's
# defaults then): pinned, so that they reproduce; `-- --no-bucket ...` adds options after it.
TRAIN_ARGS = ["--reference", "--max-steps", "3000", "--eval-every", "500", "--patience", "3",
              "--threads", "1", "--quiet"]


def _sh(cmd: list[str], log: Path, fatal: bool = True) -> None:
    """Print and log ``cmd``, run it; on failure print its stderr and stop (``fatal``) or go on."""
    line = " ".join(shlex.quote(c) for c in cmd)
    print(line, flush=True)
    with open(log, "a") as f:
        f.write(line + "\n")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
        if fatal:
            raise SystemExit(f"failed: {line}")
        print(f"failed: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.txt"
    dinrec = [sys.executable, "-m", "dinrec"]
    jobs = []
    for ds in args.datasets.split(","):
        store = root / ds / "store"
        if not (store / "stats.json").exists():
            cmd = [c.format(data=args.data) for c in DATASETS[ds]]
            _sh([*dinrec, "prepare", *cmd, "--out", str(store), "--quiet"], log)
        for seed in args.seeds.split(","):
            for model in args.models.split(","):
                run_dir = root / ds / f"{model}-seed{seed}"
                if (run_dir / "metrics.json").exists():
                    continue
                jobs.append([*dinrec, "train", str(store), str(run_dir), "--model", model,
                             "--seed", seed, "--overwrite", *TRAIN_ARGS, *args.extra])
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: _sh(c, log), jobs))


def table(args: argparse.Namespace) -> None:
    root = Path(args.root)
    order = args.models.split(",")
    print("| dataset | model | test AUC | test GAUC | test logloss | seeds | train samples/s |")
    print("|---|---|---|---|---|---|---|")
    for ds in args.datasets.split(","):
        for model in order:
            ms = [json.loads(p.read_text()) for p in sorted((root / ds).glob(f"{model}-seed*/metrics.json"))]
            if not ms:
                continue

            def cell(key: str, ms=ms) -> str:
                vals = [m["test"][key] for m in ms]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.mean(vals):.4f} ± {sd:.4f}"

            speed = statistics.median(m["train_samples_per_s"] for m in ms)
            print(f"| {ds} | {model} | {cell('auc')} | {cell('gauc')} | {cell('logloss')} | "
                  f"{len(ms)} | {speed:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--datasets", default="ml-1m,grocery,beauty")
    parser.add_argument("--models", default="base,wide_deep,pnn,din")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--root", default="runs/results")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more `dinrec train` options (after --)")
    args = parser.parse_args()
    run(args) if args.action == "run" else table(args)


if __name__ == "__main__":
    main()
