"""Prometheus metrics and structured (JSON) access logs of the HTTP service.

:class:`Metrics` holds the service's metrics (``prometheus-client``):

* ``dinrec_requests_total{route, method, status}``: requests answered;
* ``dinrec_request_seconds{route}``: latency histogram, first byte in to last byte out;
* ``dinrec_candidates_scored_total{route}``: candidates (``/recommend``) and rows
  (``/score``) scored;
* ``dinrec_model_info{model, version, run, backend}``: 1 for the model a worker serves
  (0 for the one it served before a swap), ``dinrec_model_version``: its version number;
  ``dinrec_model_swaps_total{outcome}``: swaps done or refused.

Routes are labelled by their path when it is one of the app's routes and ``other``
otherwise (no label per URL someone made up).

**Several worker processes** (``dinrec serve --workers N``): a scrape reaches one
worker, so each worker's numbers must be visible to all. ``dinrec serve`` then sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh folder before the workers start (prometheus-client's
multiprocess mode: every worker writes its values to memory-mapped files there) and
``/metrics`` sums the files of all workers (counters and histograms summed; the model
gauges per live worker with a ``pid`` label). With one process the metrics live in memory.

:class:`MetricsMiddleware` (pure ASGI) records every request and writes one JSON line per
request to the ``dinrec.serve.access`` logger (:class:`JsonFormatter`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ACCESS_LOGGER = "dinrec.serve.access"
#: Latency buckets (seconds): fine below 50 ms, where the service's objective lives.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

access_log = logging.getLogger(ACCESS_LOGGER)


def multiprocess_dir() -> str | None:
    """The multiprocess folder when this process runs in prometheus-client's multiprocess mode."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The service's metrics, in memory (one process) or in multiprocess mode (see module doc)."""

    def __init__(self) -> None:
        self.multiproc = multiprocess_dir()
        # In multiprocess mode the values live in files; registering them here too would
        # report this worker's share twice.
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiproc else self.registry
        self.requests = Counter("dinrec_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=reg)
        self.latency = Histogram("dinrec_request_seconds", "request latency in the service",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.candidates = Counter("dinrec_candidates_scored", "candidates or rows scored",
                                  ["route"], registry=reg)
        self.model_info = Gauge("dinrec_model_info", "1 for the model being served",
                                ["model", "version", "run", "backend"], registry=reg,
                                multiprocess_mode="liveall")
        self.model_version = Gauge("dinrec_model_version", "version number of the served model",
                                   registry=reg, multiprocess_mode="liveall")
        self.swaps = Counter("dinrec_model_swaps", "model swaps by outcome", ["outcome"], registry=reg)
        self._info_labels: tuple[str, ...] | None = None

    def set_model(self, model: str, version: int, run: str, backend: str) -> None:
        """The model now served: its info gauge to 1, the previous one's to 0."""
        labels = (model, str(version), run, backend)
        if self._info_labels is not None and self._info_labels != labels:
            self.model_info.labels(*self._info_labels).set(0)
        self.model_info.labels(*labels).set(1)
        self.model_version.set(version)
        self._info_labels = labels

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every worker's metrics, and its content type."""
        if self.multiproc:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry, path=self.multiproc)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def worker_exit(self) -> None:
        """Drop this worker's live gauges (multiprocess mode); call when the worker stops."""
        if self.multiproc:
            prom_multiprocess.mark_process_dead(os.getpid(), self.multiproc)


class MetricsMiddleware:
    """Counts, times and logs every HTTP request (pure ASGI: no extra task per request).

    ``routes``: the paths labelled by name; anything else is ``other``. ``version``: a
    callable giving the model version now served, logged with each request.
    """

    def __init__(self, app: Any, metrics: Metrics, routes: set[str], version: Any = None,
                 log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.version = version
        self.log_requests = log_requests

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # if the app raises before it starts a response
        size = 0

        async def send_wrapper(message: dict) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - t0
            path = scope.get("path", "")
            route = path if path in self.routes else "other"
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if self.log_requests and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info("request", extra={"access": {
                    "method": method, "path": path, "status": status,
                    "duration_ms": round(seconds * 1e3, 3), "bytes": size,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "model_version": self.version() if self.version else None,
                    "pid": os.getpid(),
                }})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``access``
    fields (for access logs) or the formatted exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_config(level: str = "info", access: bool = True) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn (applied in every worker): JSON lines on
    stderr for uvicorn's own logs and for dinrec's access log (``access=False``: off)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "dinrec.serve.metrics.JsonFormatter"}},
        "handlers": {"json": handler},
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
            "dinrec": {"handlers": ["json"], "level": level.upper(), "propagate": False},
            ACCESS_LOGGER: {"handlers": ["json"], "level": "INFO" if access else "CRITICAL",
                            "propagate": False},
        },
    }
