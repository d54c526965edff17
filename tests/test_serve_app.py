"""HTTP service over a rich schema: generated request models and OpenAPI, routes, 422 paths for
every feature kind, limits, bad input (4xx, never 5xx, service keeps answering), schemathesis."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch

from serve_inputs import rich_store

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from dinrec.data.store import SampleStore  # noqa: E402
from dinrec.models import create_model  # noqa: E402
from dinrec.serve.app import Limits, ServeConfig, create_app  # noqa: E402
from dinrec.serve.features import RequestEncoder, find_serving_folder  # noqa: E402
from dinrec.serve.ranker import Ranker  # noqa: E402

LIMITS = Limits(max_candidates=50, max_history=40, max_rows=20, max_explain=5,
                max_token_chars=32, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> SampleStore:
    return SampleStore(rich_store(tmp_path_factory.mktemp("rich") / "store"))


@pytest.fixture(scope="module")
def ranker(store) -> Ranker:
    torch.manual_seed(0)
    model = create_model("din", store.schema, store.table_sizes())
    encoder = RequestEncoder.load(find_serving_folder(store.path, None))
    return Ranker.from_parts(model, encoder, {"model": {"name": "din", "config": {}}})


@pytest.fixture(scope="module")
def app(store, ranker):
    return create_app(ServeConfig(run=str(store.path), limits=LIMITS), ranker=ranker)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def good() -> dict:
    return {
        "user": {"user": "u3", "gender": "F", "age": 33},
        "context": {"hour": "9", "platform": "android"},
        "sequences": {"hist": ["i1", {"item": "i4", "rating": 5, "time_gap": 400}, "i9"],
                      "liked": [{"item": "i2", "behaviour": "like"}]},
        "candidates": [f"i{i}" for i in range(10, 30)] + [
            {"item": "new-1", "cat": "c2", "genres": ["Drama", "Kids"], "price": 12.5}],
        "k": 5, "explain": 2,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_url(app):
    """The app served by uvicorn in a thread on a free loopback port."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t_end = time.time() + 20
    while not server.started and time.time() < t_end:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


# --------------------------------------------------------------------------- routes
def test_healthz_metadata_and_generated_openapi(client, ranker, store):
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["model"] == "din" and meta["backend"] == "torch" and meta["has_attention"]
    assert meta["max_len"] == 30 and meta["limits"]["max_candidates"] == 50
    assert meta["schema"] == store.schema.to_dict() and meta["served"]["version"] == 1
    api = client.get("/openapi.json").json()
    assert {"/score", "/recommend", "/healthz", "/metadata", "/metrics", "/admin/model"} <= set(api["paths"])
    comp = api["components"]["schemas"]
    assert set(comp["User"]["properties"]) == {"user", "gender", "age"} and comp["User"]["required"] == ["user"]
    assert set(comp["Item"]["properties"]) == {"item", "cat", "genres", "price"}
    assert set(comp["Context"]["properties"]) == {"hour", "platform"}
    assert set(comp["Sequences"]["properties"]) == {"hist", "liked"}
    assert set(comp["Event_hist"]["properties"]) == {"item", "cat", "genres", "price", "rating", "time_gap"}
    assert comp["Item"]["additionalProperties"] is False
    genres = comp["Item"]["properties"]["genres"]["anyOf"][0]
    assert genres["type"] == "array" and genres["items"]["type"] == "string"


def test_recommend_matches_ranker(client, ranker, good):
    out = client.post("/recommend", json=good).json()
    rec = ranker.recommend(good["user"], good["candidates"], good["sequences"], good["context"], k=5, explain=2)
    assert [r["item"] for r in out["ranked"]] == [s.item for s in rec.ranked]
    assert [r["score"] for r in out["ranked"]] == pytest.approx([s.score for s in rec.ranked], abs=1e-6)
    assert out["unknown"] == {"item": ["new-1"]} and out["version"] == 1
    for r in out["ranked"]:
        assert {e["sequence"] for e in r["explanation"]} == {"hist", "liked"}
        assert set(r["attributes"]) == {"cat", "genres", "price"}
        for e in r["explanation"]:
            events = good["sequences"][e["sequence"]]
            given = events[e["position"]]
            assert e["event"]["item"] == (given if isinstance(given, str) else given["item"])
            assert 0 < e["weight"] <= 1 and "cat" in e["event"]
    # shorthand user id == the user's table features
    short = client.post("/recommend", json={**good, "user": "u3"}).json()
    assert [r["item"] for r in short["ranked"]]


