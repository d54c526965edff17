"""The fused attention / auxiliary MLP (``dinrec::offset_mlp``) alone, against the torch ops.

Times forward + backward of the two MLPs it serves, at the training sizes of the synthetic
set (batch 128): DIN's attention MLP on N packed events (D 36, A 80, 40; the torch path
is ``packed._mlp_forward`` / ``_mlp_backward``) and DIEN's auxiliary MLP on N pairs x 2
items (E = H = 36, 100, 50; ``AuxiliaryNet.pair_logits``). Three paths, interleaved, CPU
time of this thread, median over rounds: the torch ops, the C++ operator with float32
products and with bfloat16 products (``dinrec.nn.products``); prints milliseconds and the
ratio torch / C++ (> 1: the operator is faster). Asserts nothing about time.

    python benchmarks/offset_mlp.py
    python benchmarks/offset_mlp.py --rows 9500 --rounds 41 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dinrec.nn import _ops, packed, products
from dinrec.nn.auxiliary import AuxiliaryNet
from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)

PATHS = (None, "float32", "bfloat16")  # torch ops, then the operator's products


def din_calls(n: int) -> dict[str | None, Callable[[], object]]:
    """DIN's attention MLP, forward + backward, by path."""
    g = torch.Generator().manual_seed(0)
    b, d, a = 128, 36, 80
    q_part, q, f = torch.randn(b, a, generator=g), torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    rows = torch.randint(0, b, (n,), generator=g).sort().values  # (N,)
    layers = (torch.randn(a, 2 * d, generator=g) / 8, torch.randn(40, a, generator=g) / 9,
              torch.randn(40, generator=g), torch.randn(1, 40, generator=g), torch.randn(1, generator=g))
    w1, w2, _, w3, _ = layers
    gs = torch.randn(n, 1, generator=g)

    def call(fused: str | None) -> Callable[[], object]:
        def run() -> object:
            s, qv, x, h1, h2 = packed._mlp_forward(q_part, q, f, rows, *layers, fused)
            return packed._mlp_backward(gs, b, (True, True, True), (rows, qv, x, w1, w2, w3, h1, h2), fused)
        return run

    return {p: call(p) for p in PATHS}


def dien_calls(n: int) -> dict[str | None, Callable[[], object]]:
    """DIEN's auxiliary MLP on n pairs (1 clicked + 1 non-clicked item), forward + backward."""
    g = torch.Generator().manual_seed(0)
    net = AuxiliaryNet(36, 36)
    states = torch.randn(n, 36, generator=g, requires_grad=True)
    items = torch.randn(2, n, 36, generator=g, requires_grad=True)
    real_use = _ops.use

    def call(fused: str | None) -> Callable[[], object]:
        def run() -> object:
            _ops.use = lambda op: fused is not None  # type: ignore[assignment]  # force the path
            try:
                with products(fused or "float32"):
                    out = net.pair_logits(states, items)  # (2, N)
            finally:
                _ops.use = real_use  # type: ignore[assignment]
            out.sum().backward()
            return out
        return run

    return {p: call(p) for p in PATHS}


def measure(calls: dict[str | None, Callable[[], object]], rounds: int) -> dict[str | None, float]:
    """Median CPU seconds per call of each path, the paths alternating (order rotated each round)."""
    for fn in calls.values():
        fn()
    times: dict[str | None, list[float]] = {p: [] for p in calls}
    order = list(calls)
    for r in range(rounds):
        for p in order[r % len(order):] + order[: r % len(order)]:
            t0 = time.thread_time()
            calls[p]()
            times[p].append(time.thread_time() - t0)
    return {p: statistics.median(v) for p, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4300, help="valid events (DIN) / pairs (DIEN) per batch")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (_ops.available() and _ops.bf16_available()):
        print("note: the C++ build or its bfloat16 kernel is not available; those rows time the torch ops")
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {args.threads} thread(s); "
          f"N = {args.rows}; forward + backward, median of {args.rounds} rounds")
    for name, calls in (("DIN attention MLP", din_calls(args.rows)), ("DIEN auxiliary MLP", dien_calls(args.rows))):
        t = measure(calls, args.rounds)
        ref = t[None]
        cells = "  ".join(f"{p}: {1e3 * t[p]:.2f} ms (x{ref / t[p]:.2f})" for p in PATHS[1:])
        print(f"{name:<20} torch ops {1e3 * ref:.2f} ms  C++ {cells}")


if __name__ == "__main__":
    main()
