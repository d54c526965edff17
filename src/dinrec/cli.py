"""The `dinrec` command line: parse arguments, call the library, print.

Each sub-command has an ``_add_<name>`` function that declares its arguments and a
``_run_<name>`` function that does the work; errors of type :class:`DinrecError`
are printed as one line (no stack trace) with exit status 2. ``dinrec train``'s options
are generated from :class:`dinrec.train.config.TrainConfig`'s fields (help text from
their metadata). Only the named sub-command's options are built, and its modules are
imported when it runs, so ``dinrec --version`` and ``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dinrec import __version__
from dinrec.errors import DinrecError

if typing.TYPE_CHECKING:
    from dinrec.train.config import TrainConfig

T = TypeVar("T")


# --------------------------------------------------------------------------- options
def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(h) for h in text.split(",") if h.strip())


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_options(p: argparse._ActionsContainer, cls: type) -> None:
    """One option per field of the config dataclass ``cls``: ``--field-name`` (or the
    field's ``metadata["flag"]``), typed from its annotation, help and choices from its
    metadata (see :mod:`dinrec.train.config`). An option not given is absent from the
    parsed namespace, so :func:`config_from_args` can tell it from one given with the
    default's value."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        text = argparse.SUPPRESS if meta.get("hidden") else meta.get("help", "")
        tp = hints[f.name]
        common: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            if meta.get("negatable"):
                text = f"{text} (default: --{'' if f.default else 'no-'}{flag.lstrip('-')})"
                p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, **common)
                continue
            action = "store_false" if meta.get("invert") else "store_true"
            p.add_argument(flag, action=action, help=text, **common)
            continue
        if typing.get_origin(tp) is dict:  # KEY=VALUE, repeatable
            p.add_argument(flag, action="append", metavar="KEY=VALUE", help=text, **common)
            continue
        if text is not argparse.SUPPRESS and "(default" not in text:
            text = f"{text} (default: {_shown(f.default)})"
        if typing.get_origin(tp) is tuple:
            p.add_argument(flag, metavar="N,N,...", help=text, **common)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        kind = args[0] if args else tp  # X | None -> X
        p.add_argument(flag, type=kind, choices=meta.get("choices"), help=text, **common)


def config_from_args(cls: type[T], args: argparse.Namespace, base: T | None = None) -> T:
    """The config dataclass ``cls`` from options added by :func:`add_config_options`: the
    options given, over ``base`` (default: ``cls()``); a dict option is merged key by key
    into the base's."""
    hints = typing.get_type_hints(cls)
    values = {}
    start = cls() if base is None else base
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("cli") is False or not hasattr(args, f.name):
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is dict:
            value = {**getattr(start, f.name), **_parse_key_values(value, flag)}
        elif typing.get_origin(hints[f.name]) is tuple:
            try:
                value = _int_tuple(value)
            except ValueError:
                raise DinrecError(f"{flag}: expected comma-separated integers, got {value!r}") from None
        values[f.name] = value
    return dataclasses.replace(start, **values)  # type: ignore[type-var]


def _parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DinrecError(f"{flag}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--reference", action="store_true",
                   help="train in the DIEN reference configuration (docs/training.md)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.seed_example:
        from dinrec.seed_demo import run_seed_demo

        print(run_seed_demo())
        return 0
    from dinrec.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=Path(args.out), preset=args.preset, epochs=args.epochs, seed=args.seed,
        threads=args.threads, progress=not args.quiet, reference=args.reference,
    )
    run_demo(cfg, echo=lambda line: print(line, flush=True))
    return 0