def test_score_rows(client, ranker, good):
    rows = [{"user": good["user"], "context": good["context"], "sequences": good["sequences"], "item": c}
            for c in good["candidates"][:4]]
    rows.append({"user": "u?", "item": {"item": "i?", "price": 3.0}})
    out = client.post("/score", json={"rows": rows}).json()
    want = ranker.score([{"user": r["user"], "context": r.get("context"), "sequences": r.get("sequences"),
                          "item": r["item"]} for r in rows])
    assert out["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    assert out["unknown"] == {"user": ["u?"], "item": ["i?"]}


BASE = {"user": "u1", "candidates": ["i1"]}


@pytest.mark.parametrize("path, body, field", [
    # categorical (user / item / context / event), multi, numeric, bucketed numeric, hashed
    ("/recommend", {**BASE, "user": 5}, "user"),
    ("/recommend", {**BASE, "user": {"gender": "F"}}, "user.user"),
    ("/recommend", {**BASE, "user": {"user": "u", "gender": 1}}, "user.gender"),
    ("/recommend", {**BASE, "user": {"user": "u", "age": "old"}}, "user.age"),
    ("/recommend", {**BASE, "user": {"user": "u", "shoe": "9"}}, "user.shoe"),
    ("/recommend", {**BASE, "candidates": [1, 2]}, "candidates.0"),
    ("/recommend", {**BASE, "candidates": [{"item": "i", "cat": 3}]}, "candidates.0.cat"),
    ("/recommend", {**BASE, "candidates": ["i", {"item": "i", "genres": "Drama"}]}, "candidates.1.genres"),
    ("/recommend", {**BASE, "candidates": [{"item": "i", "genres": ["a", 7]}]}, "candidates.0.genres.1"),
    ("/recommend", {**BASE, "candidates": [{"item": "i", "price": "cheap"}]}, "candidates.0.price"),
    ("/recommend", {**BASE, "candidates": [{"item": "i", "colour": "red"}]}, "candidates.0.colour"),
    ("/recommend", {**BASE, "candidates": [{"cat": "c1"}]}, "candidates.0.item"),
    ("/recommend", {**BASE, "context": {"hour": 9}}, "context.hour"),
    ("/recommend", {**BASE, "context": {"platform": ["ios"]}}, "context.platform"),
    ("/recommend", {**BASE, "context": {"weather": "rain"}}, "context.weather"),
    ("/recommend", {**BASE, "sequences": {"hist": [{"item": "i", "rating": "good"}]}}, "sequences.hist.0.rating"),
    ("/recommend", {**BASE, "sequences": {"hist": ["i", {"item": "i", "time_gap": "1h"}]}}, "sequences.hist.1.time_gap"),
    ("/recommend", {**BASE, "sequences": {"liked": [{"item": "i", "behaviour": 2}]}}, "sequences.liked.0.behaviour"),
    ("/recommend", {**BASE, "sequences": {"liked": [{"item": "i", "mood": "x"}]}}, "sequences.liked.0.mood"),
    ("/recommend", {**BASE, "sequences": {"cart": ["i"]}}, "sequences.cart"),
    ("/recommend", {**BASE, "sequences": {"hist": ["h"] * 41}}, "sequences.hist"),
    ("/recommend", {**BASE, "candidates": []}, "candidates"),
    ("/recommend", {**BASE, "candidates": ["a"] * 51}, "candidates"),
    ("/recommend", {**BASE, "k": -1}, "k"),
    ("/recommend", {**BASE, "k": "3"}, "k"),
    ("/recommend", {**BASE, "explain": 6}, "explain"),
    ("/recommend", {**BASE, "user": ""}, "user"),
    ("/recommend", {**BASE, "user": "u" * 33}, "user"),
    ("/recommend", {**BASE, "history": ["i1"]}, "history"),
    ("/recommend", {"candidates": ["a"]}, "user"),
    ("/score", {"rows": []}, "rows"),
    ("/score", {"rows": [{"user": "u", "item": 7}]}, "rows.0.item"),
    ("/score", {"rows": [{"user": "u", "item": {"item": "i", "price": [1]}}]}, "rows.0.item.price"),
    ("/score", {"rows": [{"user": "u", "item": "i"}] * 21}, "rows"),
])
def test_422_names_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert msg.startswith(f"{field}:") or f"; {field}:" in msg, msg


def test_413_oversize_body(client, good):
    r = client.post("/recommend", content=b" " * 20_001, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["message"]
    assert client.post("/recommend", json=good).status_code == 200


# --------------------------------------------------------------------------- schemathesis
# Driven by hand (schemathesis.pytest.from_fixture does not work with pytest 9): every
# operation of the published schema, valid and invalid inputs, a bounded number each.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_server_errors(app, mode):
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error] + ([response_schema_conformance] if mode == "positive" else [])
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/score", "/recommend", "/healthz", "/metadata",
                                              "/metrics", "/admin/model"}
    for op in operations:
        if mode == "negative" and op.method.upper() == "GET":
            continue  # no inputs to get wrong

        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=checks)

        check()


# --------------------------------------------------------------------------- live server
BAD = [
    ("malformed JSON", b'{"user": ', {}),
    ("invalid UTF-8", b'{"user": "\xff\xfe", "candidates": ["a"]}', {}),
    ("JSON array", b"[1, 2]", {}),
    ("JSON null", b"null", {}),
    ("NaN k", b'{"user": "u", "candidates": ["a"], "k": NaN}', {}),
    ("deep nesting", b"[" * 15_000, {}),
    ("ids of the wrong type", b'{"user": 1, "sequences": {"hist": [2, 3]}, "candidates": [4]}', {}),
    ("empty candidates", b'{"user": "u", "candidates": []}', {}),
    ("negative k", b'{"user": "u", "candidates": ["a"], "k": -3}', {}),
    ("huge k", b'{"user": "u", "candidates": ["a"], "k": 1e400}', {}),
    ("text/plain", b'{"user": "u", "candidates": ["a"]}', {"content-type": "text/plain"}),
    ("oversize body", b"[" + b"1," * 20_000 + b"1]", {}),
    ("oversize chunked body", None, {}),
    ("lone surrogate token", b'{"user": "u", "candidates": ["\\ud800"]}', {}),
]


@pytest.mark.parametrize("name, body, headers", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_then_service_still_answers(live_url, good, name, body, headers):
    with httpx.Client(base_url=live_url, timeout=10) as c:
        if body is None:  # no Content-Length: the body comes in chunks
            r = c.post("/recommend", content=iter([b"[" + b"1," * 5000] * 3),
                       headers={"content-type": "application/json"})
        else:
            r = c.post("/recommend", content=body,
                       headers={"content-type": "application/json", **headers})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert "message" in r.json() or "detail" in r.json()
        assert c.post("/recommend", json=good).status_code == 200
        assert c.get("/healthz").status_code == 200
