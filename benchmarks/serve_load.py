"""Load test of `dinrec serve` on loopback with an open-loop generator.

Takes a run folder (``--run``), or builds one: DIN over the ``small`` synthetic preset,
trained (``--steps``) or, with ``--untrained``, random weights in a run folder written
here (load figures do not depend on the weight values). Then starts ``dinrec serve`` on a
free loopback port in a subprocess and drives ``/recommend`` (``--candidates`` item ids,
a ``--history`` of the main sequence) with the open-loop generator of
``benchmarks/loadgen.py`` (fixed arrival rate, latency from each request's scheduled
send time): a sweep over ``--rates`` reports throughput, p50/p90/p99 and errors per rate
and the highest rate whose p99 is within ``--p99-ms``; ``--soak S`` then holds half that
rate (or ``--soak-rate``) for S seconds and prints the server's resident memory (all its
processes) at start and end. In-process latency: ``benchmarks/serve_latency.py``.

Prints figures, asserts nothing. The generator shares the machine with the server: on a
small box its CPU use (printed) is part of what is measured.

    python benchmarks/serve_load.py --untrained                         # sweep, 20 s per rate
    python benchmarks/serve_load.py --run runs/demo/din --soak 600      # + 10-minute soak
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


def untrained_run(out: Path, preset: str, model_name: str = "din") -> Path:
    """A run folder with random weights (what the trainer writes, minus training)."""
    import torch
    from dinrec.train.checkpoint import save_checkpoint

    from dinrec.data import PrepareConfig, generate, prepare_events
    from dinrec.data import preset as get_preset
    from dinrec.data.store import SampleStore
    from dinrec.models import create_model

    events, _ = generate(get_preset(preset))
    prepare_events(events, out / "store", PrepareConfig())
    store = SampleStore(out / "store")
    torch.manual_seed(0)
    model = create_model(model_name, store.schema, store.table_sizes())
    run = out / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {"model": {"name": model_name, "config": model.config.to_dict(),
                        "table_sizes": store.table_sizes()},
              "train": {"max_len": store.max_len}, "store": str(store.path.resolve())}
    (run / "config.json").write_text(json.dumps(config))
    store.schema.save(run)
    save_checkpoint(run / "checkpoints" / "best.pt", {"model": model.state_dict()})
    return run


sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/loadgen.py


def make_payloads(run: Path, n: int, n_candidates: int, history: int, seed: int = 0) -> list[bytes]:
    """Request bodies: a user id, a main-sequence history and candidates, by item id."""
    from dinrec.serve.ranker import Ranker

    ranker = Ranker(run)
    items = sorted(ranker.encoder.items.keys)
    users = sorted(ranker.encoder.users.keys) or ["u0"]
    main = ranker.schema.main_sequence.name
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(n, 256)):  # a pool of distinct requests, reused round-robin
        body = {
            "user": users[rng.integers(len(users))],
            "sequences": {main: [items[i] for i in rng.integers(0, len(items), history)]},
            "candidates": [items[i] for i in rng.integers(0, len(items), n_candidates)],
            "k": 10,
            "explain": 3,
        }
        out.append(json.dumps(body).encode())
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
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


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, IndexError, ValueError):
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
        cpu0 = tree_cpu(proc.pid)
        reports, best = sweep(url, bodies, [float(r) for r in args.rates.split(",")], args.duration,
                              args.p99_ms)
        answered = sum(r.ok + r.errors for r in reports)
        print(f"highest rate with p99 <= {args.p99_ms:.0f} ms and no error: {best}/s; server CPU "
              f"{(tree_cpu(proc.pid) - cpu0) / max(answered, 1) * 1e3:.2f} ms per request "
              f"(all workers, over the sweep)", flush=True)
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
    p.add_argument("--run", type=Path, default=None, help="run folder (default: build one on --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300, help="training steps when no --run")
    p.add_argument("--untrained", action="store_true", help="no --run: random weights, no training")
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
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            t0 = time.perf_counter()
            if args.untrained:
                run = untrained_run(Path(tmp), args.preset)
            else:
                run = train_run(Path(tmp), args.preset, args.steps)
            print(f"built a DIN run on preset {args.preset!r} ({time.perf_counter() - t0:.0f} s)")
        http_load(args, run)


if __name__ == "__main__":
    main()
