"""In-process latency of ranking: one history (T events) x N candidates, this tree vs a baseline.

Measures, per call, the public ways of ranking N candidates against one history:

* ``ranker din`` -- the Ranker's id-level path (the torch backend: the model's prepared
  candidate scorer, the sigmoid, the NumPy result) for DIN with the default schema
  (random weights: the time does not depend on their values; ML-1M's vocabulary sizes);
* ``method`` -- ``DinFcnAttention(36, 36, 80).score_candidates(...)`` under ``no_grad``;
* ``function`` -- ``din_fcn_attention_candidates(...)`` under ``no_grad``;
* ``scores`` -- the raw scores alone (``dinrec.nn.candidate_scores.candidate_scores``);
* ``ranker dien`` (this tree only, unless ``--no-dien``).

Each tree runs in a **child process of its own** (``PYTHONPATH=<tree>/src``, this venv,
``OMP_NUM_THREADS`` and ``torch.set_num_threads`` = ``--threads``) that builds every case
once, then runs blocks of ``--block`` calls on request. The parent interleaves the
blocks (baseline / current, the order alternating per round) for ``--rounds`` rounds,
so a busy machine slows both alike (``--clock cpu`` with ``--threads 1`` counts
the CPU time of the calling thread instead: other jobs on the cores then barely count). Prints each case's median and p90 per call and,
with ``--baseline``, the ratio current / baseline of the times (median of the per-round
ratios of block medians; below 1 is faster).

    git worktree add /tmp/base 36e3a58       # or: git archive 36e3a58 | tar -x -C /tmp/base
    python benchmarks/serve_latency.py --baseline /tmp/base --rounds 30 --threads 2

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)

SIZES = {"user": 6042, "item": 3708, "cat": 20}

# The attention unit alone: the same public API in both trees.
ATTENTION = """
from dinrec.nn.attention import DinFcnAttention, din_fcn_attention_candidates
torch.manual_seed(0)
unit = DinFcnAttention(36, 36, 80).eval()
g = torch.Generator().manual_seed(1)
a_cands, a_hist = torch.randn({n}, 36, generator=g), torch.randn({t}, 36, generator=g)
a_mask = torch.ones({t}, dtype=torch.bool)
def method():
    with torch.no_grad():
        return unit.score_candidates(a_cands, a_hist, a_mask)
def function():
    with torch.no_grad():
        return din_fcn_attention_candidates(a_cands, a_hist, a_mask, unit.weights())
from dinrec.nn.candidate_scores import candidate_scores
prepared = unit.candidate_attention()
a_q = prepared(a_cands, a_hist, a_mask) is not None and torch.nn.functional.prelu(
    torch.nn.functional.linear(a_cands, unit.query_proj.weight, unit.query_proj.bias), unit.prelu_alpha)
def kernel():
    with torch.no_grad():
        return candidate_scores(a_q.detach(), a_hist, a_mask, *prepared.layers)
cases["method"], cases["function"], cases["scores"] = method, function, kernel
"""

# The Ranker's path, current API (schema-keyed Batch, create_model).
CURRENT = """
from dinrec.data.batch import Batch
from dinrec.data.schema import Schema
from dinrec.models import create_model
from dinrec.serve.ranker import _TorchBackend
sizes = {sizes}
for name in {models}:
    torch.manual_seed(0)
    # DIN as the previous release built it by default (din_fcn_attention, A = 36); the
    # default is now the plain din_attention (A = 80): same units on both sides.
    options = {{"attention": "fcn"}} if name == "din" else {{}}
    model = create_model(name, Schema.default({t}), sizes, **options).eval()
    backend = _TorchBackend(model, None)
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(2, sizes["item"], (1, {t}), generator=g)
    history = Batch.from_ids(torch.tensor([5]), hist[:, 0], torch.tensor([3]), hist,
                             torch.randint(2, sizes["cat"], (1, {t}), generator=g))
    cands = {{"item": torch.randint(2, sizes["item"], ({n},), generator=g),
              "cat": torch.randint(2, sizes["cat"], ({n},), generator=g)}}
    cases["ranker " + name] = (lambda b, h, c: lambda: b.candidates(h, c, False))(backend, history, cands)
