"""/metrics (Prometheus text, parsed with prometheus_client's parser) and JSON access logs."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dinrec.serve.app import ServeConfig, create_app  # noqa: E402
from dinrec.serve.metrics import ACCESS_LOGGER, JsonFormatter, log_config  # noqa: E402
from dinrec.serve.ranker import Ranker  # noqa: E402
from serve_inputs import rich_ranker, rich_store  # noqa: E402


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return rich_store(tmp_path_factory.mktemp("rich") / "store")


@pytest.fixture(scope="module")
def ranker(store_path) -> Ranker:
    return rich_ranker(store_path)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_latency_candidates_and_model(store_path, ranker):
    app = create_app(ServeConfig(run=str(store_path)), ranker=ranker)
    items = [f"i{i}" for i in range(40)]
    body = {"user": "u", "sequences": {"hist": items[:5]}, "candidates": items[5:25], "k": 3}
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/recommend", json=body).status_code == 200
        assert c.post("/recommend", json={"user": 1}).status_code == 422
        assert c.post("/score", json={"rows": [{"user": "u", "item": i} for i in items[:4]]}).status_code == 200
        assert c.get("/no/such/path").status_code == 404
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert value(m, "dinrec_requests_total", route="/recommend", method="POST", status="200") == 3
    assert value(m, "dinrec_requests_total", route="/recommend", method="POST", status="422") == 1
    assert value(m, "dinrec_requests_total", route="/score", method="POST", status="200") == 1
    assert value(m, "dinrec_requests_total", route="other", method="GET", status="404") == 1
    assert value(m, "dinrec_request_seconds_count", route="/recommend") == 4
    assert value(m, "dinrec_request_seconds_bucket", route="/recommend", le="+Inf") == 4
    assert 0 < value(m, "dinrec_request_seconds_sum", route="/recommend") < 60
    assert value(m, "dinrec_candidates_scored_total", route="/recommend") == 3 * 20
    assert value(m, "dinrec_candidates_scored_total", route="/score") == 4
    assert value(m, "dinrec_model_info", model="din", version="1", run=str(store_path),
                 backend="torch") == 1
    assert value(m, "dinrec_model_version") == 1


def test_access_log_is_one_json_line_per_request(store_path, ranker, caplog):
    app = create_app(ServeConfig(run=str(store_path)), ranker=ranker)
    items = [f"i{i}" for i in range(10)]
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER), TestClient(app) as c:
        c.post("/recommend", json={"user": "u", "sequences": {"hist": items[:3]}, "candidates": items[3:]})
        c.post("/recommend", json={"user": 1, "candidates": ["a"]})
    records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    assert [(x["path"], x["status"], x["method"]) for x in lines] == [
        ("/recommend", 200, "POST"), ("/recommend", 422, "POST")]
    assert all(x["duration_ms"] > 0 and x["bytes"] > 0 and x["model_version"] == 1 for x in lines)
    assert lines[0]["level"] == "info" and lines[0]["ts"].endswith("Z")
    # Off: nothing logged.
    quiet = create_app(ServeConfig(run=str(store_path), access_log=False), ranker=ranker)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER), TestClient(quiet) as c:
        c.get("/healthz")
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]


def test_log_config_applies():
    import logging.config

    logging.config.dictConfig(log_config("warning", access=True))
    try:
        assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
        assert isinstance(logging.getLogger(ACCESS_LOGGER).handlers[0].formatter, JsonFormatter)
        logging.config.dictConfig(log_config("warning", access=False))
        assert not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
    finally:
        logging.getLogger(ACCESS_LOGGER).handlers.clear()
        logging.getLogger("dinrec").handlers.clear()
        for name in ("dinrec", ACCESS_LOGGER, "uvicorn", "uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).propagate = True
            logging.getLogger(name).setLevel(logging.NOTSET)
            logging.getLogger(name).handlers.clear()
