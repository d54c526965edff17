"""benchmarks/loadgen.py: open-loop schedule, latency counted from the scheduled send time."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from loadgen import open_loop, schedule  # noqa: E402


def test_schedule_uniform_and_poisson():
    u = schedule(200, 2.0, poisson=False)
    assert len(u) == 400 and np.allclose(np.diff(u), 1 / 200)
    p = schedule(200, 20.0, poisson=True, seed=1)
    assert p[0] == 0 and (p < 20).all() and abs(len(p) - 4000) < 4 * np.sqrt(4000)
    assert np.std(np.diff(p)) > 0.5 / 200  # exponential gaps, not a fixed step


def test_queueing_counts_from_the_scheduled_time():
    """A server that holds every request until the whole schedule was sent: request i's latency
    must include the time from its scheduled send to the release, so the first one waited at
    least the schedule's length (a closed loop, or timing from the actual send of a lagging
    client, could not see that wait)."""
    release = asyncio.Event()
    seen = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(time.perf_counter())
        i = len(seen)
        if i == 50:
            release.set()
        await release.wait()
        return httpx.Response(200 if i % 10 else 503, json={"ok": True})

    report = asyncio.run(open_loop("http://test", [b"{}"], rate=100, seconds=0.5,
                                   transport=httpx.MockTransport(handler)))
    assert report.sent == 50 and len(seen) == 50
    assert report.errors == 5 and report.ok == 45  # every 10th answer is a 503
    # requests were sent at the schedule while none had been answered (open loop) ...
    assert seen[-1] - seen[0] >= 0.45
    # ... and the earliest one's latency covers the whole schedule (lower bound only)
    assert report.max_ms >= 450


@pytest.mark.parametrize("rate", [50.0])
def test_connection_errors_are_errors(rate):
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    report = asyncio.run(open_loop("http://test", [b"{}"], rate=rate, seconds=0.2,
                                   transport=httpx.MockTransport(handler)))
    assert report.sent == 10 and report.errors == 10 and report.ok == 0
    assert "ConnectError" in report.first_error


def test_a_lagging_generator_reports_its_lag_as_latency():
    """A handler that blocks the client's event loop 40 ms per request at 100 requests/s: the
    generator falls behind its schedule, and that delay is counted in the latencies (from the
    scheduled time, not from the late actual send) and shown as send lag."""
    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(0.04)  # synchronous: the whole client waits
        return httpx.Response(200)

    report = asyncio.run(open_loop("http://test", [b"{}"], rate=100, seconds=0.5,
                                   transport=httpx.MockTransport(handler)))
    assert report.sent == 50 and report.errors == 0
    # the 50th request is sent at ~2.0 s instead of 0.49 s: its latency is >= ~1.5 s
    assert report.max_send_lag_ms >= 400 and report.max_ms >= 400