# --------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    from dinrec.train.config import TrainConfig

    p.add_argument("store", help="sample store folder (from `dinrec prepare`)")
    p.add_argument("run", help="run folder to create (or continue with --resume)")
    add_config_options(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    p.add_argument("--reference", action="store_true",
                   help="start from the DIEN reference configuration (length-sorted batches, "
                   "PReLU MLP, Adam 1e-3, DIN's din_fcn_attention) instead of the accurate "
                   "defaults; "
                   "options given with it win (docs/training.md)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel worker processes on this machine, started with "
                   "torch.distributed.run (gloo on CPU, NCCL on GPU); --batch-size is per "
                   "process. For several machines use torchrun (docs/distributed.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its last checkpoint (starts it afresh, saying "
                   "so, when there is none: the same command can be re-run after any kill)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_run_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """``dinrec train``'s TrainConfig: the options given, over the defaults or, with
    ``--reference``, over ``TrainConfig.reference(model)``."""
    from dinrec.train.config import TrainConfig

    base = TrainConfig.reference(getattr(args, "model", TrainConfig.model)) if args.reference else None
    return config_from_args(TrainConfig, args, base)


def _run_train(args: argparse.Namespace) -> int:
    import json
    import os

    cfg = train_config(args)
    if args.nproc < 1:
        raise DinrecError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        return _launch(args)
    _die_with_launcher()
    from dinrec.train.trainer import train

    result = train(cfg, args.store, args.run, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK") or 0) != 0:
        return 0  # rank 0 reports
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


def _launch(args: argparse.Namespace) -> int:
    """``dinrec train --nproc N``: the same command as N local ranks, started by PyTorch's
    elastic launcher (``python -m torch.distributed.run --standalone``)."""
    import os
    import subprocess

    argv = _without_nproc(list(args.argv))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "dinrec", *argv]
    # The launcher starts its workers in process groups of their own: they must die with it.
    return subprocess.call(cmd, env={**os.environ, _DIE_WITH_LAUNCHER: "1"})


_DIE_WITH_LAUNCHER = "DINREC_DIE_WITH_LAUNCHER"


def _die_with_launcher() -> None:
    """A worker of ``dinrec train --nproc``: SIGKILL it when its launcher dies (Linux), so
    that killing the command's process group stops the whole run, as for one process."""
    import os
    import signal

    if os.environ.get(_DIE_WITH_LAUNCHER) != "1" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - no libc: the workers outlive a killed launcher
        return
    if os.getppid() == 1:  # the launcher died before prctl
        os._exit(1)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--store", default=None, help="sample store (default: the run's own)")
    p.add_argument("--split", default="test")
    p.add_argument("--ranking", type=int, default=0, metavar="N",
                   help="also rank each positive among N items sampled by popularity, never a "
                   "positive of that user (redrawn): HR@K, NDCG@K")
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
def _add_recommend(p: argparse.ArgumentParser) -> None:
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
    key = ranker.schema.item_key.name
    if key in rec.unknown and args.candidates is not None:
        bad = [c for c in rec.unknown[key] if c in candidates]
        if bad:
            raise DinrecError(f"--candidates: not items of this run's vocabulary: {', '.join(bad[:5])}")
    if ranker.schema.user_key.name in rec.unknown:
        raise DinrecError(f"--user: {args.user!r} is not in this run's vocabulary")
    if args.json:
        print(json.dumps({"model": ranker.model_name, **rec.to_dict()}, indent=2))
        return 0
    main = ranker.schema.main_sequence.name
    used = [e if isinstance(e, str) else e[key] for e in rec.history[main]]
    print(f"user {rec.user}, {ranker.model_name}, {main} of {len(used)} events "
          f"(newest last): {' '.join(used[-10:])}")

    def attrs(d: dict) -> str:
        return ", ".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in d.items() if k != key)

    for rank, s in enumerate(rec.ranked, 1):
        print(f"{rank:>3}. {s.item:<12} p={s.score:.4f}  [{attrs(s.attributes)}]")
        for e in s.explanation:
            print(f"       <- {e.sequence}[{e.position}] {e.event[key]} w={e.weight:.3f}  [{attrs(e.event)}]")
    if rec.unknown:
        print("unknown (scored as out-of-vocabulary): " + "; ".join(
            f"{k}: {', '.join(v[:5])}" for k, v in rec.unknown.items()))
    return 0


# --------------------------------------------------------------------------- prepare
def _add_prepare(p: argparse.ArgumentParser) -> None:
    from dinrec.data.formats import FORMATS

    formats = "\n".join(f"  {f.name:<10} {f.inputs:<36} {f.summary}" for f in FORMATS.values())
    p.description = "Read INPUT files in FORMAT and write a Parquet sample store to --out."
    p.epilog = "formats (FORMAT  INPUTS  what):\n" + formats
    p.formatter_class = argparse.RawDescriptionHelpFormatter
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
    r.add_argument("--item-table", default=None, metavar="FILE",
                   help="events: item side table (CSV/TSV/Parquet with a header, or JSON lines)")
    r.add_argument("--item-key", default=None, metavar="COL",
                   help="events: the item column of --item-table (default: --item-col, else the first)")
    r.add_argument("--user-table", default=None, metavar="FILE",
                   help="events: user side table (CSV/TSV/Parquet with a header, or JSON lines)")
    r.add_argument("--user-key", default=None, metavar="COL",
                   help="events: the user column of --user-table (default: --user-col, else the first)")
    r.add_argument("--preset", default="small", help="synthetic: preset name")
    f = p.add_argument_group("features (the schema; see docs/formats.md, \"The feature schema\")")
    f.add_argument("--schema", default=None, metavar="JSON", help="schema file (default: user; "
                   "item + cat; one sequence 'hist'); the flags below add to it")
    f.add_argument("--user-features", default=None, metavar="F,...",
                   help="e.g. gender,age:numeric:buckets=18|25|35|50,occupation")
    f.add_argument("--item-features", default=None, metavar="F,...",
                   help="e.g. brand,genres:multi,price:numeric:log")
    f.add_argument("--context-features", default=None, metavar="F,...", help="e.g. hour,platform")
    f.add_argument("--sequence", action="append", default=None, metavar="NAME[:COL:V|V]",
                   help="a behaviour sequence (repeat; the first is the main one), e.g. "
                   "liked:rating:>=4 and disliked:rating:<4")
    f.add_argument("--event-features", default=None, metavar="F,...",
                   help="per-event features of every sequence, e.g. rating:numeric")
    f.add_argument("--time-gap", default=None, metavar="S,...",
                   help="add the time since each event, bucketed at these seconds")
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
        item_table=Path(args.item_table) if args.item_table else None, item_key=args.item_key,
        user_table=Path(args.user_table) if args.user_table else None, user_key=args.user_key,
    )
    from dinrec.data.schema import schema_from_options

    schema = schema_from_options(
        args.schema, args.max_len, args.user_features, args.item_features,
        args.context_features, args.sequence, args.event_features, args.time_gap,
    )
    report = prepare(args.format, args.inputs, args.out, cfg, options, args.on_error, schema)
    print(summary(report))
    return 0


# --------------------------------------------------------------------------- serve
def _add_serve(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--admin-token", default=None,
                   help="enables POST /admin/model (live model swap) for this bearer token "
                   "(default: $DINREC_ADMIN_TOKEN; neither: admin routes off)")
    p.add_argument("--no-access-log", action="store_true", help="no JSON line per request")
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
                      precision=args.precision, limits=limits, admin_token=args.admin_token,
                      access_log=not args.no_access_log)
    serve(cfg, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0


# --------------------------------------------------------------------------- export
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", default=None, help="file to write (default: RUN/export/model.onnx|.pt)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"],
                   help="ONNX: torch.export-based (dynamo), TorchScript-based (legacy), or auto "
                   "(legacy for the DIEN family's recurrences, dynamo otherwise)")
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
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": ("the main job on the embedded synthetic data: prepare, train DIN and BaseModel, "
             "evaluate, recommend with explanations, plots", _add_demo),
    "prepare": ("turn a log file format into a sample store (see docs/formats.md)", _add_prepare),
    "train": ("train a model on a sample store into a run folder", _add_train),
    "evaluate": ("metrics of one or more runs on a split of a store", _add_evaluate),
    "recommend": ("top-K items for a user, with the attention's explanation", _add_recommend),
    "serve": ("HTTP service: /score, /recommend, /healthz, /metadata (see docs/serving.md)",
              _add_serve),
    "export": ("export a run's model to ONNX or TorchScript (dynamic batch and history axes)",
               _add_export),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the options of the sub-command it names are built
    (so ``dinrec --version`` or ``dinrec train --help`` import nothing heavy)."""
    chosen = None if argv is None else next((a for a in argv if a in _COMMANDS), "")
    parser = argparse.ArgumentParser(prog="dinrec", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dinrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if chosen is None or chosen == name:
            add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
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
