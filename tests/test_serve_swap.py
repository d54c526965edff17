"""Live model swap: under load no request fails and every answer comes from one whole model."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402

from dinrec.serve.app import ServeConfig, create_app  # noqa: E402
from dinrec.serve.ranker import Ranker  # noqa: E402
from dinrec.serve.swap import ModelSlot, ModelSpec, Served, SharedState, SwapError  # noqa: E402

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def run_b(tiny_din_run, tmp_path_factory) -> Path:
    """A second DIN run on the same store whose scores differ from ``tiny_din_run``'s."""
    from dinrec.train.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("run_b") / "run"
    train(TrainConfig(model="din", max_steps=8, seed=7, lr=3e-3, progress=False),
          tiny_din_run.parent / "store", out)
    return out


@pytest.fixture(scope="module")
def body(tiny_din_run) -> dict:
    ranker = Ranker(tiny_din_run)
    items = ranker.index["item"].tokens[2:60]
    return {"user": ranker.index["user"].tokens[2], "history": items[:20], "candidates": items[20:],
            "k": 38}


def expected(run: Path, body: dict) -> dict[str, float]:
    rec = Ranker(run).rank(body["user"], body["history"], body["candidates"], k=body["k"])
    return {s.item: s.score for s in rec.ranked}


def whole_model(answer: dict, want: dict[str, float]) -> bool:
    got = {r["item"]: r["score"] for r in answer["ranked"]}
    return got.keys() == want.keys() and all(abs(got[i] - want[i]) < 1e-6 for i in got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_swap_under_load_no_errors_and_whole_models(tiny_din_run, run_b, body):
    """A client hammers /recommend (8 concurrent) while the model is swapped A -> B -> A -> B."""
    import uvicorn

    runs = {1: tiny_din_run, 2: run_b, 3: tiny_din_run, 4: run_b}
    want = {v: expected(r, body) for v, r in runs.items()}
    assert not whole_model({"ranked": [{"item": i, "score": s} for i, s in want[1].items()]}, want[2])

    app = create_app(ServeConfig(run=str(tiny_din_run), admin_token=TOKEN))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t_end = time.time() + 30
    while not server.started and time.time() < t_end:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    answers: list[tuple[int, dict | str]] = []
    stop = threading.Event()

    async def hammer() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            async def one() -> None:
                while not stop.is_set():
                    try:
                        r = await c.post("/recommend", json=body)
                        answers.append((r.status_code, r.json() if r.status_code == 200 else r.text))
                    except httpx.HTTPError as exc:
                        answers.append((0, repr(exc)))
            await asyncio.gather(*(one() for _ in range(8)))

    client = threading.Thread(target=lambda: asyncio.run(hammer()))
    client.start()
    try:
        swaps = []
        for version in (2, 3, 4):
            time.sleep(0.7)
            r = httpx.post(url + "/admin/model", json={"run": str(runs[version])}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            swaps.append(r.json())
        time.sleep(0.7)
    finally:
        stop.set()
        client.join(timeout=60)
        server.should_exit = True
        thread.join(timeout=10)
    assert [s["served"]["version"] for s in swaps] == [2, 3, 4]
    assert [s["previous"]["version"] for s in swaps] == [1, 2, 3]
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:3]
    seen = {a["version"] for _, a in answers}
    assert seen == {1, 2, 3, 4}, seen
    mixed = [a for _, a in answers if not whole_model(a, want[a["version"]])]
    assert not mixed, mixed[:1]
    # Responses in arrival order never go back to an older version (one worker).
    assert len(answers) > 40


def test_swap_refusals_keep_the_served_model(tiny_din_run, body, tmp_path):
    app = create_app(ServeConfig(run=str(tiny_din_run), admin_token=TOKEN))
    with TestClient(app) as c:
        assert c.post("/admin/model", json={"run": str(tiny_din_run)}).status_code == 401
        assert c.post("/admin/model", json={"run": str(tiny_din_run)},
                      headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.post("/admin/model", json={"run": str(tmp_path / "missing")}, headers=AUTH)
        assert r.status_code == 422 and "missing" in r.json()["message"]
        r = c.post("/admin/model", json={"run": str(tiny_din_run), "which": "worst"}, headers=AUTH)
        assert r.status_code == 422 and r.json()["message"].startswith("which:")
        assert c.post("/recommend", json=body).json()["version"] == 1
        assert c.get("/admin/model", headers=AUTH).json()["version"] == 1
        assert 'dinrec_model_swaps_total{outcome="refused"} 1.0' in c.get("/metrics").text
        # The same run again is a swap too (e.g. best.pt rewritten by a later training).
        r = c.post("/admin/model", json={"run": str(tiny_din_run), "which": "last"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["served"]["which"] == "last"
        assert c.post("/recommend", json=body).json()["version"] == 2
    off = create_app(ServeConfig(run=str(tiny_din_run)), ranker=app.state.slot.current.ranker)
    with TestClient(off) as c:
        assert c.post("/admin/model", json={"run": str(tiny_din_run)}, headers=AUTH).status_code == 404


def _fake(sig: str) -> SimpleNamespace:
    return SimpleNamespace(model_name="m", backend=SimpleNamespace(name="torch"), request_signature=sig)


def test_slot_refuses_other_requests_and_follows_shared_state(tmp_path):
    loaded: list[ModelSpec] = []

    def loader(spec: ModelSpec) -> SimpleNamespace:
        loaded.append(spec)
        return _fake("other" if spec.run == "x" else "same")

    async def scenario() -> None:
        leader = ModelSlot(Served(_fake("same"), ModelSpec("a"), 1, 0.0), loader, SharedState(tmp_path))
        follower = ModelSlot(Served(_fake("same"), ModelSpec("a"), 1, 0.0), loader, SharedState(tmp_path))
        with pytest.raises(SwapError) as err:
            await leader.swap(ModelSpec("x"))
        assert err.value.status == 409 and leader.current.version == 1
        served = await leader.swap(ModelSpec("b", "last"))
        assert served.version == 1 + 0 + 1 and leader.current is served
        assert SharedState(tmp_path).read() == (ModelSpec("b", "last"), 2)
        assert await follower.follow() and follower.current.version == 2
        assert follower.current.spec == ModelSpec("b", "last")
        assert not await follower.follow()  # nothing new: no reload
        assert [s.run for s in loaded] == ["x", "b", "b"]

    asyncio.run(scenario())


def test_workers_share_swaps_and_metrics(tiny_din_run, run_b, body):
    """`dinrec serve --workers 2`: a swap sent to one worker reaches both; /metrics sums both."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinrec", "serve", str(tiny_din_run), "--port", str(port),
         "--workers", "2", "--admin-token", TOKEN, "--log-level", "warning", "--no-access-log"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    try:
        t_end = time.time() + 120
        while time.time() < t_end:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        want_b = expected(run_b, body)
        with httpx.Client(base_url=url, timeout=30) as c:
            # New connections: the kernel spreads them over both workers.
            n = sum(httpx.post(url + "/recommend", json=body, timeout=30).status_code == 200
                    for _ in range(30))
            assert n == 30
            assert c.post("/admin/model", json={"run": str(run_b)}, headers=AUTH).status_code == 200
            time.sleep(4)  # both workers poll the shared state every 0.5 s and load run B
            for _ in range(30):
                a = httpx.post(url + "/recommend", json=body, timeout=30).json()
                assert a["version"] == 2 and whole_model(a, want_b)
            text = c.get("/metrics").text
        from prometheus_client.parser import text_string_to_metric_families

        fams = {f.name: f for f in text_string_to_metric_families(text)}
        ok = sum(s.value for s in fams["dinrec_requests"].samples
                 if s.name == "dinrec_requests_total" and s.labels["route"] == "/recommend")
        assert ok == 60  # both workers' requests, whichever worker answered the scrape
        versions = {s.labels["pid"]: s.value for s in fams["dinrec_model_version"].samples}
        assert len(versions) == 2 and set(versions.values()) == {2.0}
        assert np.isclose(sum(s.value for s in fams["dinrec_candidates_scored"].samples
                              if s.name.endswith("_total")), 60 * len(body["candidates"]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
