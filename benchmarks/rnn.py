"""Benchmark of the DIEN recurrent layers: forward + backward time per batch.

B = 128, T = 100 (valid lengths spread 5..100), E = H = 36 by default. Prints the
median (and min) over repeats, measured round-robin so every variant sees the same
machine load:

* ``nn.GRU``: the fused PyTorch GRU on the whole padded batch (no masking at all);
* the masked interest extractor, reference (``nn.GRU`` cut at the longest length) and
  fast (the C++ operators: ``dinrec::gru_scan_packed`` over the valid steps only, the
  default on padded batches, and ``dinrec::gru_scan`` over the whole padded batch);
* a naive per-step ``nn.GRUCell`` Python loop with masking;
* AUGRU: reference (literal eager cell) and fast, and ``torch.compile`` of the
  reference and of the fast path (``--compile``);
* AGRU and AIGRU (fast);
* the auxiliary loss; and extractor + attention + AUGRU + auxiliary loss together.

Asserts nothing about time.

    python benchmarks/rnn.py [--repeats 20] [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dinrec.nn import _ops, rnn
from dinrec.nn.attention import DinFcnAttention
from dinrec.nn.auxiliary import AuxiliaryNet, auxiliary_loss
from dinrec.nn.rnn import AttentionGRU, AttentionGRUConfig, InterestExtractor


def _inputs(b: int, t: int, e: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, e, generator=g).requires_grad_()
    lengths = torch.randint(5, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    scores = torch.softmax(torch.randn(b, t, generator=g).masked_fill(~mask, -1e9), 1)
    scores = scores.requires_grad_()  # (B, T)
    neg = torch.randn(b, t, e, generator=g)
    query = torch.randn(b, e, generator=g)
    return x, mask, scores, neg, query


def _time(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=36, help="E = H")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b, t, e = args.batch, args.steps, args.size
    h = e
    torch.manual_seed(0)
    x, mask, scores, neg, query = _inputs(b, t, e)

    gru = nn.GRU(e, h, batch_first=True)
    extractor = InterestExtractor(e, h)
    cell = nn.GRUCell(e, h)
    lengths = mask.sum(1)

    def naive_cell_loop() -> torch.Tensor:
        state = x.new_zeros(b, h)
        outs = []
        for step in range(t):
            new = cell(x[:, step], state)
            valid = (lengths > step)[:, None]
            state = torch.where(valid, new, state)
            outs.append(torch.where(valid, state, torch.zeros_like(state)))
        return torch.stack(outs, 1).sum() + state.sum()

    def dense(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """fn with the dense scan (no packing of the valid steps)."""
        def run() -> torch.Tensor:
            default, rnn.PACKED_BELOW = rnn.PACKED_BELOW, 0.0
            try:
                return fn()
            finally:
                rnn.PACKED_BELOW = default

        return run

    def extractor_fn(impl: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            extractor.impl = impl
            out, final = extractor(x, mask)
            return out.sum() + final.sum()

        return run

    def agru_fn(kind: str, impl: str, gate: str = "reference") -> Callable[[], torch.Tensor]:
        unit = AttentionGRU(AttentionGRUConfig(h, h, kind=kind, gate=gate, impl=impl))  # type: ignore[arg-type]

        def run() -> torch.Tensor:
            out, final = unit(x, scores, mask)
            return out.sum() + final.sum()

        return run

    aux = AuxiliaryNet(h, e)

    def aux_fn() -> torch.Tensor:
        return auxiliary_loss(aux, x, x.detach(), neg, mask)

    att = DinFcnAttention(e, h, 80, mode="LIST", return_alphas=True)
    evolve = AttentionGRU(AttentionGRUConfig(h, h))

    def dien_block() -> torch.Tensor:
        states, _ = extractor(x, mask)  # (B, T, H)
        loss_aux = auxiliary_loss(aux, states, x, neg, mask)
        _, alphas = att(query, states, mask)  # (B, T)
        _, final = evolve(states, alphas, mask)  # (B, H)
        return final.sum() + loss_aux

    cases: dict[str, Callable[[], torch.Tensor]] = {
        "nn.GRU (whole padded batch, no mask)": lambda: gru(x)[0].sum(),
        "extractor reference (nn.GRU)": extractor_fn("reference"),
        "extractor fast": extractor_fn("fast"),
        "extractor fast, dense scan": dense(extractor_fn("fast")),
        "naive GRUCell loop": naive_cell_loop,
        "AUGRU reference (eager cell)": agru_fn("augru", "reference"),
        "AUGRU fast (default)": agru_fn("augru", "fast"),
        "AUGRU fast, dense scan": dense(agru_fn("augru", "fast")),
        "AUGRU paper gate, fast": agru_fn("augru", "fast", "paper"),
        "AGRU fast": agru_fn("agru", "fast"),
        "AIGRU fast": agru_fn("aigru", "fast"),
        "auxiliary loss": aux_fn,
        "extractor+attention+AUGRU+aux": dien_block,
        "extractor+attention+AUGRU+aux, dense scan": dense(dien_block),
    }
    if args.compile:
        for impl in ("reference", "fast"):
            compiled = torch.compile(AttentionGRU(AttentionGRUConfig(h, h, impl=impl)), dynamic=False)
            start = time.perf_counter()
            compiled(x, scores, mask)[1].sum().backward()
            print(f"torch.compile AUGRU {impl}: first call (compile) {time.perf_counter() - start:.1f} s")

            def run_compiled(compiled=compiled) -> torch.Tensor:  # type: ignore[no-untyped-def]
                out, final = compiled(x, scores, mask)
                return out.sum() + final.sum()

            cases[f"AUGRU {impl}, torch.compile"] = run_compiled

    for fn in cases.values():  # warm-up (allocator, first builds)
        for _ in range(3):
            _time(fn)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_time(fn))
    print(
        f"forward+backward, B={b} T={t} E=H={e}, lengths 5..{t}, threads={torch.get_num_threads()}, "
        f"{args.repeats} repeats"
    )
    print(f"fast path: {_ops.choice('gru_scan').line()}")
    print(f"{'':40s} {'median ms':>10s} {'min ms':>8s}")
    for name, ts in times.items():
        print(f"{name:40s} {1e3 * statistics.median(ts):10.2f} {1e3 * min(ts):8.2f}")


if __name__ == "__main__":
    main()
