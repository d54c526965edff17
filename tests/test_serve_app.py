"""HTTP service: routes, limits, bad input (4xx, never 5xx, service keeps answering), schemathesis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from dinrec.serve.app import Limits, ServeConfig, create_app  # noqa: E402
from dinrec.serve.ranker import Ranker  # noqa: E402

LIMITS = Limits(max_candidates=50, max_history=40, max_rows=20, max_explain=5,
                max_token_chars=32, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def ranker(tiny_din_run) -> Ranker:
    return Ranker(tiny_din_run)


@pytest.fixture(scope="module")
def app(tiny_din_run, ranker):
    return create_app(ServeConfig(run=str(tiny_din_run), limits=LIMITS), ranker=ranker)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def good(ranker) -> dict:
    items = ranker.index["item"].tokens[2:40]
    return {"user": ranker.index["user"].tokens[2], "history": items[:10], "candidates": items[10:30],
            "k": 5, "explain": 2}


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
def test_healthz_and_metadata(client, ranker, tiny_din_run):
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["model"] == "din" and meta["backend"] == "torch" and meta["has_attention"]
    assert meta["vocab_sizes"] == ranker.vocab_sizes and meta["max_len"] == ranker.max_len
    assert meta["limits"]["max_candidates"] == 50 and meta["config"]["model"]["name"] == "din"
    assert meta["dinrec_version"]
    schema = client.get("/openapi.json").json()
    assert {"/score", "/recommend", "/healthz", "/metadata", "/metrics", "/admin/model"} <= set(schema["paths"])
    assert meta["served"]["version"] == 1 and meta["served"]["run"] == str(tiny_din_run)


def test_recommend_matches_ranker(client, ranker, good):
    body = {**good, "candidates": [*good["candidates"], "nope"], "user": "who"}
    out = client.post("/recommend", json=body).json()
    rec = ranker.rank("who", good["history"], body["candidates"], k=5, explain=2)
    assert [r["item"] for r in out["ranked"]] == [s.item for s in rec.ranked]
    assert [r["score"] for r in out["ranked"]] == pytest.approx([s.score for s in rec.ranked], abs=1e-6)
    assert out["unknown"] == {"user": ["who"], "item": ["nope"]}
    assert all(len(r["explanation"]) == 2 for r in out["ranked"])
    e = out["ranked"][0]["explanation"][0]
    assert good["history"][e["position"]] == e["item"] and 0 < e["weight"] <= 1


def test_score_rows(client, ranker, good):
    rows = [{"user": good["user"], "history": good["history"], "item": c} for c in good["candidates"][:4]]
    rows.append({"user": "u?", "item": "i?"})
    out = client.post("/score", json={"rows": rows}).json()
    want = ranker.score([(r["user"], r.get("history", []), r["item"]) for r in rows])
    assert out["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    assert out["unknown"] == {"user": ["u?"], "item": ["i?"]}


@pytest.mark.parametrize("path, body, field", [
    ("/recommend", {"user": 5, "candidates": ["a"]}, "user"),
    ("/recommend", {"user": "u", "candidates": [1, 2]}, "candidates.0"),
    ("/recommend", {"user": "u", "candidates": []}, "candidates"),
    ("/recommend", {"user": "u", "candidates": ["a"] * 51}, "candidates"),
    ("/recommend", {"user": "u", "history": ["h"] * 41, "candidates": ["a"]}, "history"),
    ("/recommend", {"user": "u", "candidates": ["a"], "k": -1}, "k"),
    ("/recommend", {"user": "u", "candidates": ["a"], "k": 10**30}, "k"),
    ("/recommend", {"user": "u", "candidates": ["a"], "k": "3"}, "k"),
    ("/recommend", {"user": "u", "candidates": ["a"], "explain": 6}, "explain"),
    ("/recommend", {"user": "", "candidates": ["a"]}, "user"),
    ("/recommend", {"user": "u" * 33, "candidates": ["a"]}, "user"),
    ("/recommend", {"user": "u", "candidates": ["a"], "extra": 1}, "extra"),
    ("/recommend", {"candidates": ["a"]}, "user"),
    ("/score", {"rows": []}, "rows"),
    ("/score", {"rows": [{"user": "u", "item": 7}]}, "rows.0.item"),
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
    ("ids of the wrong type", b'{"user": 1, "history": [2, 3], "candidates": [4]}', {}),
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


def test_cli_serve_onnx(tiny_din_run, tmp_path, good):
    """`dinrec serve RUN --onnx PATH` in a subprocess, on a free loopback port."""
    from dinrec.serve.export import export_run

    onnx = export_run(tiny_din_run, "onnx", tmp_path / "m.onnx", exporter="legacy", verify=False).path
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinrec", "serve", str(tiny_din_run), "--port", str(port), "--onnx",
         str(onnx), "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.time() + 30
        while time.time() < t_end:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        meta = httpx.get(url + "/metadata").json()
        assert meta["backend"] == "onnx" and not meta["has_attention"]
        out = httpx.post(url + "/recommend", json=good, timeout=10).json()
        assert len(out["ranked"]) == 5 and all(r["explanation"] == [] for r in out["ranked"])
        assert httpx.post(url + "/recommend", content=b"{bad", timeout=10).status_code == 422
        assert httpx.get(url + "/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_worker_factory_reads_config_from_env(tiny_din_run, monkeypatch, good):
    """What each of `dinrec serve --workers N`'s processes runs."""
    from dinrec.serve.app import ENV_CONFIG, app_from_env

    cfg = ServeConfig(run=str(tiny_din_run), threads=1, limits=LIMITS)
    monkeypatch.setenv(ENV_CONFIG, cfg.to_json())
    assert ServeConfig.from_json(cfg.to_json()) == cfg
    import torch

    threads = torch.get_num_threads()
    try:  # create_app sets torch's (process-wide) thread count to cfg.threads
        with TestClient(app_from_env()) as c:
            assert c.get("/metadata").json()["limits"]["max_body_bytes"] == LIMITS.max_body_bytes
            assert c.post("/recommend", json=good).status_code == 200
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
