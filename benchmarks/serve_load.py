"""Load test of `dinrec serve` on loopback, plus in-process ranking latency.

Trains DIN on the ``small`` synthetic preset (or takes ``--run``), then

1. in process: p50 latency of scoring one history (T items) against 1,000 candidates,
   at the id level (``Ranker.score_candidate_ids``) and the token level (``Ranker.rank``);
2. over HTTP: starts ``dinrec serve`` on a free loopback port in a subprocess and sends a
   bounded load (count and time) of ``/recommend`` requests from an httpx async client at
   a fixed concurrency; prints throughput, latency p50/p90/p99 and the non-2xx count.

Prints figures, asserts nothing. The client shares the machine with the server: on a
small box its CPU use is part of what is measured.

    python benchmarks/serve_load.py                     # defaults: 10,000 requests, c=32
    python benchmarks/serve_load.py --run runs/demo/din --requests 2000
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class LoadResult:
    sent: int
    ok: int
    non_2xx: int
    failed: int  # connection errors, timeouts
    first_error: str
    seconds: float
    latencies_ms: np.ndarray  # (ok + non_2xx,)


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


async def load(url: str, payloads: list[bytes], total: int, concurrency: int, time_limit: float) -> LoadResult:
    import httpx

    latencies: list[float] = []
    counts = {"ok": 0, "non_2xx": 0, "failed": 0, "sent": 0}
    errors: list[str] = []
    deadline = time.perf_counter() + time_limit
    next_i = 0
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:

        async def worker() -> None:
            nonlocal next_i
            while next_i < total and time.perf_counter() < deadline:
                body = payloads[next_i % len(payloads)]
                next_i += 1
                counts["sent"] += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/recommend", content=body, headers=headers)
                except httpx.HTTPError as exc:
                    counts["failed"] += 1
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)
                counts["ok" if 200 <= r.status_code < 300 else "non_2xx"] += 1
                if not 200 <= r.status_code < 300:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return LoadResult(
        sent=counts["sent"], ok=counts["ok"], non_2xx=counts["non_2xx"], failed=counts["failed"],
        first_error=errors[0] if errors else "", seconds=seconds, latencies_ms=np.asarray(latencies),
    )


_WRK_LUA = """
local bodies = {}
for line in io.lines(os.getenv("DINREC_PAYLOADS")) do bodies[#bodies + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, "/recommend", nil, bodies[(i % #bodies) + 1])
end
"""


def wrk_load(url: str, payloads: list[bytes], seconds: float, concurrency: int, tmp: Path) -> str:
    """The same load from `wrk` (a C client: far less of the 2 cores than Python's)."""
    (tmp / "payloads.jsonl").write_bytes(b"\n".join(payloads) + b"\n")
    (tmp / "load.lua").write_text(_WRK_LUA)
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, int(seconds))}s", "--latency",
           "-s", str(tmp / "load.lua"), url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                         env={**os.environ, "DINREC_PAYLOADS": str(tmp / "payloads.jsonl")})
    return res.stdout + res.stderr


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


def http_load(args: argparse.Namespace, run: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dinrec", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers), "--threads", str(args.server_threads), "--log-level", "warning"]
    if args.onnx:
        cmd += ["--onnx", str(args.onnx)]
    else:
        cmd += ["--precision", args.precision]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.server_threads)})
    try:
        wait_healthy(url, proc)
        payloads = make_payloads(run, args.requests, args.candidates, args.history)
        asyncio.run(load(url, payloads, min(200, args.requests), args.concurrency, 30))  # warm-up
        if args.client == "wrk":
            with tempfile.TemporaryDirectory() as tmp:
                report = wrk_load(url, payloads, args.wrk_seconds, args.concurrency, Path(tmp))
            print(f"wrk, /recommend, {args.candidates} candidates, T={args.history}, concurrency "
                  f"{args.concurrency}, {args.workers} workers x {args.server_threads} thread:")
            print(report)
            return
        res = asyncio.run(load(url, payloads, args.requests, args.concurrency, args.time_limit))
        import httpx

        health = httpx.get(url + "/healthz", timeout=5).status_code
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"HTTP /recommend, {args.candidates} candidates, T={args.history}, concurrency "
          f"{args.concurrency}, {args.workers} workers x {args.server_threads} thread"
          f"{' (ONNX)' if args.onnx else f' ({args.precision})'}:")
    print(f"  {res.sent:,} sent in {res.seconds:.1f} s: {res.ok / res.seconds:,.0f} req/s; "
          f"non-2xx {res.non_2xx}, failed {res.failed}; /healthz after: {health}")
    print(f"  latency {percentiles(res.latencies_ms)}")
    if res.first_error:
        print(f"  first error: {res.first_error}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="run folder (default: train DIN on --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300, help="training steps when no --run")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds of load at most")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=32)
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
    p.add_argument("--client", choices=["httpx", "wrk"], default="httpx",
                   help="load generator: Python httpx (default) or wrk (apt-get install wrk)")
    p.add_argument("--wrk-seconds", type=float, default=30.0, help="duration of the wrk load")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            t0 = time.perf_counter()
            run = train_run(Path(tmp), args.preset, args.steps)
            print(f"trained DIN on preset {args.preset!r}, {args.steps} steps ({time.perf_counter() - t0:.0f} s)")
        for threads in sorted({1, args.inproc_threads}):
            for precision in ("float32", "bfloat16"):
                in_process(run, args.inproc_candidates, args.history, args.inproc_runs, threads,
                           precision=precision)
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