"""

# The same path before the feature schema (flat ids, build_model with vocabulary sizes).
BASELINE = """
from dinrec.models import build_model
from dinrec.serve.ranker import _TorchBackend
torch.manual_seed(0)
sizes = {sizes}
model = build_model("din", n_users=sizes["user"], n_items=sizes["item"], n_cats=sizes["cat"]).eval()
backend = _TorchBackend(model, "cpu", None)
rng = np.random.default_rng(0)
hist = rng.integers(2, sizes["item"], {t}); hc = rng.integers(2, sizes["cat"], {t})
items = rng.integers(2, sizes["item"], {n}); cats = rng.integers(2, sizes["cat"], {n})
cases["ranker din"] = lambda: backend.score_candidates(5, hist, hc, items, cats, False)
"""


def child(args: argparse.Namespace) -> None:
    """Build the cases of the tree on PYTHONPATH, then serve ``CASE K`` requests on stdin:
    run the case K times and answer with the K times (ms) as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    cases: dict = {}
    ns = {"torch": torch, "np": np, "cases": cases}
    fmt = {"sizes": repr(SIZES), "t": args.history, "n": args.candidates}
    exec(ATTENTION.format(**fmt), ns)
    if args.child == "baseline":
        exec(BASELINE.format(**fmt), ns)
    else:
        exec(CURRENT.format(models=repr(["din"] if args.no_dien else ["din", "dien"]), **fmt), ns)
    for f in cases.values():  # warm-up: buffers, C builds, the first-use measurements
        for _ in range(5):
            f()
    import dinrec

    print(json.dumps({"cases": sorted(cases), "module": dinrec.__file__}), flush=True)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    for line in sys.stdin:
        name, k = line.rsplit(" ", 1)
        out = []
        for _ in range(int(k)):
            t0 = clock()
            cases[name]()
            out.append((clock() - t0) * 1e3)
        print(json.dumps(out), flush=True)


class Side:
    """One tree's child process."""

    def __init__(self, name: str, src: Path, args: argparse.Namespace) -> None:
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--clock", args.clock,
               "--history", str(args.history), "--candidates", str(args.candidates)]
        if args.no_dien:
            cmd.append("--no-dien")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self._line())
        self.cases, self.module = hello["cases"], hello["module"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the child exited with {self.proc.wait()}")
        return line

    def block(self, case: str, k: int) -> list[float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{case} {k}\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=None, help="a checkout (with src/) to compare with")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--block", type=int, default=10, help="calls per case per side per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--no-dien", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the calling thread's CPU time (with --threads 1, immune to other jobs "
                        "taking the cores; it misses the work of other threads)")
    p.add_argument("--child", choices=("current", "baseline"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    here = Path(__file__).resolve().parents[1]

    sides = {"current": Side("current", here / "src", args)}
    if args.baseline is not None:
        sides["baseline"] = Side("baseline", args.baseline.resolve() / "src", args)
    cases = sides["current"].cases
    times = {(s, c): [] for s in sides for c in cases if c in sides[s].cases}
    per_round: dict[tuple[str, str], list[float]] = {k: [] for k in times}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for c in cases:
            for s in order:
                if (s, c) in times:
                    ms = sides[s].block(c, args.block)
                    times[s, c] += ms
                    per_round[s, c].append(statistics.median(ms))
    for side in sides.values():
        side.close()
    print(f"1 history (T={args.history}) x {args.candidates} candidates, {args.threads} threads, "
          f"{args.rounds} rounds x {args.block} calls each, interleaved child processes, {args.clock} clock (load "
          f"average {load0:.1f} -> {os.getloadavg()[0]:.1f}); {cpu_description()}")
    for s, side in sides.items():
        print(f"  {s}: {side.module}")
    for (s, c), v in times.items():
        print(f"  {s:<8} {c:<12} median {statistics.median(v):7.2f} ms   p90 {np.percentile(v, 90):7.2f} ms")
    for c in cases:
        if ("baseline", c) in times:
            ratios = [a / b for b, a in zip(per_round["baseline", c], per_round["current", c], strict=True)]
            best = min(times["current", c]) / min(times["baseline", c])
            print(f"  current / baseline ({c}): {statistics.median(ratios):.3f} (median of per-round "
                  f"ratios; quartiles {np.percentile(ratios, 25):.3f}-{np.percentile(ratios, 75):.3f}; "
                  f"of the fastest calls {best:.3f})")


if __name__ == "__main__":
    main()
