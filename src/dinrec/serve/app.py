"""The HTTP service: FastAPI routes over a :class:`~dinrec.serve.ranker.Ranker`.

Routes (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

* ``POST /score``     rows of (user, history, item) tokens -> one probability per row
* ``POST /recommend`` user, history, candidates, k, explain -> top-k with scores and,
  on request, the attention explanation
* ``GET /healthz``    liveness
* ``GET /metadata``   model, its version, run config, vocabulary sizes, dinrec version, limits
* ``GET /metrics``    Prometheus metrics (:mod:`dinrec.serve.metrics`)
* ``POST /admin/model`` (with ``Authorization: Bearer <admin token>``): serve another run
  or checkpoint, swapped live (:mod:`dinrec.serve.swap`); ``GET`` says what is served.

Requests are pydantic models with limits (:class:`Limits`); a bad request is a 4xx
with a message that names the field, never a 5xx: 422 for malformed JSON, wrong types
and values out of range, 413 for a body over ``max_body_bytes`` (checked by an ASGI
middleware before the body is read). Tokens are strings; a number where a token is
expected is a 422, not coerced.

Each request reads the served model (``slot.current``) once and answers with it; its
response carries that model's ``version``.

Scoring runs inline in ``async`` handlers: the model is CPU-bound and each worker uses
one torch thread, so a thread-pool hop would only add latency. Scale with uvicorn
workers (``dinrec serve --workers N``), one per core.
"""


import asyncio
import contextlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from dinrec import __version__
from dinrec.errors import DinrecError
from dinrec.serve.metrics import MULTIPROC_ENV, Metrics, MetricsMiddleware, log_config
from dinrec.serve.ranker import Ranker
from dinrec.serve.requests import ID_TAG, OBJECT_TAG, plain, request_models
from dinrec.serve.swap import ModelSlot, ModelSpec, Served, SharedState, SwapError

log = logging.getLogger(__name__)

ENV_CONFIG = "DINREC_SERVE_CONFIG"  # JSON ServeConfig handed to uvicorn worker processes
ENV_ADMIN_TOKEN = "DINREC_ADMIN_TOKEN"  # the admin token when --admin-token is not given
WORKER_HEALTHCHECK_S = 120  # uvicorn's worker ping timeout (its default, 5 s, is shorter than a load)


@dataclass
class Limits:
    """Request limits; over them a request gets 422 (413 for the body size)."""

    max_candidates: int = 1000  # per /recommend request (also bounds k)
    max_history: int = 1000  # tokens per history (the model uses the run's max_len most recent)
    max_rows: int = 1000  # rows per /score request
    max_explain: int = 20  # history items explained per ranked item
    max_token_chars: int = 256  # characters per token
    max_body_bytes: int = 1 << 20  # request body


@dataclass
class ServeConfig:
    run: str  # run folder
    onnx: str | None = None  # score with this ONNX export instead of the PyTorch model
    threads: int = 1  # torch / ONNX Runtime threads per worker
    precision: str = "float32"  # or "bfloat16": the attention's products (see Ranker)
    limits: Limits = field(default_factory=Limits)
    admin_token: str | None = None  # enables /admin/model (None: $DINREC_ADMIN_TOKEN, else off)
    state_dir: str | None = None  # the workers' shared swap state (set by `serve` for N > 1)
    poll_s: float = 0.5  # how often a worker checks the shared swap state
    access_log: bool = True  # one JSON line per request on the dinrec.serve.access logger

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        d = json.loads(text)
        return cls(**{**d, "limits": Limits(**d.get("limits", {}))})


# --------------------------------------------------------------------------- schemas
class ExplanationOut(BaseModel):
    sequence: str = Field(description="the behaviour sequence")
    position: int = Field(description="0 = oldest event of the sequence used")
    weight: float = Field(description="attention weight of this event for the candidate")
    event: dict[str, Any] = Field(description="the event's features: given inline, else the item table's")


class ScoredOut(BaseModel):
    item: str
    score: float = Field(description="click probability")
    attributes: dict[str, Any] = Field(description="the item's features (inline, else the item table's)")
    explanation: list[ExplanationOut]


