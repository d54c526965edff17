"""Where DIN's packed forward pays: the whole training step, packed vs dense, by valid share.

Two DIN models with the same weights train on the same preloaded batches of a store
(forward, backward, fused Adam; Dice MLP, the default configuration's), one forced onto
the dense path and one onto the packed path (``DIN.packs``: only the valid events looked
up and attended), the two alternating batch by batch, each step timed in CPU seconds of
this process (steadier than wall time on a shared machine). Prints the valid share of the
batches, the ms/step of each side and the ratio dense / packed (> 1: packing is faster),
and both last losses (equal up to float rounding). ``--shrink F`` cuts every row's
history to a random F..1 of its length, so bucketed batches (~96% valid) give shares in
between. The rule ``dinrec.nn.packed.PACKED_INPUTS_BELOW[_WIDE]`` takes this table into
account. Asserts nothing about time.

    python benchmarks/packed_model.py --data synthetic                 # ~37% valid
    python benchmarks/packed_model.py --data uniform --attention fcn   # ~52% valid
    python benchmarks/packed_model.py --data uniform --bucket --shrink 0.5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dinrec.data import BatchLoader, SampleStore
from dinrec.data.batch import Batch
from dinrec.models.din import DIN
from dinrec.run import build_model
from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)
from train_throughput import make_store, make_synthetic_store


def _batches(store: SampleStore, args: argparse.Namespace) -> list[Batch]:
    loader = BatchLoader(store, "train", batch_size=128, shuffle=True, seed=0, bucket=args.bucket)
    out: list[Batch] = []
    g = torch.Generator().manual_seed(0)
    for batch in loader:
        if args.shrink < 1.0:
            for seq in batch.sequences.values():
                n = seq.mask.sum(1).float()  # (B,)
                keep = (n * (args.shrink + (1 - args.shrink) * torch.rand(n.shape, generator=g))).ceil()
                seq.mask = seq.mask & (torch.arange(seq.mask.shape[1])[None, :] < keep[:, None])
        out.append(batch)
        if len(out) == args.steps:
            return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "uniform"])
    parser.add_argument("--store", default=None, help="an existing store (else one is made)")
    parser.add_argument("--attention", default="din", choices=["din", "fcn"])
    parser.add_argument("--bucket", action="store_true", help="length-bucketed batches")
    parser.add_argument("--shrink", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "store"
        if not args.store:
            make_synthetic_store(path) if args.data == "synthetic" else make_store(path, 20_000)
        store = SampleStore(path)
        batches = _batches(store, args)
        config = {"embedding_dim": 18, "hidden": [200, 80], "activation": "dice",
                  "embedding_init_std": 1e-4, "attention": args.attention}
        sides = {}
        for side in ("dense", "packed"):
            torch.manual_seed(0)
            model = build_model("din", config, store).train()
            sides[side] = (model, torch.optim.Adam(model.parameters(), lr=2e-3, fused=True))
        seconds, losses = {"dense": 0.0, "packed": 0.0}, {"dense": 0.0, "packed": 0.0}
        original = DIN.packs
        try:
            for i, batch in enumerate(batches):
                for side in ("dense", "packed") if i % 2 else ("packed", "dense"):
                    DIN.packs = (lambda self, b, p=side == "packed": p)  # type: ignore[method-assign]
                    model, opt = sides[side]
                    start = time.process_time()
                    loss = F.binary_cross_entropy_with_logits(model(batch).logits, batch.label)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if i >= 5:
                        seconds[side] += time.process_time() - start
                    losses[side] = float(loss.detach())
        finally:
            DIN.packs = original  # type: ignore[method-assign]
    valid = sum(int(b.sequences[s].mask.sum()) for b in batches for s in b.sequences)
    total = sum(b.sequences[s].mask.numel() for b in batches for s in b.sequences)
    n = len(batches) - 5
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{args.data} {'bucketed' if args.bucket else 'shuffled'} shrink {args.shrink}, attention "
          f"{args.attention}: valid share {valid / total:.2f}; dense {1e3 * seconds['dense'] / n:.2f} "
          f"ms/step, packed {1e3 * seconds['packed'] / n:.2f} ms/step, dense/packed "
          f"{seconds['dense'] / seconds['packed']:.3f}; last loss dense {losses['dense']:.6f} "
          f"packed {losses['packed']:.6f}")


if __name__ == "__main__":
    main()
