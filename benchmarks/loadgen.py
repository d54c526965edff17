"""An open-loop HTTP load generator on httpx: requests at a fixed arrival rate.

A closed-loop client (N workers, each waiting for its answer before sending again)
slows down when the server does, so its latencies hide the queue that real traffic
would build. Here request ``i`` is *scheduled* at ``t0 + i / rate`` (or at Poisson
arrival times) whatever happened before, sent as its own task at that time, and its
latency is measured **from the scheduled time**: time spent waiting for a connection,
in the client's event loop or in the server's queue is all counted. A generator that
falls behind its schedule therefore reports worse latencies, never better ones; the
largest send lag is printed so that this can be told apart from a slow server, and
so is the client's own CPU use (on one machine it competes with the server).

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --payloads bodies.jsonl \\
        --rate 200 --duration 30
    python benchmarks/loadgen.py ... --rates 100,200,300 --p99-ms 50   # sweep: highest rate within p99

``bodies.jsonl``: one JSON request body per line, sent round-robin. Prints figures and
asserts nothing. Library use: :func:`open_loop`, :func:`sweep`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class LoadReport:
    rate: float  # requests per second scheduled
    seconds: float  # the schedule's length
    sent: int
    ok: int  # 2xx
    errors: int  # non-2xx answers, connection errors and timeouts
    throughput: float  # 2xx answers per second of schedule
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    max_send_lag_ms: float  # how late the generator itself sent, at worst
    client_cpu: float  # the generator's CPU seconds per wall second (1.0 = one core)
    first_error: str

    def line(self) -> str:
        return (f"rate {self.rate:7.1f}/s  {self.sent:6d} sent  {self.throughput:7.1f} ok/s  "
                f"errors {self.errors}  p50 {self.p50_ms:6.1f}  p90 {self.p90_ms:6.1f}  "
                f"p99 {self.p99_ms:7.1f}  max {self.max_ms:7.1f} ms  send lag <= "
                f"{self.max_send_lag_ms:5.1f} ms  client cpu {self.client_cpu:4.2f}")


def schedule(rate: float, seconds: float, poisson: bool, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of an open-loop load: uniform ``i / rate`` or Poisson."""
    n = max(1, int(rate * seconds))
    if not poisson:
        return np.arange(n) / rate  # (n,)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)  # (n,)
    times = np.cumsum(gaps) - gaps[0]
    return times[times < seconds]


async def open_loop(
    url: str,
    bodies: Sequence[bytes],
    rate: float,
    seconds: float,
    path: str = "/recommend",
    poisson: bool = False,
    max_connections: int = 512,
    timeout: float = 30.0,
    transport: object | None = None,
) -> LoadReport:
    """Send ``bodies`` (round-robin) to ``url + path`` at ``rate`` per second for ``seconds``
    (``transport``: an httpx transport, for tests)."""
    import httpx

    times = schedule(rate, seconds, poisson)
    latencies = np.full(len(times), np.nan)  # (n,) ms, NaN = no 2xx answer
    status = np.zeros(len(times), np.int32)  # (n,) 0 = no answer
    errors: list[str] = []
    lag = 0.0
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, transport=transport) as client:

        async def send(i: int, due: float) -> None:
            try:
                r = await client.post(path, content=bodies[i % len(bodies)], headers=headers)
                status[i] = r.status_code
                if 200 <= r.status_code < 300:
                    latencies[i] = (time.perf_counter() - due) * 1e3
                elif len(errors) < 5:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")

        tasks = []
        cpu0 = time.process_time()
        t0 = time.perf_counter() + 0.05
        for i, t in enumerate(times.tolist()):
            due = t0 + t
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(send(i, due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    ok = latencies[~np.isnan(latencies)]
    p50, p90, p99 = np.percentile(ok, [50, 90, 99]) if ok.size else (np.nan,) * 3
    return LoadReport(
        rate=rate, seconds=seconds, sent=len(times), ok=int(ok.size), errors=int(len(times) - ok.size),
        throughput=ok.size / max(seconds, 1e-9), p50_ms=float(p50), p90_ms=float(p90),
        p99_ms=float(p99), max_ms=float(ok.max()) if ok.size else float("nan"),
        max_send_lag_ms=lag * 1e3, client_cpu=cpu / max(wall, 1e-9),
        first_error=errors[0] if errors else "",
    )


def sweep(url: str, bodies: Sequence[bytes], rates: Sequence[float], seconds: float,
          p99_ms: float = 50.0, **kw) -> tuple[list[LoadReport], float | None]:
    """One :func:`open_loop` per rate (ascending); the highest rate with no error and p99 <=
    ``p99_ms`` (None if none). Stops after the first rate that misses by more than 4x."""
    reports, best = [], None
    for rate in sorted(rates):
        r = asyncio.run(open_loop(url, bodies, rate, seconds, **kw))
        print(r.line(), flush=True)
        reports.append(r)
        if r.errors == 0 and r.p99_ms <= p99_ms:
            best = rate
        elif r.p99_ms > 4 * p99_ms:
            break
    return reports, best


def read_bodies(path: Path) -> list[bytes]:
    return [line.encode() for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="base URL of the service")
    p.add_argument("--payloads", type=Path, required=True, help="JSON lines: request bodies")
    p.add_argument("--path", default="/recommend")
    p.add_argument("--rate", type=float, default=None, help="requests per second")
    p.add_argument("--rates", default=None, help="sweep: comma-separated rates")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per rate")
    p.add_argument("--p99-ms", type=float, default=50.0, help="sweep: the latency objective")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals (default: uniform)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON too")
    args = p.parse_args()
    bodies = read_bodies(args.payloads)
    if args.rates:
        reports, best = sweep(args.url, bodies, [float(r) for r in args.rates.split(",")],
                              args.duration, args.p99_ms, path=args.path, poisson=args.poisson)
        print(f"highest rate with p99 <= {args.p99_ms} ms and no error: {best}")
    else:
        reports = [asyncio.run(open_loop(args.url, bodies, args.rate or 100.0, args.duration,
                                         path=args.path, poisson=args.poisson))]
        print(reports[0].line())
    if args.json:
        print(json.dumps([asdict(r) for r in reports]))


if __name__ == "__main__":
    main()