class RecommendResponse(BaseModel):
    model: str
    version: int = Field(description="version of the served model that answered (moves on each swap)")
    user: str
    ranked: list[ScoredOut]
    unknown: dict[str, list[str]] = Field(
        description="tokens not in the run's vocabularies, by feature: scored as out-of-vocabulary"
    )


class ScoreResponse(BaseModel):
    model: str
    version: int = Field(description="version of the served model that answered")
    probabilities: list[float]
    unknown: dict[str, list[str]]


class HealthResponse(BaseModel):
    status: str


class ServedModel(BaseModel):
    version: int
    model: str
    backend: str
    run: str
    which: str
    onnx: str | None
    loaded_at: float = Field(description="Unix time the model was loaded")


class MetadataResponse(BaseModel):
    model: str
    served: ServedModel
    dinrec_version: str
    backend: str
    precision: str
    has_attention: bool
    max_len: int
    vocab_sizes: dict[str, int]
    limits: dict[str, int]
    config: dict[str, Any]
    feature_schema: dict[str, Any] = Field(alias="schema",
                                           description="the run's feature schema (what requests carry)")


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    message: str
    detail: list[ErrorItem] = []


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: StrictStr = Field(min_length=1, description="run folder, as seen by the server")
    which: Literal["best", "last"] = "best"
    onnx: StrictStr | None = Field(None, description="serve this ONNX export of the run")


class SwapResponse(BaseModel):
    served: ServedModel
    previous: ServedModel


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "request body too large"},
    422: {"model": ErrorResponse, "description": "invalid request; the message names the field"},
}


# --------------------------------------------------------------------------- body limit
class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, before the app reads them (pure ASGI)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header")
                return
            if n > self.max_bytes:
                await _send_error(send, 413, f"request body of {n} bytes is over the limit of {self.max_bytes}")
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read the body up to the limit, then replay it.
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _send_error(send, 413, f"request body is over the limit of {self.max_bytes} bytes")
                return
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"message": message, "detail": []}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- app
def _json(payload: Any, status: int = 200) -> Response:
    # ensure_ascii: any string (lone surrogates included) encodes safely.
    return Response(json.dumps(payload).encode(), status_code=status, media_type="application/json")


def _sequences(seqs: BaseModel) -> dict[str, list[Any]]:
    return {name: [plain(e) for e in events] for name, events in seqs.__dict__.items()}


def _context(ctx: BaseModel) -> dict[str, Any]:
    return {k: v for k, v in ctx.__dict__.items() if v is not None}


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in (ID_TAG, OBJECT_TAG)]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def _loader(config: ServeConfig):
    def load(spec: ModelSpec) -> Ranker:
        return Ranker(spec.run, which=spec.which, onnx=spec.onnx, threads=config.threads,
                      precision=config.precision)

    return load


def _initial(config: ServeConfig, ranker: Ranker | None, state: SharedState | None) -> Served:
    """The first served model: ``ranker``, else the shared state's (a restarted worker
    serves what the others serve), else the configured run."""
    spec, version = ModelSpec(config.run, "best", config.onnx), 1
    now = state.read() if state is not None else None
    if now is not None:
        spec, version = now
    if ranker is None:
        import torch

        torch.set_num_threads(max(1, config.threads))
        ranker = _loader(config)(spec)
    return Served(ranker, spec, version, time.time())


def _admin_token(config: ServeConfig) -> str | None:
    return config.admin_token or os.environ.get(ENV_ADMIN_TOKEN) or None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())
                     if p not in (ID_TAG, OBJECT_TAG)],
             "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        message = "; ".join(
            f"body: malformed JSON (at character {d['loc'][-1]})" if d["type"] == "json_invalid"
            else f"{_field(d['loc'])}: {d['msg']}"
            for d in detail[:5]
        ) or "invalid request"
        return JSONResponse({"message": message, "detail": detail}, status_code=422)

    @app.exception_handler(SwapError)
    async def _swap_error(request: Request, exc: SwapError) -> JSONResponse:
        return JSONResponse({"message": str(exc), "detail": []}, status_code=exc.status)

    @app.exception_handler(DinrecError)
    async def _dinrec_error(request: Request, exc: DinrecError) -> JSONResponse:
        return JSONResponse({"message": str(exc), "detail": []}, status_code=422)


