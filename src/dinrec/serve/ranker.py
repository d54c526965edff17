"""Rank candidate items for one user with a trained run, and explain the ranking.

``Ranker(run_dir)`` loads the best model of a run folder, its schema and the tables that
encode raw values (vocabularies, numeric statistics, item and user side tables; see
:mod:`dinrec.serve.features`). A request names features as the schema does:

    ranker.recommend(user="u12",                                    # or {"user": "u12", "age": 31}
                     sequences={"hist": ["i3", {"item": "i9", "rating": 4}]},
                     candidates=["i1", {"item": "new", "cat": "c5"}], k=10, explain=3)

The Ranker builds the 1-row history :class:`~dinrec.data.batch.Batch` and the
candidates' features, and the model scores them with the history part computed once
(``model.candidate_scorer()``, prepared once per Ranker). The explanation of a ranked
item is the attention weight of each event of each sequence for it, the events named
with their attributes. Unknown tokens map to the out-of-vocabulary id and are reported
by feature.

The scoring runs on the run's PyTorch model, or on an ONNX export of it
(``Ranker(run_dir, onnx=path)``, see :mod:`dinrec.serve.export`): the exported graph
scores rows, so the history is repeated per candidate and no explanation is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinrec.data.batch import Batch, Features
from dinrec.errors import DinrecError
from dinrec.models import model_class
from dinrec.nn import _ops
from dinrec.run import load_run_model, read_run_config
from dinrec.serve.features import Entry, RequestEncoder, find_serving_folder
from dinrec.serve.requests import request_signature


@dataclass
class Explanation:
    sequence: str  # the behaviour sequence
    position: int  # 0 = oldest event used
    weight: float  # attention weight of this event for the candidate
    event: dict[str, Any]  # the event's features (inline values, else the item table's)


@dataclass
class Scored:
    item: str
    score: float  # click probability
    attributes: dict[str, Any] = field(default_factory=dict)  # the item's features, decoded
    explanation: list[Explanation] = field(default_factory=list)


@dataclass
class Recommendation:
    user: str
    ranked: list[Scored]
    unknown: dict[str, list[str]]  # tokens scored as out-of-vocabulary, by feature
    history: dict[str, list[Entry]]  # the events used per sequence (most recent max_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CandidateScores:
    probabilities: np.ndarray  # (N,) float32
    alphas: dict[str, np.ndarray] | None  # {sequence: (N, T)}, models with attention


@dataclass
class RowScores:
    probabilities: list[float]  # (B,)
    unknown: dict[str, list[str]]


#: ``Ranker(precision=...)`` -> the dtype of the attention's products in candidate ranking.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


class _TorchBackend:
    """Scores with the run's PyTorch model."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.compute_dtype = compute_dtype
        self.scorer = model.candidate_scorer()  # weight-only work done once, not per request
        if next(model.parameters()).device.type == "cpu":  # build, self-check and time the C++
            _ops.use("candidate_scores")  # operator now, not in the first request

    @torch.inference_mode()
    def rows(self, batch: Batch) -> np.ndarray:
        return torch.sigmoid(self.model(batch).logits.float()).numpy()  # (B,)

    @torch.inference_mode()
    def candidates(self, history: Batch, candidates: Features, return_alphas: bool) -> CandidateScores:
        out = self.scorer(history, candidates, return_alphas=return_alphas, compute_dtype=self.compute_dtype)
        probs = torch.sigmoid(out.logits.float()).numpy()  # (N,)
        alphas = None
        if return_alphas and out.alphas:
            alphas = {k: v.float().numpy() for k, v in out.alphas.items()}  # {seq: (N, T)}
        return CandidateScores(probs, alphas)


