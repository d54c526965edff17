"""Training and evaluation throughput at the DIEN reference configuration.

Embedding 18, T <= 100 with history lengths spread evenly over 5..100, batch 128,
MLP 200-80, Adam 1e-3, 2 CPU threads (``--threads``). It makes its own store (random
samples, written with the library's ``prepare_samples``), then for each model runs the
real trainer (`dinrec.train.trainer.train`: loader, forward, backward, Adam, logging)
for ``--steps`` steps, ``--rounds`` times (default 3), and reports the median training
samples/s (excluding the final evaluation) with its range, and the evaluation samples/s
over the test split. Each model runs with length bucketing (dinrec's default) and, for
the models in ``--unbucketed`` (default: din and dien), also without it, as the reference
implementation feeds batches (rows in store order, padded to the longest history).
It also prints the machine's float32 matmul GFLOP/s beside the attention unit's achieved
GFLOP/s (forward + backward on the same batches). Asserts nothing about time.

    python benchmarks/train_throughput.py                       # din, base, dien (+ unbucketed)
    python benchmarks/train_throughput.py --models din --steps 600 --rounds 1
    python benchmarks/train_throughput.py --models din --nproc 2   # + data-parallel scaling
    python benchmarks/train_throughput.py --schema rich            # the rich schema
    python benchmarks/train_throughput.py --against /tmp/old/src --models din,dien --rounds 6
    python benchmarks/train_throughput.py --accurate --models din,dien   # + the accurate config
    python benchmarks/train_throughput.py --against /tmp/old/src --models din,dien \
        --configs reference,shuffled,accurate --threads 1 --rounds 5

``--against SRC`` compares with another checkout of dinrec (e.g. the previous release, from
``git worktree add /tmp/old <commit>``): every round trains each model once with that code
and once with this one, each in a fresh child process on a store written by that
checkout's own ``benchmarks/train_throughput.py``, alternating which goes first, and prints
the median of the per-round ratios (this / that). The machine's noise hits both sides of a
round alike, so the ratio is steadier than either figure; ``--step-cpu`` times only the
model step, in CPU seconds, steadier still on a shared machine. ``--configs`` chooses the
training configurations compared (default ``reference``), each a row per model:

* ``reference``: the DIEN reference configuration (length-bucketed batches, PReLU MLP,
  ``din_fcn_attention``);
* ``shuffled``: the same on shuffled batches, each padded to its own longest row;
* ``accurate``: shuffled batches, Dice MLP and, for DIN, the plain ``din_attention``
  (``dinrec train --activation dice --no-bucket --option attention=din``).

The test AUC of both sides is printed for every row: the two checkouts train on the same
data with the same seed, so a change that only reorders float operations leaves it equal
to ~1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dinrec.data import BatchLoader, PrepareConfig, SampleStore, prepare_samples
from dinrec.nn import _ops
from dinrec.nn.attention import HIDDEN_SIZE, DinFcnAttention
from dinrec.train.trainer import TrainConfig, train
from machine import cpu_description  # benchmarks/machine.py (this folder is on sys.path)


def make_store(path: Path, rows: int, seed: int = 0) -> Path:
    """Random samples whose history lengths are uniform over 5..100."""
    rng = np.random.default_rng(seed)
    n_items, n_cats, n_users = 20_000, 200, 10_000
    item_cat = rng.integers(0, n_cats, n_items)

    def strings(x: np.ndarray) -> pa.Array:
        a = pa.array(x)
        return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a

    def split(n: int) -> pa.Table:
        lengths = rng.integers(5, 101, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        hist = rng.integers(0, n_items, offsets[-1])
        items = rng.integers(0, n_items, n)
        tok = np.char.add("i", np.arange(n_items).astype(str))
        ctok = np.char.add("c", np.arange(n_cats).astype(str))
        return pa.table({
            "label": pa.array(rng.integers(0, 2, n), pa.int8()),
            "user": pa.array(np.char.add("u", rng.integers(0, n_users, n).astype(str))),
            "item": pa.array(tok[items]),
            "cat": pa.array(ctok[item_cat[items]]),
            "hist_items": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), strings(tok[hist])),
            "hist_cats": pa.ListArray.from_arrays(
                pa.array(offsets, pa.int32()), strings(ctok[item_cat[hist]])
            ),
        })

    prepare_samples({"train": split(rows), "valid": split(2_000), "test": split(rows // 2)}, path,
                    PrepareConfig(max_len=100, seed=seed))
    return path


def make_rich_store(path: Path, preset_name: str = "small") -> Path:
    """Synthetic events with side features, prepared with the rich schema of
    :func:`dinrec.data.synthetic.rich_schema` (two sequences, six more features)."""
    from dinrec.data import generate, prepare_events, preset
    from dinrec.data.synthetic import rich_schema, side_features

    events, truth = generate(preset(preset_name))
    events, items, users = side_features(events, truth)
    prepare_events(events, path, PrepareConfig(max_len=100), schema=rich_schema(),
                   items=items, users=users)
    return path


def make_synthetic_store(path: Path) -> Path:
    """The synthetic set of ``benchmarks/peers.py`` (the ``small`` preset split by user):
    skewed history lengths, shuffled batches ~37% valid."""
    from dinrec.data import generate, prepare_events, preset

    events, _ = generate(preset("small"))
    prepare_events(events, path, PrepareConfig(max_len=100, split="by-user", valid_fraction=0.1,
                                               test_fraction=0.1))
    return path


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def attention_gflops(store: Path, batches: int = 60, attention_size: int = 36) -> tuple[float, float]:
    """Achieved GFLOP/s and ms/batch of the fast attention path, forward + backward, B = 128."""
    d = 36  # item 18 ++ category 18
    unit = DinFcnAttention(d, d, attention_size)
    loader = BatchLoader(store, "train", batch_size=128, bucket=True, seed=1)
    shapes = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        shapes.append(batch.sequences[next(iter(batch.sequences))].mask)  # (B, T) main sequence
    flops, seconds = 0.0, 0.0
    for i, mask in enumerate(shapes):
        b, t = mask.shape
        q = torch.randn(b, d)
        f = torch.randn(b, t, d, requires_grad=True)
        g = torch.randn(b, 1, d)
        start = time.perf_counter()
        unit(q, f, mask).backward(g)
        if i >= 5:
            seconds += time.perf_counter() - start
            per_pos = 2 * d * attention_size + 2 * attention_size * HIDDEN_SIZE + 2 * HIDDEN_SIZE + 2 * d
            flops += 3 * b * t * per_pos  # backward ~ 2x forward
    n = len(shapes) - 5
    return flops / seconds / 1e9, 1e3 * seconds / n


def ddp_throughput(store: Path, model: str, args: argparse.Namespace) -> dict:
    """Train ``model`` with ``args.nproc`` local DDP processes; the run's figures."""
    import subprocess
    import sys

    threads = max(1, args.threads // args.nproc)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dinrec", "train", str(store), str(run), "--model", model,
               "--nproc", str(args.nproc), "--max-steps", str(args.steps), "--eval-every", str(10**9),
               "--batch-size", "128", "--lr", "1e-3", "--embedding-dim", "18", "--hidden", "200,80",
               "--threads", str(threads), "--log-every", "100", "--quiet"]
        if args.no_bucket:
            cmd.append("--no-bucket")
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        m = json.loads((run / "metrics.json").read_text())
    return {"nproc": args.nproc, "threads_per_process": threads, "global_batch": 128 * args.nproc,
            "train_samples_per_s": m["train_samples_per_s"], "wall_s": wall,
            "test_auc": m["test"]["auc"]}


