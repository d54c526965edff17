"""The feature schema on real data: a rich schema against today's default layout, DIN only.

    python benchmarks/schema_results.py run   [--seeds 0,1,2] [--jobs 2]
    python benchmarks/schema_results.py table

(any other option, e.g. ``--max-steps 20``, is passed on to `dinrec train`).

``run`` prepares four stores through the `dinrec` CLI (from ``--data``, default
``../shared/data``) into ``--root`` (default ``runs/schema-results``):

- ``ml-1m/default``: today's layout (user, item, first genre as ``cat``, one history);
- ``ml-1m/rich``: docs/formats.md's ML-1M example: user profile (gender, age,
  occupation, zip prefix), all genres as one multi-valued feature, release year, and
  liked (rating >= 4) / disliked (< 4) sequences, one attention each;
- ``ml-1m/profile-only``, ``ml-1m/split-only``: the two halves of ``rich`` (its user and
  item features with today's one 100-event history; today's features with the
  liked / disliked sequences), to see which half helps;
- ``beauty/first-attr``: today's layout (``cat`` = the first S3-Rec attribute);
- ``beauty/all-attrs``: every attribute as one pooled multi-valued feature, no ``cat``.

It then trains DIN with the same options for both layouts of a dataset (`dinrec train`'s
defaults and docs/results.md's budget), skipping runs whose ``metrics.json`` exists;
runs are ordered by seed so a cut-short session still has complete seeds. Every command
is printed and kept in ``commands.txt``. ``table`` prints mean +- std over seeds of the
test metrics of the best-validation checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results import _sh as results_sh  # benchmarks/results.py (this folder is on sys.path)

ML1M_RICH = {
    "user": ["user", "gender", "age", "occupation", "zip_prefix"],
    "item": ["item", "cat", {"name": "genres", "kind": "multi", "max_values": 6}, "year"],
    "sequences": [
        {"name": "liked", "max_len": 50, "filter_column": "rating", "values": [">=4"]},
        {"name": "disliked", "max_len": 20, "filter_column": "rating", "values": ["<4"]},
    ],
}
# Ablations of ML1M_RICH: the profile and item features with today's one history, and
# the liked / disliked split with today's features.
ML1M_PROFILE = {**ML1M_RICH, "sequences": [{"name": "hist", "max_len": 100}]}
ML1M_SPLIT = {"item": ["item", "cat"], "sequences": ML1M_RICH["sequences"]}
BEAUTY_ALL = {
    "item": ["item", {"name": "attrs", "kind": "multi", "max_values": 8}],
    "sequences": [{"name": "hist", "max_len": 100}],
}
ML = "{data}/movielens-1m/"
BT = "{data}/amazon-beauty-5core-s3rec/"
# (dataset, layout) -> (prepare arguments, schema or None)
LAYOUTS: dict[tuple[str, str], tuple[list[str], dict | None]] = {
    ("ml-1m", "default"): (["movielens", ML + "ratings_users_0001-2999.dat.gz", ML + "movies.dat"], None),
    ("ml-1m", "rich"): (["movielens", ML + "ratings_users_0001-2999.dat.gz", ML + "movies.dat",
                         ML + "users.dat"], ML1M_RICH),
    ("ml-1m", "profile-only"): (["movielens", ML + "ratings_users_0001-2999.dat.gz", ML + "movies.dat",
                                 ML + "users.dat"], ML1M_PROFILE),
    ("ml-1m", "split-only"): (["movielens", ML + "ratings_users_0001-2999.dat.gz", ML + "movies.dat"],
                              ML1M_SPLIT),
    ("beauty", "first-attr"): (["sequences", BT + "Beauty.txt", BT + "Beauty_item2attributes.json"], None),
    ("beauty", "all-attrs"): (["sequences", BT + "Beauty.txt", BT + "Beauty_item2attributes.json"],
                              BEAUTY_ALL),
}
# The tables in docs/results.md were made in the DIEN reference configuration.
TRAIN_ARGS = ["--model", "din", "--reference", "--max-steps", "3000", "--eval-every", "500", "--patience", "3",
              "--threads", "1", "--quiet"]


def _sh(cmd: list[str], log: Path) -> None:
    results_sh(cmd, log, fatal=False)  # a failed run is reported, the others go on


def _prepare(root: Path, data: str, log: Path) -> None:
    for (ds, layout), (args, schema) in LAYOUTS.items():
        store = root / ds / layout / "store"
        if (store / "stats.json").exists():
            continue
        cmd = ["nice", "-n", "10", sys.executable, "-m", "dinrec", "prepare",
               *[a.format(data=data) for a in args]]
        if schema is not None:
            path = root / f"{ds}-{layout}.schema.json"
            path.write_text(json.dumps(schema, indent=1) + "\n")
            cmd += ["--schema", str(path)]
        _sh([*cmd, "--out", str(store), "--quiet"], log)


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.txt"
    _prepare(root, args.data, log)
    jobs = []
    for seed in args.seeds.split(","):
        for ds, layout in LAYOUTS:
            run_dir = root / ds / layout / f"din-seed{seed}"
            if (run_dir / "metrics.json").exists():
                continue
            jobs.append(["nice", "-n", "10", sys.executable, "-m", "dinrec", "train",
                         str(root / ds / layout / "store"), str(run_dir), "--seed", seed,
                         "--overwrite", *TRAIN_ARGS, *args.extra])
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: _sh(c, log), jobs))


def table(args: argparse.Namespace) -> None:
    root = Path(args.root)
    print("| dataset | layout | test AUC | test GAUC | test logloss | seeds | best step |")
    print("|---|---|---|---|---|---|---|")
    for ds, layout in LAYOUTS:
        paths = sorted((root / ds / layout).glob("din-seed*/metrics.json"))
        ms = [json.loads(p.read_text()) for p in paths]
        if not ms:
            continue

        def cell(key: str, ms=ms) -> str:
            vals = [m["test"][key] for m in ms]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.4f} ± {sd:.4f}"

        seeds = ",".join(p.parent.name.removeprefix("din-seed") for p in paths)
        steps = ",".join(str(m.get("best_step", "?")) for m in ms)
        print(f"| {ds} | {layout} | {cell('auc')} | {cell('gauc')} | {cell('logloss')} | "
              f"{seeds} | {steps} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--root", default="runs/schema-results")
    parser.add_argument("--jobs", type=int, default=2)
    args, extra = parser.parse_known_args()  # unknown options go to `dinrec train`
    args.extra = [a for a in extra if a != "--"]
    run(args) if args.action == "run" else table(args)


if __name__ == "__main__":
    main()
