"""In-process latency of ranking: one history (T events) x N candidates, this tree vs a baseline.

Measures the Ranker's id-level path (the torch backend: the model's prepared candidate
scorer, the sigmoid, the NumPy result) for DIN with the default schema, here and in a
baseline source tree (e.g. the commit before the feature schema, ``git archive``d to a
folder), **interleaved**: rounds alternate baseline / current in fresh subprocesses, each
round prints its p50 over ``--runs`` calls, and the figure is the median of the rounds
and the ratio of the medians. DIEN's figure (current tree) is printed beside it. Weights
are random (the time does not depend on their values); vocabulary sizes are ML-1M's.

    git archive 36e3a58 | tar -x -C /tmp/base
    python benchmarks/serve_latency.py --baseline /tmp/base --rounds 6 --threads 2

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

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

TIMING = """
for _ in range(10):
    f()
ms = []
for _ in range({runs}):
    t0 = time.perf_counter(); f(); ms.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({{"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90))}}))
"""


def measure(src: Path, code: str, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def script(template: str, model: str, args: argparse.Namespace) -> str:
    fill = {"threads": args.threads, "sizes": repr(SIZES), "model": model, "t": args.history,
            "n": args.candidates, "runs": args.runs}
    return template.format(**fill) + TIMING.format(runs=args.runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=None, help="a source tree to compare with")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--runs", type=int, default=200, help="calls per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--candidates", type=int, default=1000)
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    rows: dict[str, list[float]] = {"baseline din": [], "current din": [], "current dien": []}
    for r in range(args.rounds):
        if args.baseline is not None:
            rows["baseline din"].append(measure(args.baseline / "src", script(BASELINE, "din", args),
                                                args.threads)["p50"])
        rows["current din"].append(measure(here, script(CURRENT, "din", args), args.threads)["p50"])
        rows["current dien"].append(measure(here, script(CURRENT, "dien", args), args.threads)["p50"])
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f} ms" for k, v in rows.items() if v),
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"1 history (T={args.history}) x {args.candidates} candidates, {args.threads} threads, "
          f"median of {args.rounds} rounds of p50 over {args.runs} calls:")
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    for k, v in med.items():
        print(f"  {k:<13} {v:6.2f} ms  (rounds {min(rows[k]):.2f}-{max(rows[k]):.2f})")
    if "baseline din" in med:
        ratios = [c / b for b, c in zip(rows["baseline din"], rows["current din"], strict=True)]
        print(f"  current / baseline (DIN): median of per-round ratios {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