#: Training configurations by name: (length bucketing, MLP activation, DIN's model options).
CONFIGS: dict[str, tuple[bool, str, dict]] = {
    "reference": (True, "prelu", {"attention": "fcn"}),
    "shuffled": (False, "prelu", {"attention": "fcn"}),
    "accurate": (False, "dice", {"attention": "din"}),
}


def config_fields(config: str, model: str) -> dict:
    """The TrainConfig fields of a named configuration for ``model``."""
    bucket, activation, options = CONFIGS[config]
    return {"bucket": bucket, "activation": activation,
            "model_options": options if model == "din" else {}}


def model_row(store: Path, name: str, config: str, args: argparse.Namespace) -> dict:
    """``args.rounds`` training runs of ``name`` in ``config``: the median samples/s and every round's."""
    rates, m = [], {}
    fields = config_fields(config, name)
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as run:
            cfg = TrainConfig(model=name, max_steps=args.steps, eval_every=10**9, batch_size=128,
                              lr=1e-3, embedding_dim=18, hidden=(200, 80), threads=args.threads,
                              progress=False, log_every=100, **fields)
            m = train(cfg, store, Path(run) / name).metrics
        rates.append(m["train_samples_per_s"])
    return {"model": name, "config": config, "bucket": fields["bucket"],
            "train_samples_per_s": statistics.median(rates), "rounds": rates,
            "eval_samples_per_s": m["test"]["eval_samples_per_s"], "steps": m["steps"],
            "test_auc": m["test"]["auc"]}


