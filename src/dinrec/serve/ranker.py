"""Rank candidate items for one user with a trained run, and explain the ranking.

``Ranker(run_dir)`` loads the best model of a run folder and its vocabularies. Tokens
(the ids of the raw logs, as strings) go in and come out; unknown tokens map to the
out-of-vocabulary id and are reported. For models with attention (DIN) the scoring of
one history against N candidates computes the history part once, and the explanation
is the attention weight of each history item for each candidate.
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

from dinrec.data.vocab import NUM_SPECIAL, OOV_ID, Vocabularies
from dinrec.errors import DinrecError
from dinrec.train.trainer import load_run_model


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
    history: list[str]
    ranked: list[Scored]
    unknown: dict[str, list[str]]  # tokens that mapped to out-of-vocabulary, by kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ranker:
    """Score and explain with the best model of a run folder."""

    def __init__(self, run_dir: str | Path, which: str = "best", device: str = "cpu"):
        self.run_dir = Path(run_dir)
        self.model, self.run_config = load_run_model(self.run_dir, which)
        self.model.to(device)
        self.device = device
        self.vocabs = Vocabularies.load(self.run_dir / "vocab")
        item_cat = self.vocabs.item_cat
        self.item_cat = (
            torch.tensor(np.asarray(item_cat), dtype=torch.int64)
            if item_cat is not None
            else torch.full((len(self.vocabs.item),), OOV_ID, dtype=torch.int64)
        )
        self.max_len = int(self.run_config["train"].get("max_len", 100))

    @property
    def model_name(self) -> str:
        return self.run_config["model"]["name"]

    # ------------------------------------------------------------------ ids
    def _encode(self, kind: str, tokens: Sequence[str], unknown: dict[str, list[str]]) -> torch.Tensor:
        vocab = getattr(self.vocabs, kind)
        ids = np.asarray(vocab.encode(list(map(str, tokens))), dtype=np.int64)
        bad = [str(t) for t, i in zip(tokens, ids, strict=True) if i == OOV_ID]
        if bad:
            unknown.setdefault(kind, []).extend(bad)
        return torch.as_tensor(ids)

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
                t = pq.read_table(path, columns=["label", "user", "item", "hist_items"])
                t = t.filter(pc.and_(pc.equal(t["user"], uid), pc.equal(t["label"], 1)))
                if t.num_rows:
                    last = t.slice(t.num_rows - 1)
                    ids = [*last["hist_items"][0].as_py(), last["item"][0].as_py()]
                    return store.vocabs.item.decode(np.asarray(ids[-self.max_len:]))
        raise DinrecError(f"user {user!r} has no positive sample in {store.path}")

    def sample_candidates(self, n: int, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
        """``n`` distinct items by training popularity, none of them in ``exclude``."""
        counts = self.vocabs.item.counts.astype(np.float64).copy()
        counts[:NUM_SPECIAL] = 0
        if exclude:
            ids = np.asarray(self.vocabs.item.encode(list(map(str, exclude))))
            counts[ids] = 0
        available = int((counts > 0).sum())
        if available == 0:
            raise DinrecError("no items left to sample candidates from")
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(counts), size=min(n, available), replace=False, p=counts / counts.sum())
        return self.vocabs.item.decode(picked)

    # ------------------------------------------------------------------ ranking
    @torch.no_grad()
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
        the largest attention weights (models with attention only).
        """
        if not candidates:
            raise DinrecError("candidates: the list is empty")
        if k < 1:
            raise DinrecError(f"k must be >= 1, got {k}")
        unknown: dict[str, list[str]] = {}
        history = list(map(str, history))[-self.max_len:]
        uid = self._encode("user", [user], unknown)[0]
        if history:
            hist = self._encode("item", history, unknown)  # (T,)
        else:
            hist = torch.zeros(1, dtype=torch.int64)  # one padded position: "no history"
        cands = self._encode("item", candidates, unknown)  # (N,)
        want_alphas = explain > 0 and self.model.has_attention
        out = self.model.score_candidates(
            uid.to(self.device),
            hist.to(self.device),
            self.item_cat[hist].to(self.device),
            cands.to(self.device),
            self.item_cat[cands].to(self.device),
            return_alphas=want_alphas,
        )
        probs = torch.sigmoid(out.logits.float()).cpu()  # (N,)
        order = torch.argsort(probs, descending=True, stable=True)[:k]
        cat_tokens = self.vocabs.cat.decode(self.item_cat[hist].numpy())
        ranked = []
        for i in order.tolist():
            cand = str(candidates[i])
            cat = self.vocabs.cat.id_to_token(int(self.item_cat[cands[i]]))
            expl = []
            if want_alphas and history:
                w = out.alphas[i].float().cpu()  # (T,)
                top = torch.argsort(w, descending=True, stable=True)[:explain]
                expl = [
                    Explanation(history[j], cat_tokens[j], j, float(w[j])) for j in top.tolist()
                ]
            ranked.append(Scored(cand, cat, float(probs[i]), expl))
        return Recommendation(str(user), history, ranked, unknown)
