"""Data-pipeline figures: prepare throughput and peak memory, batch assembly rate, for the
default schema and a rich one (two sequences, six more features).

    python benchmarks/data.py            # 1M events, batches at B=128 and 1024, T=100
    python benchmarks/data.py --large    # also 10M events (~15-30 s on 2 cores, ~3.5 GB RSS)
    python benchmarks/data.py --against /tmp/old/src --rounds 5
        # the default schema here vs another checkout's code, interleaved, as ratios
        # (e.g. `git archive 8cc926c src | tar -x -C /tmp/old`: the code before the schema)

First the whole ``dinrec prepare events`` command is timed on the generated log written
to a Parquet file (what a user runs). Then each prepare runs in a fresh subprocess so its
peak RSS (``ru_maxrss``) is its own.
Synthetic generation is timed separately and not counted in the prepare rate; "cpu s" is
the prepare's CPU time over all threads (steadier than wall time on a shared machine).
Histories are not written per sample: each user's sequence is stored once
(``sequences.arrow``, ~8 bytes per event per sequence) and a sample row holds keys and
``(seq, end)``, so the Parquet shards hold only small scalar columns (~1.95 rows per event
with one sampled negative per positive). The peak RSS includes the generated events table.
Batches gather each history from the memory-mapped sequences and every item / user feature
from the side tables by key.

The rich schema (:func:`dinrec.data.synthetic.rich_schema`) adds user gender and age
(bucketed), item brand, genres (multi, 2 values) and price (numeric, log), the hour
(context), and splits the positives into ``liked`` (rating >= 4, with the rating and the
bucketed time gap per event) and ``disliked`` sequences.

With ``--against`` each round runs, in child processes and alternating which goes first,
the prepare of 1M events and a batch-rate measurement (samples per CPU second of the
process) of both code trees on the default schema; it prints the median (and range) of
the ratios this / other. Prints tables; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)

PRESETS = {"1M": ("medium", {}), "10M": ("large", {})}
BATCH_CASES = (("shuffle", {}), ("shuffle+bucket", {"bucket": True}),
               ("shuffle+neg_history=1", {"neg_history": 1}))


def _child_prepare(size: str, out: str, schema: str) -> None:
    from dinrec.data import PrepareConfig, generate, prepare_events, preset

    name, over = PRESETS[size]
    t0 = time.perf_counter()
    events, truth = generate(preset(name, **over))
    kw = {}
    if schema == "rich":
        from dinrec.data.synthetic import rich_schema, side_features

        events, items, users = side_features(events, truth)
        kw = {"schema": rich_schema(), "items": items, "users": users}
    gen_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    stats = prepare_events(events, out, PrepareConfig(), **kw)
    prep_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    print(json.dumps({
        "events": events.num_rows, "gen_s": gen_s, "prepare_s": prep_s, "cpu_s": cpu_s,
        "peak_rss_mib": rss,
        "rows": sum(stats["rows"].values()),
        "mean_hist": stats["splits"]["train"]["history_length"]["mean"],
    }))  # fmt: skip


def _padded_len(b) -> int:
    if hasattr(b, "hist_items"):  # the flat batch of the code before the schema
        return int(b.hist_items.shape[1])
    return sum(int(s.mask.shape[1]) for s in b.sequences.values())


def _batch_rate(store: str, batch_size: int, seconds: float = 5.0, cpu: bool = False,
                **kw) -> tuple[float, float]:
    """Samples per second (wall, or with ``cpu`` per CPU second of this process: steadier
    on a shared machine) and the mean padded history length, over ``seconds``."""
    from dinrec.data import BatchLoader

    clock = time.process_time if cpu else time.perf_counter
    loader = BatchLoader(store, "train", batch_size=batch_size, max_len=100, **kw)
    n = pad = 0
    t0 = clock()
    while clock() - t0 < seconds:
        for b in loader:
            n += len(b)
            pad += _padded_len(b)
            if clock() - t0 > seconds:
                break
    dt = clock() - t0
    return n / dt, pad * batch_size / max(n, 1)


def _run(cmd: list[str], src: str | None = None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, __file__, *cmd], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cli_prepare(tmp: str, size: str) -> tuple[int, float]:
    """The whole ``dinrec prepare events`` command (start-up, reading the file, writing the
    store) on the generated log written to a Parquet file: (events, wall seconds)."""
    import pyarrow.parquet as pq

    from dinrec.data import generate, preset

    name, over = PRESETS[size]
    events, _ = generate(preset(name, **over))
    path = Path(tmp) / f"events-{size}.parquet"
    pq.write_table(events, path)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dinrec", "prepare", "events", str(path), "--cat-col", "cat",
                    "--time-col", "ts", "--out", str(Path(tmp) / f"cli-{size}"), "--quiet"],
                   check=True, capture_output=True)
    return events.num_rows, time.perf_counter() - t0


def _table(tmp: str, sizes: list[str]) -> None:
    print(f"CPU: {cpu_description()}")
    for size in sizes:
        n, sec = _cli_prepare(tmp, size)
        print(f"`dinrec prepare events` from a Parquet file, default schema: {n:,} events in "
              f"{sec:.2f} s ({n / sec:,.0f} events/s, the whole command)")
    print(f"{'schema':>7} {'events':>10} {'prepare s':>10} {'cpu s':>7} {'events/s':>12} "
          f"{'samples':>11} {'mean hist':>9} {'peak RSS MiB':>12} {'(gen s)':>8}")
    for schema in ("default", "rich"):
        for size in sizes:
            out = str(Path(tmp) / f"{schema}-{size}")
            r = _run(["--child", size, out, schema])
            print(f"{schema:>7} {r['events']:>10,} {r['prepare_s']:>10.2f} {r['cpu_s']:>7.2f} "
                  f"{r['events'] / r['prepare_s']:>12,.0f} {r['rows']:>11,} "
                  f"{r['mean_hist']:>9.1f} {r['peak_rss_mib']:>12,.0f} {r['gen_s']:>8.2f}")
    print()
    print(f"{'schema':>7} {'batch':>6} {'options':>22} {'samples/s':>12} {'mean T':>7}")
    for schema in ("default", "rich"):
        for bs in (128, 1024):
            for label, kw in BATCH_CASES:
                rate, mean_t = _batch_rate(str(Path(tmp) / f"{schema}-1M"), bs, **kw)
                print(f"{schema:>7} {bs:>6} {label:>22} {rate:>12,.0f} {mean_t:>7.1f}")


def _compare(tmp: str, other: str, rounds: int, seconds: float) -> None:
    """This tree vs ``other`` on the default schema, interleaved, as ratios this / other."""
    ratios: dict[str, list[float]] = {}
    for r in range(rounds):
        order = [("this", None), ("other", other)]
        if r % 2:
            order.reverse()
        got: dict[str, dict[str, float]] = {}
        for name, src in order:
            out = str(Path(tmp) / f"cmp-{name}")
            p = _run(["--child", "1M", out, "default"], src)
            got.setdefault(name, {})["prepare wall s"] = p["prepare_s"]
            got[name]["prepare cpu s"] = p["cpu_s"]
            for bs in (128, 1024):
                for label, kw in BATCH_CASES:
                    b = _run(["--child-batches", out, str(bs), json.dumps(kw), str(seconds)], src)
                    got[name][f"samples/cpu-s B={bs} {label}"] = b["rate"]
        for k in got["this"]:
            ratios.setdefault(k, []).append(got["this"][k] / got["other"][k])
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    print(f"this ({Path(__file__).resolve().parents[1]}) / other ({other}), default schema, "
          f"1M events, {rounds} interleaved rounds (time: < 1 is faster; rate: > 1 is faster)")
    print(f"CPU: {cpu_description()}")
    print(f"{'measure':>40} {'median':>8} {'min':>7} {'max':>7}")
    for k, v in ratios.items():
        print(f"{k:>40} {statistics.median(v):>8.3f} {min(v):>7.3f} {max(v):>7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also prepare 10M events")
    ap.add_argument("--against", metavar="SRC", help="compare with the code in this src folder")
    ap.add_argument("--rounds", type=int, default=5, help="--against: interleaved rounds")
    ap.add_argument("--seconds", type=float, default=3.0, help="--against: per batch rate")
    ap.add_argument("--child", nargs=3, metavar=("SIZE", "OUT", "SCHEMA"), help=argparse.SUPPRESS)
    ap.add_argument("--child-batches", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_prepare(*args.child)
        return
    if args.child_batches:
        store, bs, kw, seconds = args.child_batches
        rate, _ = _batch_rate(store, int(bs), float(seconds), cpu=True, **json.loads(kw))
        print(json.dumps({"rate": rate}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            _compare(tmp, args.against, args.rounds, args.seconds)
        else:
            _table(tmp, ["1M", "10M"] if args.large else ["1M"])


if __name__ == "__main__":
    main()