#: One training run in a child process, with whichever ``dinrec`` is on PYTHONPATH; uses
#: only the API both releases share (``make_store``, ``TrainConfig``, ``train``).
CHILD = """
import json, sys, tempfile
from pathlib import Path
a = json.loads(sys.argv[1])
sys.path.insert(0, a["bench"])
import torch
torch.set_num_threads(a["threads"])
import train_throughput as tt
from dinrec.train.trainer import TrainConfig, train
store = Path(a["store"])
if not (store / "stats.json").exists():
    tt.make_store(store, a["rows"])
with tempfile.TemporaryDirectory() as run:
    cfg = TrainConfig(model=a["model"], max_steps=a["steps"], eval_every=10**9, batch_size=128,
                      lr=1e-3, embedding_dim=18, hidden=(200, 80), threads=a["threads"],
                      progress=False, bucket=a.get("bucket", True), log_every=100,
                      activation=a.get("activation", "prelu"), model_options=a.get("options", {}),
                      **({"mlp_products": a["products"]} if a.get("products") else {}))
    m = train(cfg, store, Path(run) / a["model"]).metrics
print(json.dumps({"train": m["train_samples_per_s"], "eval": m["test"]["eval_samples_per_s"],
                  "auc": m["test"]["auc"]}))
"""


#: The model step alone (forward, backward, Adam) on preloaded batches, timed in CPU
#: seconds of the child process (steadier than wall time on a shared machine).
STEP_CHILD = """
import json, sys, time
a = json.loads(sys.argv[1])
import torch
torch.set_num_threads(a["threads"])
import torch.nn.functional as F
from dinrec.data import BatchLoader, SampleStore
from dinrec.models import model_class
from dinrec.run import build_model
store = SampleStore(a["store"])
neg = 1 if model_class(a["model"]).needs_neg_history else 0
loader = BatchLoader(store, "train", batch_size=128, shuffle=True, seed=0, bucket=a["bucket"],
                     neg_history=neg)
batches = []
for batch in loader:
    batches.append(batch)
    if len(batches) == a["steps"]:
        break
torch.manual_seed(0)
config = {"embedding_dim": 18, "hidden": [200, 80], "activation": a["activation"], **a["options"]}
model = build_model(a["model"], config, store).train()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
if a.get("products"):  # this checkout only: the fused MLP's products, for the whole run
    from dinrec.nn import products
    in_force = products(a["products"])
    in_force.__enter__()
def step(batch):
    out = model(batch)
    loss = F.binary_cross_entropy_with_logits(out.logits, batch.label)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()
for batch in batches[:5]:
    step(batch)
start = time.process_time()
for batch in batches[5:]:
    last = step(batch)
cpu = time.process_time() - start
print(json.dumps({"train": 128 * (len(batches) - 5) / cpu, "loss": float(last)}))
"""


