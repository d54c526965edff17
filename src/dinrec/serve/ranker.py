"""Rank candidate items for one user with a trained run, and explain the ranking.

``Ranker(run_dir)`` loads the best model of a run folder and its vocabularies. Requests
are scored at two levels:

* **ids** (:meth:`Ranker.score_candidate_ids`, :meth:`Ranker.score_id_rows`): the
  integer ids of the run's vocabularies; ids outside a vocabulary map to the
  out-of-vocabulary id and are reported;
* **tokens** (:meth:`Ranker.rank`, :meth:`Ranker.score`): the ids of the raw logs, as
  strings; unknown tokens map to the out-of-vocabulary id and are reported.

Token lookups go through a ``dict`` per vocabulary built once at load (a request costs
one hash lookup per token, not a scan of the vocabulary). For models with attention
(DIN) one history scored against N candidates computes the history part once, and the
explanation is the attention weight of each history item for each candidate.

The scoring itself runs on the PyTorch model of the run, or on an ONNX export of it
(``Ranker(run_dir, onnx=path)``, see :mod:`dinrec.serve.export`): the ONNX model scores
(B,) rows, so candidates are scored as rows and no explanation is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dinrec.data.vocab import NUM_SPECIAL, OOV_ID, OOV_TOKEN, PAD_TOKEN, Vocab, Vocabularies
from dinrec.errors import DinrecError
from dinrec.models import model_class
from dinrec.run import load_run_model, read_run_config

KINDS = ("user", "item", "cat")


@dataclass
class Explanation:
    item: str  # a history item
    category: str
    position: int  # 0 = oldest
    weight: float  # attention weight for this candidate


@dataclass
class Scored:
    item: str
    category: str
    score: float  # click probability
    explanation: list[Explanation] = field(default_factory=list)


@dataclass
class Recommendation:
    user: str
    history: list[str]  # the history used: the most recent max_len items, oldest first
    ranked: list[Scored]
    unknown: dict[str, list[str]]  # tokens that mapped to out-of-vocabulary, by kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CandidateScores:
    """Id-level scores of N candidates against one history."""

    probabilities: np.ndarray  # (N,) float32
    alphas: np.ndarray | None  # (N, T) attention weights, models with attention only
    unknown: dict[str, list[int]]  # ids outside the vocabularies (scored as OOV), by kind


@dataclass
class RowScores:
    """Token-level scores of B (user, history, item) rows."""

    probabilities: list[float]  # (B,)
    unknown: dict[str, list[str]]


class TokenIndex:
    """``token -> id`` of one vocabulary as a Python dict, built once."""

    def __init__(self, vocab: Vocab) -> None:
        tokens = vocab.tokens.to_pylist()
        self.ids: dict[str, int] = {t: i for i, t in enumerate(tokens, NUM_SPECIAL)}
        self.tokens: list[str] = [PAD_TOKEN, OOV_TOKEN, *tokens]  # indexed by id

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str], unknown: list[str] | None = None) -> np.ndarray:
        """(n,) int64 ids; tokens not in the vocabulary get OOV and are appended to ``unknown``."""
        get = self.ids.get
        ids = [get(t, OOV_ID) for t in tokens]
        if unknown is not None and OOV_ID in ids:
            unknown.extend(t for t, i in zip(tokens, ids, strict=True) if i == OOV_ID)
        return np.asarray(ids, dtype=np.int64)


#: ``Ranker(precision=...)`` -> the dtype of the attention's products in candidate ranking.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


class _TorchBackend:
    """Scores with the run's PyTorch model."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str, compute_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.score = model.candidate_scorer()  # weight-only work done once, not per request

    @torch.inference_mode()
    def score_rows(
        self, user: np.ndarray, item: np.ndarray, cat: np.ndarray,
        hist_items: np.ndarray, hist_cats: np.ndarray, mask: np.ndarray,
    ) -> np.ndarray:
        """(B,), (B,), (B,), (B, T), (B, T), (B, T) bool -> probabilities (B,)."""
        from dinrec.data.batches import Batch

        d = self.device
        batch = Batch(
            user=torch.from_numpy(user).to(d), item=torch.from_numpy(item).to(d),
            cat=torch.from_numpy(cat).to(d), hist_items=torch.from_numpy(hist_items).to(d),
            hist_cats=torch.from_numpy(hist_cats).to(d), mask=torch.from_numpy(mask).to(d),
            label=torch.zeros(len(user), device=d),
        )
        return torch.sigmoid(self.model(batch).logits.float()).cpu().numpy()  # (B,)

    @torch.inference_mode()
    def score_candidates(
        self, user: int, hist_items: np.ndarray, hist_cats: np.ndarray,
        items: np.ndarray, cats: np.ndarray, return_alphas: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """history (T,), candidates (N,) -> probabilities (N,), alphas (N, T) or None."""
        d = self.device
        out = self.score(
            torch.tensor(user, device=d), torch.from_numpy(hist_items).to(d),
            torch.from_numpy(hist_cats).to(d), torch.from_numpy(items).to(d),
            torch.from_numpy(cats).to(d), return_alphas=return_alphas,
            compute_dtype=self.compute_dtype,
        )
        probs = torch.sigmoid(out.logits.float()).cpu().numpy()  # (N,)
        alphas = out.alphas.float().cpu().numpy() if return_alphas and out.alphas is not None else None
        return probs, alphas


class _OnnxBackend:
    """Scores with an ONNX export (see :mod:`dinrec.serve.export`) through ONNX Runtime."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the install
            raise DinrecError("--onnx needs onnxruntime: pip install 'dinrec[serve]'") from None
        from dinrec.serve.export import INPUT_NAMES

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
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise DinrecError(f"ONNX model {path}: expected inputs {list(INPUT_NAMES)}, got {names} "
                              "(export it with `dinrec export`)")
        self.path = path

    def score_rows(
        self, user: np.ndarray, item: np.ndarray, cat: np.ndarray,
        hist_items: np.ndarray, hist_cats: np.ndarray, mask: np.ndarray,
    ) -> np.ndarray:
        feeds = dict(zip(
            ("user", "item", "cat", "hist_items", "hist_cats", "mask"),
            (user, item, cat, hist_items, hist_cats, mask), strict=True,
        ))
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)  # (B,)

    def score_candidates(
        self, user: int, hist_items: np.ndarray, hist_cats: np.ndarray,
        items: np.ndarray, cats: np.ndarray, return_alphas: bool,
    ) -> tuple[np.ndarray, None]:
        n, t = len(items), len(hist_items)
        probs = self.score_rows(
            np.full(n, user, np.int64), items, cats,
            np.broadcast_to(hist_items, (n, t)).copy(), np.broadcast_to(hist_cats, (n, t)).copy(),
            np.broadcast_to(hist_items != 0, (n, t)).copy(),
        )
        return probs, None


class Ranker:
    """Score and explain with the best model of a run folder.

    Args:
        run_dir: a run folder written by :func:`dinrec.train.trainer.train`.
        which: ``"best"`` or ``"last"`` checkpoint.
        device: torch device for the PyTorch model.
        onnx: score with this ONNX export of the run instead of the PyTorch model.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        precision: ``"float32"`` (default: the training numbers) or ``"bfloat16"``: the
            attention's products when ranking candidates in bfloat16 (PyTorch backend;
            for CPUs with fast bfloat16 GEMMs such as AMX, probabilities within ~5e-3,
            see docs/serving.md).
    """

    def __init__(
        self,
        run_dir: str | Path,
        which: str = "best",
        device: str = "cpu",
        onnx: str | Path | None = None,
        threads: int | None = None,
        precision: str = "float32",
    ) -> None:
        if precision not in PRECISIONS:
            raise DinrecError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "float32" and onnx is not None:
            raise DinrecError(f"precision {precision!r} is for the PyTorch model; the ONNX export runs in float32")
        self.precision = precision
        self.run_dir = Path(run_dir)
        self.device = device
        self.model: torch.nn.Module | None
        if onnx is None:
            self.model, self.run_config = load_run_model(self.run_dir, which)
            self.model.to(device)
            self.backend: _TorchBackend | _OnnxBackend = _TorchBackend(
                self.model, device, PRECISIONS[precision]
            )
        else:
            self.model, self.run_config = None, read_run_config(self.run_dir)
            self.backend = _OnnxBackend(onnx, threads)
        self.has_attention = bool(model_class(self.model_name).has_attention) and onnx is None
        self.vocabs = Vocabularies.load(self.run_dir / "vocab")
        self.index = {k: TokenIndex(getattr(self.vocabs, k)) for k in KINDS}
        n_items = len(self.vocabs.item)
        if self.vocabs.item_cat is not None:
            self.item_cat = np.array(self.vocabs.item_cat, dtype=np.int64)  # (n_items,) writable copy
        else:
            self.item_cat = np.full(n_items, OOV_ID, dtype=np.int64)
            self.item_cat[0] = 0
        self.max_len = int(self.run_config["train"].get("max_len", 100))

    # ------------------------------------------------------------------ facts
    @property
    def model_name(self) -> str:
        return self.run_config["model"]["name"]

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {k: len(self.index[k]) for k in KINDS}

    # ------------------------------------------------------------------ ids
    def _encode(self, kind: str, tokens: Sequence[str], unknown: dict[str, list[str]]) -> np.ndarray:
        bad: list[str] = []
        ids = self.index[kind].encode([str(t) for t in tokens], bad)
        if bad:
            unknown.setdefault(kind, []).extend(bad)
        return ids

    def _check_ids(self, kind: str, ids: Any, unknown: dict[str, list[int]]) -> np.ndarray:
        """Ids as int64 (n,); those outside [0, size) become OOV and are reported."""
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise DinrecError(f"{kind} ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64).reshape(-1)
        bad = (arr < 0) | (arr >= len(self.index[kind]))
        if bad.any():
            unknown.setdefault(kind, []).extend(arr[bad].tolist())
            arr = np.where(bad, OOV_ID, arr)
        return arr

    def score_candidate_ids(
        self,
        user: int,
        history: Sequence[int] | np.ndarray,
        candidates: Sequence[int] | np.ndarray,
        return_alphas: bool = False,
    ) -> CandidateScores:
        """Probabilities of N candidate item ids for one user id and a history of item ids.

        The history (oldest first) is cut to the run's ``max_len`` most recent items; an
        empty history is one padded position. With attention models the history part is
        computed once for all candidates, and ``return_alphas`` gives the weights (N, T).
        """
        unknown: dict[str, list[int]] = {}
        uid = int(self._check_ids("user", [user], unknown)[0])
        hist = self._check_ids("item", history, unknown)[-self.max_len:]  # (T,)
        if hist.size == 0:
            hist = np.zeros(1, np.int64)
        cands = self._check_ids("item", candidates, unknown)  # (N,)
        if cands.size == 0:
            raise DinrecError("candidates: the list is empty")
        probs, alphas = self.backend.score_candidates(
            uid, hist, self.item_cat[hist], cands, self.item_cat[cands],
            return_alphas=return_alphas and self.has_attention,
        )
        return CandidateScores(probs, alphas, unknown)

    def score_id_rows(
        self,
        users: Sequence[int] | np.ndarray,
        histories: Sequence[Sequence[int]],
        items: Sequence[int] | np.ndarray,
    ) -> tuple[np.ndarray, dict[str, list[int]]]:
        """Probabilities (B,) of B (user id, history of item ids, item id) rows, and the
        ids that were out of range (scored as OOV)."""
        unknown: dict[str, list[int]] = {}
        u = self._check_ids("user", users, unknown)
        it = self._check_ids("item", items, unknown)
        hists = [self._check_ids("item", h, unknown)[-self.max_len:] for h in histories]
        return self._score_rows(u, it, hists), unknown

    def _score_rows(self, users: np.ndarray, items: np.ndarray, hists: list[np.ndarray]) -> np.ndarray:
        b = len(users)
        if not (b == len(items) == len(hists)):
            raise DinrecError(f"rows: {b} users, {len(items)} items, {len(hists)} histories")
        if b == 0:
            return np.zeros(0, np.float32)
        lengths = np.fromiter((len(h) for h in hists), np.int64, b)  # (B,)
        t = max(1, int(lengths.max()))
        hist_items = np.zeros((b, t), np.int64)  # (B, T), left-aligned, 0-padded
        mask = np.arange(t) < lengths[:, None]  # (B, T)
        if lengths.sum():
            hist_items[mask] = np.concatenate(hists)
        return self.backend.score_rows(
            users, items, self.item_cat[items], hist_items, self.item_cat[hist_items], mask,
        )

    # ------------------------------------------------------------------ tokens
    def score(self, rows: Sequence[tuple[str, Sequence[str], str]]) -> RowScores:
        """Click probabilities of (user, history oldest first, item) token rows."""
        unknown: dict[str, list[str]] = {}
        users = self._encode("user", [r[0] for r in rows], unknown)  # (B,)
        items = self._encode("item", [r[2] for r in rows], unknown)  # (B,)
        hists = [self._encode("item", list(r[1])[-self.max_len:], unknown) for r in rows]
        return RowScores(self._score_rows(users, items, hists).tolist(), unknown)

    def store_history(self, store_dir: str | Path, user: str) -> list[str]:
        """A user's most recent history in a sample store: the history of their last positive
        sample (test, else valid, else train) followed by that positive item."""
        from dinrec.data.store import SampleStore

        store = SampleStore(store_dir)
        uid = store.vocabs.user.token_to_id(str(user))
        if uid == OOV_ID:
            raise DinrecError(f"user {user!r} is not in the vocabulary of {store.path}")
        for split in ("test", "valid", "train"):
            if split not in store.splits:
                continue
            for path in reversed(store.files(split)):
                t = pq.read_table(path, columns=["label", "user", "item", "seq", "hist_end"])
                t = t.filter(pc.and_(pc.equal(t["user"], uid), pc.equal(t["label"], 1)))
                if t.num_rows:
                    last = t.slice(t.num_rows - 1).to_pylist()[0]
                    hist, _ = store.sequences.history(last["seq"], last["hist_end"], store.max_len)
                    ids = [*hist, last["item"]]
                    return store.vocabs.item.decode(np.asarray(ids[-self.max_len:]))
        raise DinrecError(f"user {user!r} has no positive sample in {store.path}")

    def sample_candidates(self, n: int, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
        """``n`` distinct items by training popularity, none of them in ``exclude``."""
        counts = self.vocabs.item.counts.astype(np.float64).copy()
        counts[:NUM_SPECIAL] = 0
        if exclude:
            counts[self.index["item"].encode([str(t) for t in exclude])] = 0
        available = int((counts > 0).sum())
        if available == 0:
            raise DinrecError("no items left to sample candidates from")
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(counts), size=min(n, available), replace=False, p=counts / counts.sum())
        tokens = self.index["item"].tokens
        return [tokens[i] for i in picked.tolist()]

    # ------------------------------------------------------------------ ranking
    def rank(
        self,
        user: str,
        history: Sequence[str],
        candidates: Sequence[str],
        k: int = 10,
        explain: int = 0,
    ) -> Recommendation:
        """Top-``k`` of ``candidates`` for ``user`` with ``history`` (oldest first).

        With ``explain > 0`` each ranked item lists the ``explain`` history items with
        the largest attention weights (models with attention, PyTorch backend only).
        """
        if len(candidates) == 0:
            raise DinrecError("candidates: the list is empty")
        if k < 1:
            raise DinrecError(f"k must be >= 1, got {k}")
        unknown: dict[str, list[str]] = {}
        history = [str(h) for h in history][-self.max_len:]
        candidates = [str(c) for c in candidates]
        uid = int(self._encode("user", [str(user)], unknown)[0])
        hist = self._encode("item", history, unknown) if history else np.zeros(1, np.int64)  # (T,)
        cands = self._encode("item", candidates, unknown)  # (N,)
        want_alphas = explain > 0 and self.has_attention and bool(history)
        hist_cats = self.item_cat[hist]  # (T,)
        cand_cats = self.item_cat[cands]  # (N,)
        probs, alphas = self.backend.score_candidates(
            uid, hist, hist_cats, cands, cand_cats, return_alphas=want_alphas
        )
        k = min(k, len(candidates))
        # Top-k by probability, ties by candidate order (a stable sort of -p).
        order = np.argsort(-probs, kind="stable")[:k]  # (k,)
        cat_tokens = self.index["cat"].tokens
        tops = None
        if want_alphas and alphas is not None:
            w = alphas[order]  # (k, T)
            tops = np.argsort(-w, axis=1, kind="stable")[:, :explain]  # (k, e)
        ranked = []
        for r, i in enumerate(order.tolist()):
            expl = []
            if tops is not None:
                expl = [
                    Explanation(history[j], cat_tokens[hist_cats[j]], j, float(alphas[i, j]))
                    for j in tops[r].tolist()
                ]
            ranked.append(Scored(candidates[i], cat_tokens[cand_cats[i]], float(probs[i]), expl))
        return Recommendation(str(user), history, ranked, unknown)
