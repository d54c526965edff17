"""Benchmark of `din_fcn_attention`: reference (line-by-line) path vs the fast path.

Prints, for each (B, T, D): median forward and forward+backward times of both paths
(measured interleaved, so both see the same machine load), their ratio, and the peak
extra memory of one call (max RSS growth, each measured in a fresh child process).
Then one history of T = 100 scored against 1000 candidates: the public
`score_candidates` and the Ranker's prepared path without autograd, the same 1000 rows
as a batch (fast and reference paths), and `score_candidates` against the rows with
autograd (forward + backward). Asserts nothing about time.

    python benchmarks/attention.py                 # all configurations
    python benchmarks/attention.py --quick         # the small ones only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from dinrec.nn import _ops
from dinrec.nn.attention import DinFcnAttention
from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)

CONFIGS = [(128, 100, 36), (1024, 100, 36), (4096, 200, 64)]
ATTENTION_SIZE = 80


def _unit(d: int, impl: str) -> DinFcnAttention:
    torch.manual_seed(0)
    return DinFcnAttention(d, d, ATTENTION_SIZE, impl=impl)


def _inputs(b: int, t: int, d: int):
    g = torch.Generator().manual_seed(1)
    query = torch.randn(b, d, generator=g)
    facts = torch.randn(b, t, d, generator=g).requires_grad_()
    lengths = torch.randint(5, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    grad_out = torch.randn(b, 1, d, generator=g)  # a dense upstream gradient, as in training
    return query, facts, mask, grad_out


def _step(unit: DinFcnAttention, query, facts, mask, grad_out, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        unit(query, facts, mask).backward(grad_out)
    else:
        with torch.no_grad():
            unit(query, facts, mask)
    return time.perf_counter() - start


def time_config(b: int, t: int, d: int, repeats: int) -> dict[str, float]:
    units = {impl: _unit(d, impl) for impl in ("reference", "fast")}
    query, facts, mask, grad_out = _inputs(b, t, d)
    out: dict[str, float] = {}
    for backward in (False, True):
        samples: dict[str, list[float]] = {impl: [] for impl in units}
        for i in range(repeats + 1):
            for impl, unit in units.items():  # interleaved
                dt = _step(unit, query, facts, mask, grad_out, backward)
                if i:  # the first round is warm-up
                    samples[impl].append(dt)
        key = "fwd_bwd" if backward else "fwd"
        for impl in units:
            out[f"{impl}_{key}_ms"] = 1e3 * statistics.median(samples[impl])
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_memory_child(impl: str, b: int, t: int, d: int, backward: bool) -> None:
    """Peak RSS growth of one call over the RSS just before it (Linux: VmHWM reset via clear_refs)."""
    unit = _unit(d, impl)
    query, facts, mask, grad_out = _inputs(b, t, d)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark to the current RSS
    _step(unit, query, facts, mask, grad_out, backward)
    print(json.dumps({"peak_mib": max(0, _status_kib("VmHWM") - before) / 1024}))


def peak_memory_mib(impl: str, b: int, t: int, d: int, backward: bool) -> float:
    cmd = [sys.executable, __file__, "--_child", impl, str(b), str(t), str(d), str(int(backward))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def time_candidates(n: int, t: int, d: int, repeats: int) -> dict[str, float]:
    """One history against n candidates, each variant interleaved: under ``no_grad`` the
    public ``score_candidates``, the Ranker's prepared ``candidate_attention()`` and the
    batched rows; with autograd (forward + backward) ``score_candidates`` and the rows."""
    g = torch.Generator().manual_seed(2)
    cands = torch.randn(n, d, generator=g)
    history = torch.randn(t, d, generator=g)
    mask = torch.ones(t, dtype=torch.bool)
    fast, ref = _unit(d, "fast"), _unit(d, "reference")
    prepared = fast.candidate_attention()
    rows_facts, rows_mask = history.expand(n, t, d), mask.expand(n, t)

    def no_grad(fn):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            with torch.no_grad():
                fn()
        return run

    variants = {
        "score_candidates": no_grad(lambda: fast.score_candidates(cands, history, mask)),
        "prepared (Ranker)": no_grad(lambda: prepared(cands, history, mask)),
        "rows_fast": no_grad(lambda: fast(cands, rows_facts, rows_mask)),
        "rows_reference": no_grad(lambda: ref(cands, rows_facts, rows_mask)),
        "score_candidates autograd": lambda: fast.score_candidates(cands, history, mask).sum().backward(),
        "rows_fast autograd": lambda: fast(cands, rows_facts, rows_mask).sum().backward(),
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeats + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if i:
                samples[name].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="skip (4096, 200, 64)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._child:
        impl, b, t, d, bwd = args._child
        _peak_memory_child(impl, int(b), int(t), int(d), bool(int(bwd)))
        return

    configs = CONFIGS[:2] if args.quick else CONFIGS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, A = {ATTENTION_SIZE}, "
          f"median of {args.repeats} interleaved runs; {cpu_description()}")
    print("fast paths (measured at first use):", *_ops.fast_paths().splitlines(), sep="\n  ")
    header = (f"{'(B, T, D)':>16} {'pass':>8} {'reference ms':>13} {'fast ms':>9} {'speed-up':>9}"
              f" {'ref MiB':>8} {'fast MiB':>9}")
    print(header)
    print("-" * len(header))
    for b, t, d in configs:
        repeats = max(3, args.repeats // 2) if b * t * d > 10_000_000 else args.repeats
        times = time_config(b, t, d, repeats)
        for key, name in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
            ref_ms, fast_ms = times[f"reference_{key}_ms"], times[f"fast_{key}_ms"]
            mem = ("", "")
            if not args.no_memory:
                bwd = key == "fwd_bwd"
                mem = tuple(f"{peak_memory_mib(i, b, t, d, bwd):.0f}" for i in ("reference", "fast"))
            print(f"{str((b, t, d)):>16} {name:>8} {ref_ms:>13.2f} {fast_ms:>9.2f} "
                  f"{ref_ms / fast_ms:>8.2f}x {mem[0]:>8} {mem[1]:>9}")

    n, t, d = 1000, 100, 36
    c = time_candidates(n, t, d, args.repeats)
    print(f"\none history (T = {t}, D = {d}) x {n} candidates ({_ops.choice('candidate_scores').line()}):")
    for name, ms in c.items():
        base = c["score_candidates autograd" if "autograd" in name else "score_candidates"]
        print(f"  {name:<26} {ms:>9.2f} ms   {ms / base:>6.2f}x the time of score_candidates")


if __name__ == "__main__":
    main()