class _OnnxBackend:
    """Scores rows with an ONNX export (:mod:`dinrec.serve.export`) on ONNX Runtime."""

    name = "onnx"

    def __init__(self, path: str | Path, schema: Any, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the install
            raise DinrecError("--onnx needs onnxruntime: pip install 'dinrec[serve]'") from None
        from dinrec.serve.export import input_names

        path = Path(path)
        if not path.is_file():
            raise DinrecError(f"ONNX model {path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise DinrecError(f"ONNX model {path} does not load: {exc}") from None
        self.schema = schema
        self.names = input_names(schema)
        got = [i.name for i in self.session.get_inputs()]
        if got != self.names:
            raise DinrecError(f"ONNX model {path}: expected inputs {self.names}, got {got} "
                              "(export this run with `dinrec export`)")

    def rows(self, batch: Batch) -> np.ndarray:
        from dinrec.serve.export import flatten

        feeds = {n: t.numpy() for n, t in zip(self.names, flatten(batch, self.schema), strict=True)}
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)  # (B,)

    def candidates(self, history: Batch, candidates: Features, return_alphas: bool) -> CandidateScores:
        from dinrec.models.base import candidate_rows

        return CandidateScores(self.rows(candidate_rows(history, candidates)), None)


class Ranker:
    """Score and explain with the best model of a run folder.

    Args:
        run_dir: a run folder written by ``dinrec train``.
        which: ``"best"`` or ``"last"`` checkpoint.
        device: torch device (CPU serving is what is tested).
        onnx: score with this ONNX export of the run instead of the PyTorch model.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        precision: ``"float32"`` (default) or ``"bfloat16"``: the attention's products when
            ranking candidates (PyTorch backend; see docs/serving.md).
    """

    def __init__(self, run_dir: str | Path, which: str = "best", device: str = "cpu",
                 onnx: str | Path | None = None, threads: int | None = None,
                 precision: str = "float32") -> None:
        _check_precision(precision, onnx)
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        max_len = int(config.get("train", {}).get("max_len", 10**9))
        encoder = RequestEncoder.load(find_serving_folder(run_dir, config.get("store")))
        encoder.max_len = {k: min(v, max_len) for k, v in encoder.max_len.items()}
        if onnx is None:
            model, config = load_run_model(run_dir, which)
            backend: _TorchBackend | _OnnxBackend = _TorchBackend(model.to(device), PRECISIONS[precision])
        else:
            model, backend = None, _OnnxBackend(onnx, encoder.schema, threads)
        self._setup(model, backend, encoder, config, precision, run_dir)

    @classmethod
    def from_parts(cls, model: torch.nn.Module, encoder: RequestEncoder, run_config: dict[str, Any],
                   precision: str = "float32", onnx: str | Path | None = None) -> Ranker:
        """A Ranker over an already loaded model and encoder (tests, notebooks)."""
        _check_precision(precision, onnx)
        self = cls.__new__(cls)
        backend = (_TorchBackend(model.eval(), PRECISIONS[precision]) if onnx is None
                   else _OnnxBackend(onnx, encoder.schema))
        self._setup(model if onnx is None else None, backend, encoder, run_config, precision, None)
        return self

    def _setup(self, model: Any, backend: Any, encoder: RequestEncoder, config: dict[str, Any],
               precision: str, run_dir: Path | None) -> None:
        self.model = model
        self.backend = backend
        self.encoder = encoder
        self.schema = encoder.schema
        self.run_config = config
        self.run_dir = run_dir
        self.precision = precision
        self.has_attention = bool(model_class(self.model_name).has_attention) and backend.name == "torch"

    # ------------------------------------------------------------------ facts
    @property
    def model_name(self) -> str:
        return self.run_config["model"]["name"]

    @property
    def max_len(self) -> int:
        """Events kept in the main sequence."""
        return self.encoder.max_len[self.schema.main_sequence.name]

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """Ids per vocabulary table (with padding and OOV)."""
        return {c.feature.table_name: len(c.tokens) for c in self.encoder.codecs.values() if c.tokens}

    def request_signature(self) -> dict[str, Any]:
        return request_signature(self.schema)

    # ------------------------------------------------------------------ scoring
    def score_candidates(self, history: Batch, candidates: Features, return_alphas: bool = False) -> CandidateScores:
        """Id level: a 1-row history batch and N candidates' item features -> probabilities."""
        out = self.backend.candidates(history, candidates, return_alphas and self.has_attention)
        _check_finite(out.probabilities)
        return out

    def score(self, rows: Sequence[dict[str, Any]]) -> RowScores:
        """Click probabilities of full rows: each ``{"user", "context", "sequences", "item"}``."""
        if not rows:
            return RowScores([], {})
        unknown: dict[str, list[str]] = {}
        batch = self.encoder.rows(rows, unknown)
        probs = self.backend.rows(batch)
        _check_finite(probs)
        return RowScores(probs.tolist(), _nonempty(unknown))

    def recommend(self, user: Entry, candidates: Sequence[Entry], sequences: dict[str, Sequence[Entry]] | None = None,
                  context: dict[str, Any] | None = None, k: int = 10, explain: int = 0) -> Recommendation:
        """Top-``k`` of ``candidates`` for one user; with ``explain > 0`` each ranked item lists
        the ``explain`` events of each sequence with the largest attention weights."""
        if len(candidates) == 0:
            raise DinrecError("candidates: the list is empty")
        if k < 1:
            raise DinrecError(f"k must be >= 1, got {k}")
        unknown: dict[str, list[str]] = {}
        history, used = self.encoder.history(user, context, sequences, unknown)
        feats = self.encoder.candidates(candidates, unknown)
        want = explain > 0 and self.has_attention and any(used.values())
        scores = self.score_candidates(history, feats, return_alphas=want)
        probs = scores.probabilities
        order = np.argsort(-probs, kind="stable")[: min(k, len(candidates))]  # ties: request order
        described: dict[tuple[str, int], dict[str, Any]] = {}  # each attended event decoded once
        ranked = [self._scored(candidates[i], float(probs[i]), i, scores.alphas, used, explain, described)
                  for i in order.tolist()]
        uid = user if isinstance(user, str) else user[self.schema.user_key.name]
        return Recommendation(uid, ranked, _nonempty(unknown), used)

    def rank(self, user: str, history: Sequence[Entry], candidates: Sequence[Entry], k: int = 10,
             explain: int = 0) -> Recommendation:
        """:meth:`recommend` with ``history`` as the main sequence's events."""
        return self.recommend(user, candidates, {self.schema.main_sequence.name: list(history)},
                              k=k, explain=explain)

    def _scored(self, cand: Entry, p: float, i: int, alphas: dict[str, np.ndarray] | None,
                used: dict[str, list[Entry]], explain: int,
                described: dict[tuple[str, int], dict[str, Any]]) -> Scored:
        enc = self.encoder
        attrs = enc.describe(cand, self.schema.item)
        expl = []
        for s in self.schema.sequences:
            events = used[s.name]
            if alphas is None or explain <= 0 or not events or s.name not in alphas:
                continue
            w = alphas[s.name][i, : len(events)]  # (T,)
            for j in np.argsort(-w, kind="stable")[:explain].tolist():
                if (s.name, j) not in described:
                    described[s.name, j] = enc.describe(events[j], self.schema.item + s.event_features)
                expl.append(Explanation(s.name, j, float(w[j]), described[s.name, j]))
        return Scored(attrs.pop(self.schema.item_key.name), p, attrs, expl)

    # ------------------------------------------------------------------ CLI helpers
    def sample_candidates(self, n: int, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
        """``n`` distinct items by training popularity, none of them in ``exclude``."""
        side = self.encoder.items
        counts = side.counts.astype(np.float64)  # (N,) by key
        counts[:2] = 0
        for t in exclude:
            counts[side.keys.get(t, 0)] = 0
        available = int((counts > 0).sum())
        if available == 0:
            raise DinrecError("no items left to sample candidates from")
        picked = np.random.default_rng(seed).choice(len(counts), size=min(n, available), replace=False,
                                                    p=counts / counts.sum())
        tokens = {k: t for t, k in side.keys.items()}
        return [tokens[i] for i in picked.tolist()]

    def store_history(self, store_dir: str | Path, user: str) -> list[str]:
        """A user's most recent main-sequence history in a sample store: the history of their
        last positive sample (test, else valid, else train) followed by that item."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from dinrec.data.store import SampleStore

        store = SampleStore(store_dir)
        key = int(store.users.keys_of([str(user)])[0])
        if key < 2:
            raise DinrecError(f"user {user!r} is not in {store.path}")
        main = self.schema.main_sequence.name
        seqs, items = store.sequences[main], store.items.tokens
        for split in ("test", "valid", "train"):
            for path in reversed(store.files(split) if split in store.splits else []):
                t = pq.read_table(path, columns=["label", "user", "item", "seq", f"end.{main}"])
                t = t.filter(pc.and_(pc.equal(t["user"], key), pc.equal(t["label"], 1)))
                if t.num_rows:
                    last = t.slice(t.num_rows - 1).to_pylist()[0]
                    start = int(seqs.offsets[last["seq"]])
                    keys = [*seqs.items[start: start + last[f"end.{main}"]].tolist(), last["item"]]
                    return items.take(keys[-self.max_len:]).to_pylist()
        raise DinrecError(f"user {user!r} has no positive sample in {store.path}")


def _check_precision(precision: str, onnx: Any) -> None:
    if precision not in PRECISIONS:
        raise DinrecError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "float32" and onnx is not None:
        raise DinrecError(f"precision {precision!r} is for the PyTorch model; the ONNX export runs in float32")


def _check_finite(probs: np.ndarray) -> None:
    if not np.isfinite(probs).all():
        raise DinrecError("the model gave no finite score for this input (numbers out of its range?)")


def _nonempty(unknown: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: v for k, v in unknown.items() if v}
