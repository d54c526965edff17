"""In-process latency of ranking: one history (T events) x N candidates, this tree vs a baseline.

Measures the Ranker's id-level path (the torch backend: the model's prepared candidate
scorer, the sigmoid, the NumPy result) for DIN with the default schema, here and in a
baseline source tree (e.g. the commit before the feature schema, ``git archive``d to a
folder), **interleaved in one process**: both trees are imported (the ``dinrec`` modules
of one are dropped from ``sys.modules`` before the other is imported; the objects built
keep working), then blocks of ``--block`` calls alternate baseline / current / DIEN for
``--rounds`` rounds, so a busy machine slows all of them alike. Prints each variant's
median and p90 per call, and the ratio current / baseline (median of the per-round ratios
of block medians). Weights are random (the time does not depend on their values);
vocabulary sizes are ML-1M's.

    git archive 36e3a58 | tar -x -C /tmp/base
    python benchmarks/serve_latency.py --baseline /tmp/base --rounds 30 --threads 2

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {"user": 6042, "item": 3708, "cat": 20}

# Runs in the subprocess: the current API (schema-keyed Batch, create_model).
CURRENT = """
import json, sys, time, numpy as np, torch
torch.set_num_threads({threads})
from dinrec.data.batch import Batch
from dinrec.data.schema import Schema
from dinrec.models import create_model
from dinrec.serve.ranker import _TorchBackend
torch.manual_seed(0)
sizes = {sizes}
model = create_model("{model}", Schema.default({t}), sizes).eval()
backend = _TorchBackend(model, None)
g = torch.Generator().manual_seed(0)
hist = torch.randint(2, sizes["item"], (1, {t}), generator=g)
history = Batch.from_ids(torch.tensor([5]), hist[:, 0], torch.tensor([3]), hist,
                         torch.randint(2, sizes["cat"], (1, {t}), generator=g))
cands = {{"item": torch.randint(2, sizes["item"], ({n},), generator=g),
          "cat": torch.randint(2, sizes["cat"], ({n},), generator=g)}}
f = lambda: backend.candidates(history, cands, False)
"""

# The same path before the feature schema (flat ids, build_model with vocabulary sizes).
BASELINE = """
import json, sys, time, numpy as np, torch
torch.set_num_threads({threads})
from dinrec.models import build_model
from dinrec.serve.ranker import _TorchBackend
torch.manual_seed(0)
sizes = {sizes}
model = build_model("{model}", n_users=sizes["user"], n_items=sizes["item"], n_cats=sizes["cat"]).eval()
backend = _TorchBackend(model, "cpu", None)
rng = np.random.default_rng(0)
hist = rng.integers(2, sizes["item"], {t}); hc = rng.integers(2, sizes["cat"], {t})
items = rng.integers(2, sizes["item"], {n}); cats = rng.integers(2, sizes["cat"], {n})
f = lambda: backend.score_candidates(5, hist, hc, items, cats, False)
"""

def build(src: Path, template: str, model: str, args: argparse.Namespace):
    """Import the ``dinrec`` of ``src`` afresh and return its ``f()`` (one scoring call)."""
    for name in [m for m in sys.modules if m == "dinrec" or m.startswith("dinrec.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        ns: dict = {}
        exec(template.format(threads=args.threads, sizes=repr(SIZES), model=model,
                             t=args.history, n=args.candidates), ns)
        return ns["f"]
    finally:
        sys.path.remove(str(src))


def block(f, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=None, help="a source tree to compare with")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--block", type=int, default=10, help="calls per variant per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--no-dien", action="store_true")
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    variants = {}
    if args.baseline is not None:
        variants["baseline din"] = build(args.baseline / "src", BASELINE, "din", args)
    variants["current din"] = build(here, CURRENT, "din", args)
    if not args.no_dien:
        variants["current dien"] = build(here, CURRENT, "dien", args)
    times: dict[str, list[float]] = {k: [] for k in variants}
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        block(f, 5)  # warm-up: buffers, C builds
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for k, f in variants.items():
            ms = block(f, args.block)
            times[k] += ms
            per_round[k].append(statistics.median(ms))
    print(f"1 history (T={args.history}) x {args.candidates} candidates, {args.threads} threads, "
          f"{args.rounds} rounds x {args.block} calls each, interleaved (load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}):")
    for k, v in times.items():
        print(f"  {k:<13} median {statistics.median(v):7.2f} ms   p90 {np.percentile(v, 90):7.2f} ms")
    if "baseline din" in times:
        ratios = [c / b for b, c in zip(per_round["baseline din"], per_round["current din"], strict=True)]
        print(f"  current / baseline (DIN): {statistics.median(ratios):.3f} (median of per-round ratios; "
              f"quartiles {np.percentile(ratios, 25):.3f}-{np.percentile(ratios, 75):.3f})")


if __name__ == "__main__":
    main()
