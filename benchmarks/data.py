"""Data-pipeline figures: prepare throughput and peak memory, batch assembly rate.

    python benchmarks/data.py            # 1M events, batches at B=128 and 1024, T=100
    python benchmarks/data.py --large    # also 10M events (~15-30 s on 2 cores, ~3.5 GB RSS)

Each prepare runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own.
Synthetic generation is timed separately and not counted in the prepare rate; "cpu s" is
the prepare's CPU time over all threads (steadier than wall time on a shared machine).
Histories are not written per sample: each user's sequence is stored once
(``sequences.arrow``, ~16 bytes per event) and a sample row holds ``(seq, hist_end)``, so
the Parquet shards hold only small scalar columns (~1.95 rows per event with one sampled
negative per positive). The rate is bound by the NumPy work of building the samples
(sort, negatives, the training split's shuffle), not by encoding. The peak RSS includes
the generated events table. Batches gather each history from the memory-mapped sequences.
Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {"1M": ("medium", {}), "10M": ("large", {})}


def _child_prepare(size: str, out: str) -> None:
    from dinrec.data import PrepareConfig, generate, prepare_events, preset

    name, over = PRESETS[size]
    t0 = time.perf_counter()
    events, _ = generate(preset(name, **over))
    gen_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    stats = prepare_events(events, out, PrepareConfig())
    prep_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    print(json.dumps({
        "events": events.num_rows, "gen_s": gen_s, "prepare_s": prep_s, "cpu_s": cpu_s,
        "peak_rss_mib": rss,
        "rows": sum(stats["rows"].values()),
        "mean_hist": stats["splits"]["train"]["history_length"]["mean"],
    }))  # fmt: skip


def _batch_rate(store: str, batch_size: int, seconds: float = 5.0, **kw) -> tuple[float, float]:
    from dinrec.data import BatchLoader

    loader = BatchLoader(store, "train", batch_size=batch_size, max_len=100, **kw)
    n = pad = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in loader:
            n += len(b)
            pad += b.hist_items.shape[1]
            if time.perf_counter() - t0 > seconds:
                break
    dt = time.perf_counter() - t0
    return n / dt, pad * batch_size / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also prepare 10M events")
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_prepare(*args.child)
        return
    sizes = ["1M", "10M"] if args.large else ["1M"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'events':>10} {'prepare s':>10} {'cpu s':>7} {'events/s':>12} {'samples':>11} "
              f"{'mean hist':>9} {'peak RSS MiB':>12} {'(gen s)':>8}")  # fmt: skip
        for size in sizes:
            out = str(Path(tmp) / f"store-{size}")
            res = subprocess.run(
                [sys.executable, __file__, "--child", size, out],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{r['events']:>10,} {r['prepare_s']:>10.2f} {r['cpu_s']:>7.2f} "
                  f"{r['events'] / r['prepare_s']:>12,.0f} "
                  f"{r['rows']:>11,} {r['mean_hist']:>9.1f} {r['peak_rss_mib']:>12,.0f} "
                  f"{r['gen_s']:>8.2f}")  # fmt: skip
        store = str(Path(tmp) / "store-1M")
        print()
        print(f"{'batch':>6} {'options':>22} {'samples/s':>12} {'mean T':>7}")
        for bs in (128, 1024):
            for label, kw in (
                ("shuffle", {}),
                ("shuffle+bucket", {"bucket": True}),
                ("shuffle+neg_history=1", {"neg_history": 1}),
            ):
                rate, mean_t = _batch_rate(store, bs, **kw)
                print(f"{bs:>6} {label:>22} {rate:>12,.0f} {mean_t:>7.1f}")


if __name__ == "__main__":
    main()