def create_app(config: ServeConfig, ranker: Ranker | None = None,
               loader: Callable[[ModelSpec], Ranker] | None = None) -> FastAPI:
    """The FastAPI app for ``config`` (``ranker``: serve this one instead of loading the run;
    ``loader``: how a swap loads a :class:`ModelSpec`, default ``Ranker(spec.run, ...)``).

    Sets torch's thread count to ``config.threads`` (process-wide) when it loads the run.
    """
    limits = config.limits
    state = SharedState(config.state_dir) if config.state_dir else None
    metrics = Metrics()

    def on_swap(served: Served) -> None:
        metrics.swaps.labels("done").inc()
        metrics.set_model(served.ranker.model_name, served.version, served.spec.run,
                          served.ranker.backend.name)

    slot = ModelSlot(_initial(config, ranker, state), loader or _loader(config), state, on_swap=on_swap,
                     on_refused=lambda exc: metrics.swaps.labels("refused").inc())
    first = slot.current
    metrics.set_model(first.ranker.model_name, first.version, first.spec.run, first.ranker.backend.name)
    token = _admin_token(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(slot.watch(config.poll_s)) if state is not None else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            metrics.worker_exit()

    app = FastAPI(
        title="dinrec",
        version=__version__,
        description="Score and rank items with a trained DIN/DIEN run; explain with attention.",
        lifespan=lifespan,
    )
    app.state.slot = slot
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    _install_error_handlers(app)

    _info_routes(app, slot, metrics, limits)
    _scoring_routes(app, slot, metrics, request_models(first.ranker.schema, limits))
    _admin_routes(app, slot, token)
    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes,
                       version=lambda: slot.current.version, log_requests=config.access_log)
    return app


def _info_routes(app: FastAPI, slot: ModelSlot, metrics: Metrics, limits: Limits) -> None:
    """``/healthz``, ``/metadata`` (of the model served now) and ``/metrics``."""

    def metadata(served: Served) -> dict[str, Any]:
        r = served.ranker
        return {
            "model": r.model_name, "served": served.describe(), "dinrec_version": __version__,
            "backend": r.backend.name, "precision": r.precision, "has_attention": r.has_attention,
            "max_len": r.max_len, "vocab_sizes": r.vocab_sizes, "limits": asdict(limits),
            "config": r.run_config, "schema": r.schema.to_dict(),
        }

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/metadata", response_model=MetadataResponse)
    async def get_metadata() -> Response:
        return _json(metadata(slot.current))

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _scoring_routes(app: FastAPI, slot: ModelSlot, metrics: Metrics, models: dict[str, Any]) -> None:
    """``/recommend`` and ``/score`` with the request models generated from the schema."""
    RecommendRequest, ScoreRequest = models["RecommendRequest"], models["ScoreRequest"]

    @app.post("/recommend", response_model=RecommendResponse, responses=_ERRORS)
    async def recommend(req: RecommendRequest) -> Response:  # type: ignore[valid-type]
        served = slot.current  # read once: this request is answered by this model only
        rec = served.ranker.recommend(
            plain(req.user), [plain(c) for c in req.candidates], _sequences(req.sequences),
            _context(req.context), k=req.k, explain=req.explain,
        )
        metrics.candidates.labels("/recommend").inc(len(req.candidates))
        ranked = [
            {"item": s.item, "score": s.score, "attributes": s.attributes,
             "explanation": [  # plain dicts: dataclasses.asdict deep-copies, 3x slower here
                 {"sequence": e.sequence, "position": e.position, "weight": e.weight, "event": e.event}
                 for e in s.explanation
             ]}
            for s in rec.ranked
        ]
        return _json({"model": served.ranker.model_name, "version": served.version,
                      "user": rec.user, "ranked": ranked, "unknown": rec.unknown})

    @app.post("/score", response_model=ScoreResponse, responses=_ERRORS)
    async def score(req: ScoreRequest) -> Response:  # type: ignore[valid-type]
        served = slot.current
        rows = [{"user": plain(r.user), "item": plain(r.item), "context": _context(r.context),
                 "sequences": _sequences(r.sequences)} for r in req.rows]
        out = served.ranker.score(rows)
        metrics.candidates.labels("/score").inc(len(req.rows))
        return _json({"model": served.ranker.model_name, "version": served.version,
                      "probabilities": out.probabilities, "unknown": out.unknown})


