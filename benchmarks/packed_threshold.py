"""Where packing the attention MLP pays: dense folded path vs packed, by valid share.

For batches of B rows padded to T with a given share of valid positions, times the
``"fast"`` attention unit (forward + backward, and forward alone without autograd)
once with the dense folded path and once with the packed path
(:mod:`dinrec.nn.packed`), interleaved, and prints the median over rounds of the
per-round ratio dense / packed of the CPU time (> 1: packing is faster). The rule in
``dinrec.nn.packed.PACKED_BELOW`` / ``PACKED_BELOW_WIDE`` take this table and the whole
training step (``train_throughput.py --against ... --step-cpu``) into account. Asserts nothing about time.

    python benchmarks/packed_threshold.py
    python benchmarks/packed_threshold.py --attention-sizes 80 --lengths 100 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinrec.nn import packed
from dinrec.nn.attention import DinFcnAttention
from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)


def _mask(b: int, t: int, share: float, g: torch.Generator) -> torch.Tensor:
    """(B, T) prefix masks whose lengths scatter around ``share * T`` (at least 1)."""
    lengths = (torch.randn(b, generator=g) * 0.15 * t + share * t).round().clamp(1, t)
    return torch.arange(t)[None, :] < lengths[:, None]  # (B, T)


def _time(fn, repeats: int) -> float:
    """CPU seconds of this process per call (steadier than wall time on a shared machine)."""
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def measure(b: int, t: int, d: int, a: int, share: float, rounds: int, repeats: int,
            plain: bool) -> tuple[float, float, float]:
    """Actual valid share, and median dense/packed time ratios (train, eval)."""
    g = torch.Generator().manual_seed(0)
    unit = DinFcnAttention(d, d, a, query_projection=not plain)
    query, facts = torch.randn(b, d, generator=g), torch.randn(b, t, d, generator=g)
    mask = _mask(b, t, share, g)
    grad = torch.randn(b, 1, d, generator=g)

    def train() -> None:
        f = facts.clone().requires_grad_()
        unit(query, f, mask).backward(grad)

    def infer() -> None:
        with torch.no_grad():
            unit(query, facts, mask)

    ratios: dict[str, list[float]] = {"train": [], "eval": []}
    for r in range(rounds):
        for key, fn in (("train", train), ("eval", infer)):
            times = {}
            for side in ("dense", "packed") if r % 2 == 0 else ("packed", "dense"):
                packed.PACKED_BELOW = packed.PACKED_BELOW_WIDE = 0.0 if side == "dense" else 1.01
                fn()  # warm
                times[side] = _time(fn, repeats)
            ratios[key].append(times["dense"] / times["packed"])
    return float(mask.float().mean()), statistics.median(ratios["train"]), statistics.median(ratios["eval"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lengths", default="20,50,100", help="padded T values")
    parser.add_argument("--shares", default="0.2,0.4,0.6,0.8,0.9,1.0", help="valid shares")
    parser.add_argument("--attention-sizes", default="36,80", help="A (80: plain din_attention)")
    parser.add_argument("--dim", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {args.threads} thread(s); "
          f"B {args.batch}, D {args.dim}; ratio = dense time / packed time, median of "
          f"{args.rounds} interleaved rounds")
    print(f"{'A':>4} {'T':>4} {'share':>6} {'train (fwd+bwd)':>16} {'eval (fwd)':>11}")
    saved = packed.PACKED_BELOW, packed.PACKED_BELOW_WIDE
    try:
        for a in (int(x) for x in args.attention_sizes.split(",")):
            for t in (int(x) for x in args.lengths.split(",")):
                for share in (float(x) for x in args.shares.split(",")):
                    real, tr, ev = measure(args.batch, t, args.dim, a, share, args.rounds,
                                           args.repeats, plain=a == 80)
                    print(f"{a:>4} {t:>4} {real:>6.2f} {tr:>16.2f} {ev:>11.2f}", flush=True)
    finally:
        packed.PACKED_BELOW, packed.PACKED_BELOW_WIDE = saved


if __name__ == "__main__":
    main()