def _child_run(src: Path, store: Path, model: str, args: argparse.Namespace,
               config: str = "reference", products: str | None = None) -> dict:
    """One training run of ``model`` in ``config`` with the code in ``src`` (its own
    benchmark's store); ``products``: the fused MLP's matrix products (this checkout)."""
    fields = config_fields(config, model)
    spec = {"bench": str(src.parent / "benchmarks"), "store": str(store), "model": model,
            "rows": args.rows, "steps": args.steps, "threads": args.threads,
            "bucket": fields["bucket"], "activation": fields["activation"],
            "options": fields["model_options"], "products": products}
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = STEP_CHILD if args.step_cpu else CHILD
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(against: Path, args: argparse.Namespace, tmp: Path) -> None:
    """Interleaved rounds: this checkout against ``against``, as per-round ratios."""
    this = Path(__file__).resolve().parent.parent / "src"
    sides = {"this": (this, tmp / "store_this"), "that": (against.resolve(), tmp / "store_that")}
    if args.data == "synthetic":  # one store for both sides, written by this checkout
        make_synthetic_store(tmp / "store")
        sides = {side: (src, tmp / "store") for side, (src, _) in sides.items()}
    print(f"this: {this}\nthat: {sides['that'][0]}\n{args.rounds} interleaved rounds, "
          f"{args.steps} steps, batch 128, {args.threads} threads; configurations {args.configs}")
    for side in ("this", "that"):  # write both stores before timing anything
        warm = argparse.Namespace(**{**vars(args), "steps": 2, "step_cpu": False})
        _child_run(*sides[side], "base", warm)
    for model in args.models.split(","):
        for config in args.configs.split(","):
            runs: dict[str, list[dict]] = {"this": [], "that": []}
            for r in range(args.rounds):
                for side in ("this", "that") if r % 2 == 0 else ("that", "this"):
                    products = args.products if side == "this" else None
                    runs[side].append(_child_run(*sides[side], model, args, config, products))
            _print_comparison(f"{model} {config}", runs)


