"""The main job, `dinrec demo`: synthetic logs -> samples -> DIN vs BaseModel -> explained ranking.

On the embedded synthetic data (whose ground truth is known) it

1. generates the ``small`` preset and prepares a sample store;
2. trains DIN and BaseModel with the same data, seed and budget, in dinrec's default
   training configuration (shuffled batches, Dice, DIN's plain attention; with
   ``reference=True`` / ``dinrec demo --reference``: the DIEN reference configuration,
   see docs/training.md);
3. evaluates both on test (AUC, GAUC, logloss);
4. ranks candidates for one test user with DIN and explains the ranking;
5. checks the planted truth: the attention should put more weight on history items of
   the candidate's own category than their share of the history;
6. writes ``attention.png`` (weights over one history for a few candidates) and
   ``curves.png`` (training and validation curves of both models) into the demo folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinrec.data import BatchLoader, PrepareConfig, SampleStore, generate, prepare_events, preset
from dinrec.run import load_run_model
from dinrec.train.plots import plot_attention, plot_curves
from dinrec.train.trainer import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    preset: str = "small"
    epochs: int = 2
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    eval_every: int = 400  # steps between validations (the curves' points)
    reference: bool = False  # the DIEN reference configuration instead of the default


def attention_truth_check(run_dir: Path, store: SampleStore, max_rows: int = 20_000) -> dict[str, float]:
    """How much attention goes to history items of the target's category, on test rows.

    Returns the mean attention mass on same-category history items and the mean share
    of such items in the history (what uniform weights would give), over test rows whose
    history has at least one same-category item and one other item.
    """
    model, _ = load_run_model(run_dir)
    loader = BatchLoader(store, "test", batch_size=1024, shuffle=False)
    mass, share = [], []
    rows = 0
    with torch.no_grad():
        for batch in loader:
            out = model(batch, return_alphas=True)
            hist = batch.sequences["hist"]
            same = (hist.items["cat"] == batch.item["cat"].unsqueeze(1)) & hist.mask  # (B, T)
            n_valid = hist.mask.sum(1)
            n_same = same.sum(1)
            keep = (n_same > 0) & (n_same < n_valid)
            assert out.alphas is not None
            mass.append((out.alphas["hist"] * same).sum(1)[keep])
            share.append((n_same / n_valid.clamp(min=1))[keep])
            rows += len(batch)
            if rows >= max_rows:
                break
    m, s = torch.cat(mass), torch.cat(share)
    return {
        "rows": int(m.numel()),
        "attention_on_same_category": float(m.mean()),
        "same_category_share_of_history": float(s.mean()),
        "rows_where_attention_exceeds_share": float((m > s).float().mean()),
    }


def _pick_user(store: SampleStore) -> tuple[str, list[str]]:
    """A test user with a long, mixed history (for a readable explanation)."""
    loader = BatchLoader(store, "test", batch_size=4096, shuffle=False)
    batch = next(iter(loader))
    hist = batch.sequences["hist"]
    lengths = hist.mask.sum(1)  # (B,)
    n_cats = torch.tensor([len(set(r[m].tolist()))
                           for r, m in zip(hist.items["cat"][:256], hist.mask[:256], strict=True)])
    score = lengths[:256].clamp(max=30) + 3 * n_cats.clamp(max=5)
    i = int(torch.argmax(score))
    user = store.vocabs.user.id_to_token(int(batch.user["user"][i]))
    hist_ids = hist.items["item"][i][hist.mask[i]].numpy()
    return user, store.vocabs.item.decode(hist_ids[-20:])


def run_demo(cfg: DemoConfig, echo=print) -> dict[str, Any]:
    """Run the whole demo; ``echo`` receives the lines to show. Returns a summary dict."""
    from dinrec.serve.ranker import Ranker

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    events, truth = generate(preset(cfg.preset, seed=cfg.seed))
    store_dir = out / "store"
    stats = prepare_events(events, store_dir, PrepareConfig(seed=cfg.seed))
    store = SampleStore(store_dir)
    echo(
        f"[1/5] synthetic '{cfg.preset}' logs: {events.num_rows:,} events, {stats['users']:,} users, "
        f"{stats['items']:,} items -> samples train/valid/test "
        f"{stats['rows']['train']:,}/{stats['rows']['valid']:,}/{stats['rows']['test']:,} "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    results = {}
    for name in ("din", "base"):
        make = TrainConfig.reference if cfg.reference else TrainConfig
        tcfg = make(
            model=name, epochs=cfg.epochs, seed=cfg.seed, threads=cfg.threads,
            progress=cfg.progress, eval_every=cfg.eval_every,
        )
        t1 = time.perf_counter()
        res = train(tcfg, store_dir, out / name, overwrite=True)
        results[name] = res.metrics
        echo(
            f"[2/5] trained {name:<4} {res.metrics['steps']:,} steps at "
            f"{res.metrics['train_samples_per_s']:,.0f} samples/s ({time.perf_counter() - t1:.1f}s)"
        )

    echo("[3/5] test metrics (model chosen on validation AUC):")
    echo(f"      {'model':<6} {'AUC':>7} {'GAUC':>7} {'logloss':>8}")
    for name, m in results.items():
        t = m["test"]
        echo(f"      {name:<6} {t['auc']:>7.4f} {t['gauc']:>7.4f} {t['logloss']:>8.4f}")
    din_auc, base_auc = results["din"]["test"]["auc"], results["base"]["test"]["auc"]
    verdict = "beats" if din_auc > base_auc else "does NOT beat"
    echo(f"      DIN {verdict} BaseModel on test AUC ({din_auc:.4f} vs {base_auc:.4f})")

    ranker = Ranker(out / "din")
    user, history = _pick_user(store)
    candidates = ranker.sample_candidates(50, exclude=history, seed=cfg.seed)
    rec = ranker.rank(user, history, candidates, k=5, explain=3)
    echo(f"[4/5] top 5 of 50 sampled candidates for user {user} (history: {len(history)} items, newest last):")
    for s in rec.ranked:
        why = ", ".join(f"{e.event['item']} ({e.event['cat']}) {e.weight:.2f}" for e in s.explanation)
        echo(f"      {s.item:<8} cat {s.attributes['cat']:<5} p={s.score:.3f}   attends to: {why}")

    check = attention_truth_check(out / "din", store)
    echo(
        f"[5/5] planted truth: on {check['rows']:,} test rows, attention puts "
        f"{100 * check['attention_on_same_category']:.1f}% of its weight on history items of the "
        f"candidate's category, which make up {100 * check['same_category_share_of_history']:.1f}% "
        f"of the history (more than their share in "
        f"{100 * check['rows_where_attention_exceeds_share']:.0f}% of rows)"
    )

    # Pictures: attention over the user's history for the top candidates + curves.
    top = [s.item for s in rec.ranked][:5]
    full = ranker.rank(user, history, top, k=len(top), explain=len(history))
    weights = np.zeros((len(full.ranked), len(history)))
    for r, s in enumerate(full.ranked):
        for e in s.explanation:
            weights[r, e.position] = e.weight
    cat_of = {e.event["item"]: e.event["cat"] for s in full.ranked for e in s.explanation}
    hist_labels = [f"{h}/{cat_of.get(h, '?')}" for h in history]
    cand_labels = [f"{s.item}/{s.attributes['cat']}" for s in full.ranked]
    heat = plot_attention(weights, hist_labels, cand_labels, out / "attention.png",
                          title=f"DIN attention, user {user}")
    curves = plot_curves(out / "din", out=out / "curves.png", others=[out / "base"])
    echo(f"wrote {heat} and {curves} ({time.perf_counter() - t0:.0f}s in all)")
    return {"metrics": results, "truth_check": check, "recommendation": rec.to_dict(),
            "din_beats_base": din_auc > base_auc, "truth": truth.config}
