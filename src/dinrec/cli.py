"""The `dinrec` command line: parse arguments, call the library, print.

Each sub-command has an ``_add_<name>`` function that declares its arguments and a
``_run_<name>`` function that does the work; errors of type :class:`DinrecError`
are printed as one line (no stack trace) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dinrec import __version__
from dinrec.errors import DinrecError


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the embedded synthetic data: prepare, train DIN and BaseModel, "
        "evaluate, recommend with explanations, plots",
    )
    p.add_argument(
        "--seed-example",
        action="store_true",
        help="instead, run the seed document's din_fcn_attention demo with its exact inputs",
    )
    p.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    p.add_argument("--preset", default="small", help="synthetic preset: tiny, small, medium, large")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.seed_example:
        from dinrec.seed_demo import run_seed_demo

        print(run_seed_demo())
        return 0
    from dinrec.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=Path(args.out), preset=args.preset, epochs=args.epochs, seed=args.seed,
        threads=args.threads, progress=not args.quiet,
    )
    run_demo(cfg, echo=lambda line: print(line, flush=True))
    return 0


# --------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    from dinrec.models import MODELS
    from dinrec.train.trainer import PRESETS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model on a sample store into a run folder")
    p.add_argument("store", help="sample store folder (from `dinrec prepare`)")
    p.add_argument("run", help="run folder to create (or continue with --resume)")
    p.add_argument("--model", default=d.model, choices=sorted(MODELS))
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="reference: the DIEN reference's exact configuration (PReLU MLP, DIN's "
                   "din_fcn_attention, length-sorted batches); default: Dice MLP, DIN's plain "
                   "din_attention, shuffled batches (more accurate, docs/results.md); options "
                   "given explicitly win")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option, e.g. attention_size=80 or attention=din (repeatable)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--hidden", default=",".join(map(str, d.hidden)), help="MLP widths, e.g. 200,80")
    p.add_argument("--activation", default=None, choices=["prelu", "dice", "relu", "sigmoid"],
                   help=f"MLP activation (default: the preset's; {d.activation})")
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["constant", "cosine", "linear"])
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="steps (default: once per epoch)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps (default: at evaluations)")
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=d.device)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--bucket", dest="bucket", action="store_true", default=None,
                   help="sort batches by history length inside windows (the preset's by default)")
    p.add_argument("--no-bucket", dest="bucket", action="store_false", help="no length bucketing")
    p.add_argument("--neg-history", type=int, default=d.neg_history)
    p.add_argument("--aux-weight", type=float, default=d.aux_weight)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help="training rows held in memory for shuffling, per process")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel worker processes on this machine (gloo on CPU, NCCL on "
                   "GPU); --batch-size is per process. For several machines use torchrun "
                   "(docs/distributed.md)")
    p.add_argument("--data-split", default=d.data_split, choices=["shards", "batches"],
                   help="several processes: each reads its own shards (default), or each reads "
                   "all and takes its slice of every global batch (one process's data order)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _parse_options(items: list[str]) -> dict:
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DinrecError(f"--option: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run_train(args: argparse.Namespace) -> int:
    import json

    from dinrec.train.trainer import preset_config, train

    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    except ValueError:
        raise DinrecError(f"--hidden: expected comma-separated integers, got {args.hidden!r}") from None
    chosen = {k: v for k, v in (("activation", args.activation), ("bucket", args.bucket)) if v is not None}
    cfg = preset_config(
        args.preset, args.model, **chosen, model_options=_parse_options(args.option),
        embedding_dim=args.embedding_dim, hidden=hidden,
        max_len=args.max_len, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        lr=args.lr, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, epochs=args.epochs,
        max_steps=args.max_steps, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, patience=args.patience, seed=args.seed,
        threads=args.threads, device=args.device, amp=args.amp, compile=args.compile,
        neg_history=args.neg_history, aux_weight=args.aux_weight,
        log_every=args.log_every, progress=not args.quiet, stop_after=args.stop_after,
        shuffle_buffer=args.shuffle_buffer, data_split=args.data_split,
    )
    import os

    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        from dinrec.train import distributed

        spec = distributed.write_worker_spec({
            "config": cfg.to_dict(), "store": str(args.store), "run": str(args.run),
            "resume": args.resume, "overwrite": args.overwrite,
        })  # fmt: skip
        try:
            rc = distributed.launch_local(args.nproc, [str(spec)])
        finally:
            spec.unlink(missing_ok=True)
        if rc:
            return rc
        metrics_path = Path(args.run) / "metrics.json"
        if not metrics_path.exists():
            print(f"stopped at step {args.stop_after}; continue with --resume ({args.run})")
            return 0
        from dinrec.train.trainer import TrainResult

        result = TrainResult(Path(args.run), json.loads(metrics_path.read_text()), completed=True)
    elif args.nproc < 1:
        raise DinrecError(f"--nproc must be >= 1, got {args.nproc}")
    else:
        result = train(cfg, args.store, args.run, resume=args.resume, overwrite=args.overwrite)
    if not result.completed:
        print(f"stopped at step {args.stop_after}; continue with --resume ({args.run})")
        return 0
    m = result.metrics
    print(f"{cfg.model}: {m['steps']:,} steps, {m['train_samples_per_s']:,.0f} samples/s; best step {m['best_step']}")
    for split in ("valid", "test"):
        if split in m:
            r = m[split]
            print(f"  {split:<5} AUC {r['auc']:.4f}  GAUC {r['gauc']:.4f}  logloss {r['logloss']:.4f}  (n={r['n']:,})")
    print(f"run folder: {args.run} (metrics.json: {json.dumps(str(result.run_dir / 'metrics.json'))})")
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of one or more runs on a split of a store")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--store", default=None, help="sample store (default: the run's own)")
    p.add_argument("--split", default="test")
    p.add_argument("--ranking", type=int, default=0, metavar="N",
                   help="also rank each positive among N sampled items: HR@K, NDCG@K")
    p.add_argument("--k", default="10", help="cut-offs for --ranking, e.g. 5,10,20")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from dinrec.train.evaluate import evaluate_run

    try:
        ks = tuple(int(k) for k in args.k.split(",") if k)
    except ValueError:
        raise DinrecError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    rows = [evaluate_run(run, args.store, args.split, args.ranking, ks) for run in args.runs]
    if args.json:
        print(json.dumps(rows, indent=2, default=float))
        return 0
    print(f"{'run':<28} {'model':<10} {'split':<6} {'AUC':>7} {'GAUC':>7} {'logloss':>8} {'n':>9}")
    for r in rows:
        ranking = "".join(f"  HR@{k} {r[f'hr@{k}']:.4f} NDCG@{k} {r[f'ndcg@{k}']:.4f}"
                          for k in ks if f"hr@{k}" in r)
        print(f"{r['run'][-28:]:<28} {r['model']:<10} {r['split']:<6} {r['auc']:>7.4f} "
              f"{r['gauc']:>7.4f} {r['logloss']:>8.4f} {r['n']:>9,}{ranking}")
    return 0


# --------------------------------------------------------------------------- recommend
def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="top-K items for a user, with the attention's explanation")
    p.add_argument("run", help="run folder")
    p.add_argument("--user", required=True)
    p.add_argument("--history", default=None,
                   help="comma-separated item tokens, oldest first (default: the user's latest "
                   "history in the run's store)")
    p.add_argument("--candidates", default=None, help="comma-separated item tokens")
    p.add_argument("--sample", type=int, default=100,
                   help="without --candidates: this many candidates sampled by popularity")
    p.add_argument("-k", "--top", type=int, default=10)
    p.add_argument("--explain", type=int, default=3, help="history items shown per candidate")
    p.add_argument("--store", default=None, help="store to read the history from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_recommend)


def _split_tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_recommend(args: argparse.Namespace) -> int:
    import json

    from dinrec.serve.ranker import Ranker

    ranker = Ranker(args.run)
    if args.history is not None:
        history = _split_tokens(args.history)
    else:
        store = args.store or ranker.run_config["store"]
        history = ranker.store_history(store, args.user)
    if args.candidates is not None:
        candidates = _split_tokens(args.candidates)
        if not candidates:
            raise DinrecError("--candidates: no item given")
    else:
        candidates = ranker.sample_candidates(args.sample, exclude=history, seed=args.seed)
    rec = ranker.rank(args.user, history, candidates, k=args.top, explain=args.explain)
    if "item" in rec.unknown and args.candidates is not None:
        bad = [c for c in rec.unknown["item"] if c in candidates]
        if bad:
            raise DinrecError(f"--candidates: not items of this run's vocabulary: {', '.join(bad[:5])}")
    if "user" in rec.unknown:
        raise DinrecError(f"--user: {args.user!r} is not in this run's vocabulary")
    if args.json:
        print(json.dumps({"model": ranker.model_name, **rec.to_dict()}, indent=2))
        return 0
    print(f"user {rec.user}, {ranker.model_name}, history of {len(rec.history)} items "
          f"(newest last): {' '.join(rec.history[-10:])}")
    for rank, s in enumerate(rec.ranked, 1):
        why = ", ".join(f"{e.item} [{e.category}] {e.weight:.3f}" for e in s.explanation)
        print(f"{rank:>3}. {s.item:<12} [{s.category}] p={s.score:.4f}" + (f"   <- {why}" if why else ""))
    if rec.unknown:
        print("unknown (scored as out-of-vocabulary): " + "; ".join(
            f"{k}: {', '.join(v[:5])}" for k, v in rec.unknown.items()))
    return 0


# --------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from dinrec.data.formats import FORMATS

    formats = "\n".join(f"  {f.name:<10} {f.inputs:<36} {f.summary}" for f in FORMATS.values())
    p = sub.add_parser(
        "prepare",
        help="turn a log file format into a sample store (see docs/formats.md)",
        description="Read INPUT files in FORMAT and write a Parquet sample store to --out.",
        epilog="formats (FORMAT  INPUTS  what):\n" + formats,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", metavar="FORMAT", choices=list(FORMATS), help="input format")
    p.add_argument("inputs", metavar="INPUT", nargs="*", help="input files (or folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="sample store to write")
    g = p.add_argument_group("samples (PrepareConfig)")
    g.add_argument("--max-len", type=int, default=100, help="longest history kept")
    g.add_argument("--min-history", type=int, default=1, help="positives before a sample")
    g.add_argument("--neg-per-pos", type=int, default=1, help="sampled negatives per positive")
    g.add_argument("--neg-sampling", choices=["popularity", "uniform"], default="popularity")
    g.add_argument("--split", choices=["leave-last-out", "by-user", "time"],
                   default="leave-last-out")
    g.add_argument("--valid-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g.add_argument("--time-cut", type=int, default=None, help="time split: first test ts")
    g.add_argument("--min-count", type=int, default=1, help="rarer tokens become <oov>")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shard-rows", type=int, default=500_000)
    r = p.add_argument_group("reading")
    r.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad line: stop with file:line (fail) or skip and count it (skip)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--min-rating", type=float, default=None,
                   help="movielens, amazon: keep ratings >= this (default: all)")
    r.add_argument("--hist-sep", default="\\x02",
                   help="dien-text: history separator (default \\x02)")
    r.add_argument("--user-col", default="user", help="events: user column")
    r.add_argument("--item-col", default="item", help="events: item column")
    r.add_argument("--cat-col", default=None, help="events: category column")
    r.add_argument("--time-col", default=None, help="events: timestamp column (seconds)")
    r.add_argument("--label-col", default=None, help="events: 0/1 label column")
    r.add_argument("--sep", default=None, help="events: separator (default: sniffed; '\\t' ok)")
    r.add_argument("--item-cats", default=None, metavar="FILE",
                   help="events: item -> category table (CSV/TSV/Parquet with header)")
    r.add_argument("--item-cats-cols", default=None, metavar="ITEM,CAT",
                   help="events: the item and category columns of --item-cats "
                   "(default: its first two)")
    r.add_argument("--item-attrs", default=None, metavar="JSON",
                   help="sequences: item -> [attributes] map (first = category)")
    r.add_argument("--preset", default="small", help="synthetic: preset name")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dinrec.data import PrepareConfig
    from dinrec.data.formats import ReadOptions
    from dinrec.data.formats.common import unescape
    from dinrec.data.prepare import prepare, summary

    cfg = PrepareConfig(
        max_len=args.max_len, min_history=args.min_history, neg_per_pos=args.neg_per_pos,
        neg_sampling=args.neg_sampling, split=args.split, valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction, time_cut=args.time_cut, min_count=args.min_count,
        seed=args.seed, shard_rows=args.shard_rows,
    )
    cats_cols = None
    if args.item_cats_cols:
        parts = [c.strip() for c in args.item_cats_cols.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DinrecError("--item-cats-cols takes two column names: ITEM,CAT")
        cats_cols = (parts[0], parts[1])
    options = ReadOptions(
        progress=not args.quiet and sys.stderr.isatty(),
        hist_sep=unescape(args.hist_sep), min_rating=args.min_rating,
        user_col=args.user_col, item_col=args.item_col, cat_col=args.cat_col,
        time_col=args.time_col, label_col=args.label_col, sep=args.sep,
        item_cats=Path(args.item_cats) if args.item_cats else None, item_cats_cols=cats_cols,
        item_attrs=Path(args.item_attrs) if args.item_attrs else None, preset=args.preset,
    )
    report = prepare(args.format, args.inputs, args.out, cfg, options, args.on_error)
    print(summary(report))
    return 0


# --------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP service: /score, /recommend, /healthz, /metadata (see docs/serving.md)")
    p.add_argument("run", help="run folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="score with this ONNX export of the run (from `dinrec export`)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per worker")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="attention products when ranking (bfloat16: for CPUs with fast "
                   "bfloat16 GEMMs such as AMX, scores within ~5e-3; see docs/serving.md)")
    p.add_argument("--max-candidates", type=int, default=1000)
    p.add_argument("--max-history", type=int, default=1000)
    p.add_argument("--max-rows", type=int, default=1000, help="rows per /score request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from dinrec.serve.app import Limits, ServeConfig, serve
    except ImportError as exc:
        raise DinrecError(f"serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'dinrec[serve]'") from None
    for name in ("port", "workers", "threads", "max_candidates", "max_history", "max_rows",
                 "max_body_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise DinrecError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    limits = Limits(max_candidates=args.max_candidates, max_history=args.max_history,
                    max_rows=args.max_rows, max_body_bytes=args.max_body_bytes)
    cfg = ServeConfig(run=str(args.run), onnx=args.onnx, threads=args.threads,
                      precision=args.precision, limits=limits)
    serve(cfg, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0


# --------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript "
                       "(dynamic batch and history axes)")
    p.add_argument("run", help="run folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", default=None, help="file to write (default: RUN/export/model.onnx|.pt)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"],
                   help="ONNX: torch.export-based (dynamo) or TorchScript-based (legacy) exporter")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the exported model with PyTorch")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import logging

    from dinrec.serve.export import export_run

    for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # the exporters are chatty
        logging.getLogger(name).setLevel(logging.ERROR)
    result = export_run(args.run, args.format, args.out, which=args.which, opset=args.opset,
                        exporter=args.exporter, verify=not args.no_verify)
    check = "" if result.max_abs_diff is None else f"; max |exported - PyTorch| = {result.max_abs_diff:.2e}"
    print(f"{result.model}: wrote {result.format} to {result.path}{check}")
    return 0


# --------------------------------------------------------------------------- main
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_prepare,
    _add_train,
    _add_evaluate,
    _add_recommend,
    _add_serve,
    _add_export,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dinrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DinrecError as exc:
        print(f"dinrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dinrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
