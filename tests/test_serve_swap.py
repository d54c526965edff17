"""Live model swap: under load no request fails and every answer comes from one whole model."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from serve_inputs import rich_ranker, rich_store

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402

from dinrec.errors import DinrecError  # noqa: E402
from dinrec.serve.app import ServeConfig, create_app  # noqa: E402
from dinrec.serve.ranker import Ranker  # noqa: E402
from dinrec.serve.swap import ModelSlot, ModelSpec, Served, SharedState, SwapError  # noqa: E402

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEEDS = {"runA": 0, "runB": 1}  # two "runs": the same schema, different weights


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return rich_store(tmp_path_factory.mktemp("rich") / "store")


@pytest.fixture(scope="module")
def rankers(store_path) -> dict[str, Ranker]:
    return {run: rich_ranker(store_path, seed=seed) for run, seed in SEEDS.items()}


def loader_of(rankers: dict[str, Ranker]):
    def load(spec: ModelSpec) -> Ranker:
        if spec.run not in rankers:
            raise DinrecError(f"{spec.run}: not a dinrec run folder")
        time.sleep(0.2)  # loading takes a while; requests keep coming meanwhile
        return rankers[spec.run]

    return load


BODY = {"user": "u2", "sequences": {"hist": ["i1", "i3", {"item": "i5", "rating": 4}], "liked": ["i7"]},
        "candidates": [f"i{i}" for i in range(10, 48)], "k": 38}


def expected(ranker: Ranker) -> dict[str, float]:
    rec = ranker.recommend(BODY["user"], BODY["candidates"], BODY["sequences"], k=BODY["k"])
    return {s.item: s.score for s in rec.ranked}


def whole_model(answer: dict, want: dict[str, float]) -> bool:
    got = {r["item"]: r["score"] for r in answer["ranked"]}
    return got.keys() == want.keys() and all(abs(got[i] - want[i]) < 1e-6 for i in got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_swap_under_load_no_errors_and_whole_models(rankers):
    """A client hammers /recommend (8 concurrent) while the model is swapped A -> B -> A -> B."""
    import uvicorn

    runs = {1: "runA", 2: "runB", 3: "runA", 4: "runB"}
    want = {v: expected(rankers[r]) for v, r in runs.items()}
    assert not whole_model({"ranked": [{"item": i, "score": s} for i, s in want[1].items()]}, want[2])
    body = BODY
    app = create_app(ServeConfig(run="runA", admin_token=TOKEN), ranker=rankers["runA"],
                     loader=loader_of(rankers))
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
            r = httpx.post(url + "/admin/model", json={"run": runs[version]}, headers=AUTH, timeout=60)
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


def test_swap_refusals_keep_the_served_model(rankers):
    app = create_app(ServeConfig(run="runA", admin_token=TOKEN), ranker=rankers["runA"],
                     loader=loader_of(rankers))
    with TestClient(app) as c:
        assert c.post("/admin/model", json={"run": "runB"}).status_code == 401
        assert c.post("/admin/model", json={"run": "runB"},
                      headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.post("/admin/model", json={"run": "missing"}, headers=AUTH)
        assert r.status_code == 422 and "missing" in r.json()["message"]
        r = c.post("/admin/model", json={"run": "runB", "which": "worst"}, headers=AUTH)
        assert r.status_code == 422 and r.json()["message"].startswith("which:")
        assert c.post("/recommend", json=BODY).json()["version"] == 1
        assert c.get("/admin/model", headers=AUTH).json()["version"] == 1
        assert 'dinrec_model_swaps_total{outcome="refused"} 1.0' in c.get("/metrics").text
        r = c.post("/admin/model", json={"run": "runB", "which": "last"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["served"]["which"] == "last"
        assert r.json()["previous"]["run"] == "runA"
        out = c.post("/recommend", json=BODY).json()
        assert out["version"] == 2 and whole_model(out, expected(rankers["runB"]))
    off = create_app(ServeConfig(run="runA"), ranker=rankers["runA"])
    with TestClient(off) as c:
        assert c.post("/admin/model", json={"run": "runB"}, headers=AUTH).status_code == 404


def test_swap_to_another_schema_is_refused(rankers, tmp_path):
    """A run whose requests differ (another schema) cannot replace the served one."""
    from dinrec.data.schema import Schema

    other = Ranker.__new__(Ranker)
    other.__dict__.update(rankers["runB"].__dict__)
    other.schema = Schema.default()
    app = create_app(ServeConfig(run="runA", admin_token=TOKEN), ranker=rankers["runA"],
                     loader=lambda spec: other)
    with TestClient(app) as c:
        r = c.post("/admin/model", json={"run": "default-schema"}, headers=AUTH)
        assert r.status_code == 409 and "schema" in r.json()["message"]
        assert c.post("/recommend", json=BODY).json()["version"] == 1


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
