"""Serving trained run folders: Ranker(run), `dinrec export`, `dinrec serve --onnx`, and
`dinrec serve --workers 2` sharing swaps and metrics across its worker processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from fastapi.testclient import TestClient  # noqa: E402

from dinrec.cli import main  # noqa: E402
from dinrec.serve.app import Limits, ServeConfig  # noqa: E402
from dinrec.serve.ranker import Ranker  # noqa: E402

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
    items = ranker.sample_candidates(60, seed=3)
    return {"user": "u1", "sequences": {ranker.schema.main_sequence.name: items[:20]},
            "candidates": items[20:], "k": 38}


def expected(run: Path, body: dict) -> dict[str, float]:
    rec = Ranker(run).recommend(body["user"], body["candidates"], body["sequences"], k=body["k"])
    return {s.item: s.score for s in rec.ranked}


def whole_model(answer: dict, want: dict[str, float]) -> bool:
    got = {r["item"]: r["score"] for r in answer["ranked"]}
    return got.keys() == want.keys() and all(abs(got[i] - want[i]) < 1e-6 for i in got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinrec", "serve", *args, "--log-level", "warning", "--no-access-log"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    t_end = time.time() + 120
    while time.time() < t_end:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise AssertionError("server did not start")


def test_cli_export_and_serve_onnx(tiny_din_run, tmp_path, body, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_din_run), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and "max |exported - PyTorch|" in capsys.readouterr().out
    assert main(["export", str(tiny_din_run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([str(tiny_din_run), "--port", str(port), "--onnx", str(out)], url)
    try:
        meta = httpx.get(url + "/metadata").json()
        assert meta["backend"] == "onnx" and not meta["has_attention"]
        got = httpx.post(url + "/recommend", json=body, timeout=30).json()
        assert whole_model(got, expected(tiny_din_run, body)) or all(
            abs(r["score"] - expected(tiny_din_run, body)[r["item"]]) < 1e-5 for r in got["ranked"])
        assert httpx.post(url + "/recommend", content=b"{bad", timeout=10).status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_workers_share_swaps_and_metrics(tiny_din_run, run_b, body):
    """`dinrec serve --workers 2`: a swap sent to one worker reaches both; /metrics sums both."""
    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([str(tiny_din_run), "--port", str(port), "--workers", "2", "--admin-token", TOKEN], url)
    try:
        want_b = expected(run_b, body)
        # New connections: the kernel spreads them over both workers.
        assert all(httpx.post(url + "/recommend", json=body, timeout=30).status_code == 200
                   for _ in range(30))
        r = httpx.post(url + "/admin/model", json={"run": str(run_b)}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        time.sleep(4)  # both workers poll the shared state every 0.5 s and load run B
        for _ in range(30):
            a = httpx.post(url + "/recommend", json=body, timeout=30).json()
            assert a["version"] == 2 and whole_model(a, want_b)
        text = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ok = sum(s.value for s in fams["dinrec_requests"].samples
             if s.name == "dinrec_requests_total" and s.labels["route"] == "/recommend")
    assert ok == 60  # both workers' requests, whichever worker answered the scrape
    versions = {s.labels["pid"]: s.value for s in fams["dinrec_model_version"].samples}
    assert len(versions) == 2 and set(versions.values()) == {2.0}
    scored = sum(s.value for s in fams["dinrec_candidates_scored"].samples if s.name.endswith("_total"))
    assert np.isclose(scored, 60 * len(body["candidates"]))


def test_worker_factory_reads_config_from_env(tiny_din_run, monkeypatch, body):
    """What each of `dinrec serve --workers N`'s processes runs."""
    import torch

    from dinrec.serve.app import ENV_CONFIG, app_from_env

    cfg = ServeConfig(run=str(tiny_din_run), threads=1, limits=Limits(max_body_bytes=50_000))
    monkeypatch.setenv(ENV_CONFIG, cfg.to_json())
    assert ServeConfig.from_json(cfg.to_json()) == cfg
    threads = torch.get_num_threads()
    try:  # create_app sets torch's (process-wide) thread count to cfg.threads
        with TestClient(app_from_env()) as c:
            assert c.get("/metadata").json()["limits"]["max_body_bytes"] == 50_000
            assert c.post("/recommend", json=body).status_code == 200
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