def _print_comparison(label: str, runs: dict[str, list[dict]]) -> None:
    """Median samples/s of each side, the median of the per-round ratios, both test AUCs
    (with ``--step-cpu``: model-step samples per CPU second and the last training loss)."""
    if "loss" in runs["this"][0]:
        ratios = [a["train"] / b["train"] for a, b in zip(runs["this"], runs["that"], strict=True)]
        med = {s: statistics.median(x["train"] for x in runs[s]) for s in runs}
        print(f"{label:<16} step samples/CPU-s  this {med['this']:>9,.0f}  that {med['that']:>9,.0f}"
              f"  ratio this/that median {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}); last loss this "
              f"{runs['this'][0]['loss']:.6f} that {runs['that'][0]['loss']:.6f}", flush=True)
        return
    for key in ("train", "eval"):
        ratios = [a[key] / b[key] for a, b in zip(runs["this"], runs["that"], strict=True)]
        med = {s: statistics.median(x[key] for x in runs[s]) for s in runs}
        print(f"{label:<16} {key:<5} samples/s  this {med['this']:>9,.0f}  that {med['that']:>9,.0f}"
              f"  ratio this/that median {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    aucs = {s: runs[s][0]["auc"] for s in runs}
    print(f"{label:<16} test AUC this {aucs['this']:.4f} that {aucs['that']:.4f} "
          f"(difference {aucs['this'] - aucs['that']:+.1e})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="din,base,dien")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--unbucketed", default="din,dien",
                        help="models also measured without length bucketing (comma-separated)")
    parser.add_argument("--no-bucket", action="store_true", help="DDP runs: no bucketing")
    parser.add_argument("--store", default=None, help="reuse / keep the benchmark store here")
    parser.add_argument("--schema", default="default", choices=["default", "rich"],
                        help="default: random samples of today's layout (user; item + cat; one "
                        "sequence); rich: synthetic events with the rich schema (two sequences, "
                        "user gender/age, brand, genres, price, a per-event feature)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--nproc", type=int, default=1,
                        help="also train with this many DDP processes (`dinrec train --nproc`, "
                        "batch 128 per process, --threads split between them) and print the scaling")
    parser.add_argument("--against", type=Path, default=None, metavar="SRC",
                        help="compare with the dinrec in this src folder, round by round")
    parser.add_argument("--data", default="uniform", choices=["uniform", "synthetic"],
                        help="the store: uniform = random samples, history lengths uniform over "
                        "5..100 (each --against side writes its own); synthetic = peers.py's "
                        "synthetic set (written once by this checkout, shared)")
    parser.add_argument("--configs", default="reference",
                        help=f"--against: configurations compared ({', '.join(CONFIGS)})")
    parser.add_argument("--step-cpu", action="store_true",
                        help="--against: time the model step alone (forward, backward, Adam on "
                        "--steps preloaded batches) in CPU seconds of each child, not the trainer")
    parser.add_argument("--products", choices=("float32", "bfloat16"), default=None,
                        help="--against: this checkout's fused attention / auxiliary MLP products "
                        "(dinrec.nn.products; default: the library's, float32)")
    parser.add_argument("--accurate", action="store_true",
                        help="also measure din and dien in the accurate configuration "
                        "(shuffled, Dice, DIN's plain din_attention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.against:
        print(f"CPU: {cpu_description()}; torch {torch.__version__}")
        with tempfile.TemporaryDirectory() as tmp:
            compare(args.against, args, Path(tmp))
        return

    tmp = tempfile.TemporaryDirectory()
    store = Path(args.store) if args.store else Path(tmp.name) / "store"
    if not (store / "stats.json").exists():
        if args.schema == "rich":
            make_rich_store(store)
        elif args.data == "synthetic":
            make_synthetic_store(store)
        else:
            make_store(store, args.rows)
    stats = SampleStore(store).stats
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.schema} schema, "
          f"store {store}: {stats['rows']['train']:,} train rows; DIEN's GRU loops: "
          f"{'C++ operators' if _ops.available() else 'reference (no C++ build)'}")
    gemm = matmul_gflops()
    att, att_ms = attention_gflops(store)
    print(f"float32 matmul 1024^3: {gemm:.1f} GFLOP/s; attention (fast path, A = 36, B = 128, "
          f"bucketed) fwd+bwd: {att:.1f} GFLOP/s, {att_ms:.2f} ms/batch")

    rows = []
    print(f"\n{'model':<8} {'config':<10} {'train samples/s (median, range)':>33} "
          f"{'eval samples/s':>15} {'steps':>6} {'test AUC':>9}")
    for name in args.models.split(","):
        configs = ["reference"] + (["shuffled"] if name in args.unbucketed.split(",") else [])
        configs += ["accurate"] if args.accurate and name in ("din", "dien") else []
        for config in configs:
            row = model_row(store, name, config, args)
            rows.append(row)
            lo, hi = min(row["rounds"]), max(row["rounds"])
            spread = f"{row['train_samples_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f})"
            print(f"{name:<8} {config:<10} {spread:>33} "
                  f"{row['eval_samples_per_s']:>15,.0f} {row['steps']:>6} {row['test_auc']:>9.4f}",
                  flush=True)
            if args.nproc > 1 and config == "reference":
                row["ddp"] = ddp_throughput(store, name, args)
                d = row["ddp"]
                print(f"{'':<8} {args.nproc} processes x {d['threads_per_process']} threads: "
                      f"{d['train_samples_per_s']:,.0f} samples/s (global batch {d['global_batch']}), "
                      f"scaling x{d['train_samples_per_s'] / row['train_samples_per_s']:.2f}; "
                      f"wall {d['wall_s']:.1f} s incl. start-up; test AUC {d['test_auc']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": gemm, "attention_gflops": att,
                                               "models": rows}, indent=2))


if __name__ == "__main__":
    main()