def _admin_routes(app: FastAPI, slot: ModelSlot, token: str | None) -> None:
    """``/admin/model``: what is served (GET) and a live swap (POST), behind the admin token."""
    admin_errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorResponse, "description": "missing or wrong admin token"},
        404: {"model": ErrorResponse, "description": "admin routes are off (no admin token set)"},
        409: {"model": ErrorResponse, "description": "the new run takes other requests (schema)"},
        422: {"model": ErrorResponse, "description": "the run cannot be loaded"},
    }

    def check(authorization: str | None) -> None:
        if token is None:
            raise SwapError("admin routes are off: start the service with --admin-token "
                            f"or ${ENV_ADMIN_TOKEN}", status=404)
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise SwapError("admin: missing or wrong token (Authorization: Bearer <token>)", status=401)

    @app.get("/admin/model", response_model=ServedModel, responses=admin_errors)
    async def served_model(authorization: Annotated[str | None, Header()] = None) -> Response:
        check(authorization)
        return _json(slot.current.describe())

    @app.post("/admin/model", response_model=SwapResponse, responses=admin_errors)
    async def swap_model(req: SwapRequest, authorization: Annotated[str | None, Header()] = None) -> Response:
        check(authorization)
        previous = slot.current
        served = await slot.swap(ModelSpec(req.run, req.which, req.onnx))
        return _json({"served": served.describe(), "previous": previous.describe()})


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes: the config comes in ``$DINREC_SERVE_CONFIG``."""
    text = os.environ.get(ENV_CONFIG)
    if not text:
        raise DinrecError(f"${ENV_CONFIG} is not set (start the service with `dinrec serve`)")
    return create_app(ServeConfig.from_json(text))


def serve(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    """Run the service with uvicorn until interrupted (``workers`` processes).

    With several workers, a fresh folder holds the shared swap state and prometheus-client's
    multiprocess files (``$PROMETHEUS_MULTIPROC_DIR``); it is removed at exit.
    """
    import uvicorn

    from dinrec.run import read_run_config

    read_run_config(config.run)  # fail here, not in every worker, when RUN is not a run folder
    if config.onnx is not None and not os.path.isfile(config.onnx):
        raise DinrecError(f"--onnx: {config.onnx} does not exist")
    # keep-alive longer than the default 5 s: an idle pooled connection closed by the server
    # while a client reuses it is a client-side error under bursty load.
    common = {"host": host, "port": port, "log_level": log_level, "access_log": False,
              "timeout_keep_alive": 30, "log_config": log_config(log_level, config.access_log)}
    if workers <= 1:
        uvicorn.run(create_app(config), **common)
        return
    import inspect

    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        # uvicorn kills a worker that does not answer its ping within this many seconds; loading
        # torch and a model on a busy machine can take longer than the default 5 s, which made
        # workers restart in a loop and never serve.
        common["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_S
    folder = Path(tempfile.mkdtemp(prefix="dinrec-serve-"))
    try:
        (folder / "metrics").mkdir()
        config.state_dir = str(folder / "state")
        SharedState(config.state_dir).publish(ModelSpec(config.run, "best", config.onnx), version=1)
        os.environ[MULTIPROC_ENV] = str(folder / "metrics")  # before any worker imports prometheus_client
        os.environ[ENV_CONFIG] = config.to_json()
        uvicorn.run("dinrec.serve.app:app_from_env", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
