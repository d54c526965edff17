"""Load test of `dinrec serve` on loopback, plus in-process ranking latency.

Trains DIN on the ``small`` synthetic preset (or takes ``--run``), then

1. in process: p50 latency of scoring one history (T items) against 1,000 candidates,
   at the id level (``Ranker.score_candidate_ids``) and the token level (``Ranker.rank``);
2. over HTTP: starts ``dinrec serve`` on a free loopback port in a subprocess and drives
   ``/recommend`` with the open-loop generator of ``benchmarks/loadgen.py`` (fixed arrival
   rate, latency from each request's scheduled send time): a sweep over ``--rates``
   reports throughput, p50/p90/p99 and errors per rate and the highest rate whose p99 is
   within ``--p99-ms``; ``--soak S`` then holds half that rate (or ``--soak-rate``) for S
   seconds and prints the server's resident memory (all its processes) at start and end.

Prints figures, asserts nothing. The generator shares the machine with the server: on a
small box its CPU use (printed) is part of what is measured.

    python benchmarks/serve_load.py --skip-inproc                      # sweep, 20 s per rate
    python benchmarks/serve_load.py --run runs/demo/din --soak 600     # + 10-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(out: Path, preset: str, steps: int) -> Path:
    from dinrec.data import PrepareConfig, generate, prepare_events
    from dinrec.data import preset as get_preset
    from dinrec.train.trainer import TrainConfig, train

    events, _ = generate(get_preset(preset))
    prepare_events(events, out / "store", PrepareConfig())
    train(TrainConfig(model="din", max_steps=steps, progress=False), out / "store", out / "run")
    return out / "run"


def percentiles(ms: np.ndarray) -> str:
    if ms.size == 0:
        return "no samples"
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return f"p50 {p50:.2f} ms  p90 {p90:.2f} ms  p99 {p99:.2f} ms"


def in_process(
    run: Path, n_candidates: int, history: int, runs: int, threads: int, onnx: Path | None = None,
    precision: str = "float32",
) -> None:
    import torch

    from dinrec.serve.ranker import Ranker

    torch.set_num_threads(threads)
    ranker = Ranker(run, onnx=onnx, threads=threads, precision=precision)
    rng = np.random.default_rng(0)
    n_items = ranker.vocab_sizes["item"]
    hist = rng.integers(2, n_items, history)  # (T,)
    cands = rng.integers(2, n_items, n_candidates)  # (N,)
    tokens = ranker.index["item"].tokens
    hist_tok = [tokens[i] for i in hist]
    cand_tok = [tokens[i] for i in cands]
    user = ranker.index["user"].tokens[2]

    def timed(f) -> np.ndarray:
        for _ in range(5):
            f()
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            f()
            out.append((time.perf_counter() - t0) * 1e3)
        return np.asarray(out)

    ids = timed(lambda: ranker.score_candidate_ids(2, hist, cands))
    tok = timed(lambda: ranker.rank(user, hist_tok, cand_tok, k=10, explain=3))
    print(f"in-process, {ranker.model_name} ({ranker.backend.name}, {precision}), T={history}, "
          f"N={n_candidates}, torch threads={threads}, {runs} runs:")
    print(f"  ids    (score_candidate_ids)   {percentiles(ids)}")
    print(f"  tokens (rank, k=10, explain=3) {percentiles(tok)}")


def precision_agreement(run: Path, n_candidates: int, history: int, requests: int = 50) -> None:
    """How far bfloat16 ranking is from float32: max |p diff| and top-10 overlap."""
    from dinrec.serve.ranker import Ranker

    exact, fast = Ranker(run), Ranker(run, precision="bfloat16")
    rng = np.random.default_rng(1)
    n_items = exact.vocab_sizes["item"]
    diffs, overlap = [], []
    for _ in range(requests):
        hist = rng.integers(2, n_items, history)
        cands = rng.choice(np.arange(2, n_items), size=min(n_candidates, n_items - 2), replace=False)
        p = exact.score_candidate_ids(2, hist, cands).probabilities
        q = fast.score_candidate_ids(2, hist, cands).probabilities
        diffs.append(np.abs(p - q).max())
        overlap.append(len(set(np.argsort(-p)[:10]) & set(np.argsort(-q)[:10])) / 10)
    print(f"bfloat16 vs float32 over {requests} requests: max |p diff| {max(diffs):.2e} "
          f"(median {np.median(diffs):.2e}); top-10 overlap mean {np.mean(overlap):.3f}, "
          f"min {min(overlap):.1f}")


sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/loadgen.py


def make_payloads(run: Path, n: int, n_candidates: int, history: int, seed: int = 0) -> list[bytes]:
    from dinrec.data.vocab import Vocabularies

    vocabs = Vocabularies.load(run / "vocab")
    items = vocabs.item.tokens.to_pylist()
    users = vocabs.user.tokens.to_pylist()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(n, 256)):  # a pool of distinct requests, reused round-robin
        body = {
            "user": users[rng.integers(len(users))],
            "history": [items[i] for i in rng.integers(0, len(items), history)],
            "candidates": [items[i] for i in rng.integers(0, len(items), n_candidates)],
            "k": 10,
            "explain": 3,
        }
        out.append(json.dumps(body).encode())
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def http_load(args: argparse.Namespace, run: Path) -> None:
    from loadgen import open_loop, sweep

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dinrec", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers), "--threads", str(args.server_threads), "--log-level", "warning"]
    if not args.access_log:
        cmd.append("--no-access-log")
    if args.onnx:
        cmd += ["--onnx", str(args.onnx)]
    else:
        cmd += ["--precision", args.precision]
    log_file = open(os.devnull, "wb")  # the JSON access log: written (costs what it costs), not kept
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.server_threads)},
                            stderr=log_file)
    try:
        wait_healthy(url, proc)
        bodies = make_payloads(run, 256, args.candidates, args.history)
        asyncio.run(open_loop(url, bodies, 50, 4))  # warm-up: connections, allocator, caches
        print(f"HTTP /recommend, {args.candidates} candidates, T={args.history}, {args.workers} "
              f"workers x {args.server_threads} thread{' (ONNX)' if args.onnx else ''}, open loop "
              f"{args.duration:.0f} s per rate, load average {os.getloadavg()[0]:.2f}:", flush=True)
        _, best = sweep(url, bodies, [float(r) for r in args.rates.split(",")], args.duration,
                        args.p99_ms)
        print(f"highest rate with p99 <= {args.p99_ms:.0f} ms and no error: {best}/s", flush=True)
        if args.soak > 0:
            rate = args.soak_rate or (best or 0) / 2
            if rate <= 0:
                print("soak: no rate met the objective and no --soak-rate given")
                return
            rss0 = tree_rss(proc.pid)
            load0 = os.getloadavg()
            r = asyncio.run(open_loop(url, bodies, rate, args.soak))
            rss1 = tree_rss(proc.pid)
            print(f"soak {args.soak:.0f} s at {rate:.0f}/s (load average {load0[0]:.2f} -> "
                  f"{os.getloadavg()[0]:.2f}):\n  {r.line()}")
            print(f"  server RSS (all processes) start {rss0 / 2**20:.1f} MiB, end "
                  f"{rss1 / 2**20:.1f} MiB ({(rss1 - rss0) / 2**20:+.1f} MiB)")
            if r.first_error:
                print(f"  first error: {r.first_error}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="run folder (default: train DIN on --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300, help="training steps when no --run")
    p.add_argument("--rates", default="100,150,200,250,300,350,400,500",
                   help="open-loop sweep: requests per second, comma-separated")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per rate of the sweep")
    p.add_argument("--p99-ms", type=float, default=50.0, help="the latency objective of the sweep")
    p.add_argument("--soak", type=float, default=0.0, help="then hold a rate this many seconds")
    p.add_argument("--soak-rate", type=float, default=None, help="default: half the sweep's best")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="the server writes its JSON access log (to /dev/null here)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--onnx", type=Path, default=None, help="serve this ONNX export instead")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="`dinrec serve --precision` for the HTTP load")
    p.add_argument("--export-onnx", action="store_true",
                   help="export the run to ONNX first and serve that (`dinrec serve --onnx`)")
    p.add_argument("--inproc-candidates", type=int, default=1000)
    p.add_argument("--inproc-runs", type=int, default=200)
    p.add_argument("--inproc-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-inproc", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            t0 = time.perf_counter()
            run = train_run(Path(tmp), args.preset, args.steps)
            print(f"trained DIN on preset {args.preset!r}, {args.steps} steps ({time.perf_counter() - t0:.0f} s)")
        for threads in sorted({1, args.inproc_threads}) if not args.skip_inproc else ():
            for precision in ("float32", "bfloat16"):
                in_process(run, args.inproc_candidates, args.history, args.inproc_runs, threads,
                           precision=precision)
        if not args.skip_inproc:
            precision_agreement(run, args.inproc_candidates, args.history)
        if args.export_onnx:
            import logging

            from dinrec.serve.export import export_run

            for name in ("torch.onnx", "onnxscript", "onnx_ir"):
                logging.getLogger(name).setLevel(logging.ERROR)

            args.onnx = export_run(run, "onnx", Path(tmp) / "model.onnx").path
            in_process(run, args.inproc_candidates, args.history, args.inproc_runs, 1, args.onnx)
        if not args.skip_http:
            http_load(args, run)


if __name__ == "__main__":
    main()
