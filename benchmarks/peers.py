"""dinrec beside its peers (FuxiCTR, ...): same data, same configuration, same budget.

    python benchmarks/peers.py                                  # everything below
    python benchmarks/peers.py --datasets synthetic --peers fuxictr --models din --quick

For every data set it prepares a dinrec sample store once (the commands of
benchmarks/results.py for the real sets; ``synthetic``: the ``small`` preset split by
user, ~154k train / ~19k valid / ~19k test rows, histories <= 94), exports it for the
peers (ids, rows and histories unchanged: see benchmarks/peer_driver.py), and then, for
every (model, seed), trains dinrec (``dinrec train``: its default configuration;
``--reference`` adds ``dinrec train --reference``) and each peer *interleaved* (dinrec,
peer, dinrec, peer ...) so that both see the same machine load. Each peer runs in its own
virtual environment under ``.peers/<peer>`` (created on first use, torch pinned to
2.13.0). Test metrics of every run (dinrec's and the peers') are computed by
``dinrec.train.metrics.evaluate_predictions`` from the best-validation weights.

Prints, per data set and model: train samples/s of dinrec and of each peer, the ratio
(median over seeds), and test AUC / GAUC / logloss, mean +- std over seeds. Results are
kept under ``--root`` (default ``runs/peers``): a run whose result exists is not run
again (delete its folder to rerun it). ``--no-dinrec`` runs only the peers, e.g. ahead of
a change to dinrec; their results are then reused by the next full run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import DATASETS  # noqa: E402  (the real data sets, as docs/results.md prepares them)

DATASETS = {
    "synthetic": ["synthetic", "--preset", "small", "--split", "by-user",
                  "--valid-fraction", "0.1", "--test-fraction", "0.1"],
    **DATASETS,
}
# Budget per data set: the synthetic set as the test (1 epoch, one validation at
# its end); the real sets as docs/results.md (3,000 steps, validation every 500, patience 3).
BUDGETS = {
    "synthetic": {"epochs": 1},
    "ml-1m": {"max_steps": 3000, "eval_every": 500},
    "grocery": {"max_steps": 3000, "eval_every": 500},
    "beauty": {"max_steps": 3000, "eval_every": 500},
}
QUICK = {"max_steps": 300, "eval_every": 300}
PEER_PACKAGES = {"fuxictr": ["fuxictr==2.3.10"], "deepctr": ["deepctr-torch==0.3.0", "requests"],
                 "rechub": ["torch-rechub==0.9.0"]}
PEER_MODELS = {"fuxictr": ("din", "dien"), "deepctr": ("din", "dien"), "rechub": ("din",)}


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    line = " ".join(shlex.quote(c) for c in cmd)
    print("$ " + line, flush=True)
    with open(log, "a") as f:
        f.write(line + "\n")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {line}")


def peer_python(peer: str, root: Path, log: Path) -> str:
    """The peer's virtual environment (created on first use): its python."""
    venv = root / peer
    py = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        _run([sys.executable, "-m", "venv", str(venv)], log)
        _run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", *PEER_PACKAGES[peer]], log)
        (venv / ".ready").touch()
    return str(py)


# --------------------------------------------------------------------------- export
def export_store(store_dir: Path, out: Path) -> None:
    """Write the store's rows and histories as NumPy arrays for peer_driver.py."""
    import pyarrow.parquet as pq

    from dinrec.data.store import SampleStore

    if (out / "meta.json").exists():
        return
    store = SampleStore.open(store_dir)
    main = store.schema.main_sequence.name  # the default schema: "hist" (item ++ cat)
    # Rows and histories hold side-table *keys*; the ids are the side tables' columns (a key
    # unseen in training has the OOV id 1, and still its category).
    item_id, cat_id = (np.asarray(store.items.features[k]) for k in ("item", "cat"))
    user_id = np.asarray(store.users.features["user"])
    seqs = store.sequences[main]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "sequences.npz", items=item_id[seqs.items], cats=cat_id[seqs.items],
             item_cat=np.asarray(store.item_cat))
    for split in ("train", "valid", "test"):
        tab = pq.read_table(store.files(split), columns=["label", "user", "item", "seq", f"end.{main}"])
        col = {k: tab.column(k).to_numpy() for k in tab.column_names}
        start, length = seqs.windows(col["seq"].astype(np.int64), col[f"end.{main}"].astype(np.int64),
                                     store.max_len)
        np.savez(out / f"{split}.npz", user=user_id[col["user"]], item=item_id[col["item"]],
                 cat=cat_id[col["item"]], label=col["label"], start=start, len=length,
                 group=col["user"])
    sizes = store.table_sizes()
    meta = {"n_users": sizes["user"], "n_items": sizes["item"], "n_cats": sizes["cat"],
            "max_len": store.max_len, "rows": {s: store.num_rows(s) for s in ("train", "valid", "test")}}
    (out / "meta.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- runs
def dinrec_run(store: Path, run: Path, model: str, seed: int, budget: dict, a, log: Path,
               reference: bool = False) -> dict:
    mfile = run / "metrics.json"
    if not mfile.exists():
        cmd = ["nice", "-n", "10", sys.executable, "-m", "dinrec", "train", str(store), str(run),
               "--model", model, "--seed", str(seed), "--threads", str(a.threads), "--quiet",
               "--overwrite", "--patience", "3"]
        if "epochs" in budget:
            cmd += ["--epochs", str(budget["epochs"])]
        if "max_steps" in budget:
            cmd += ["--max-steps", str(budget["max_steps"])]
        if "eval_every" in budget:
            cmd += ["--eval-every", str(budget["eval_every"])]
        _run(cmd + (["--reference"] if reference else []) + shlex.split(a.dinrec_args), log)
    m = json.loads(mfile.read_text())
    return {"speed": m["train_samples_per_s"], **{k: m["test"][k] for k in ("auc", "gauc", "logloss")}}


def peer_run(peer: str, py: str, export: Path, run: Path, model: str, seed: int, budget: dict,
             a, log: Path) -> dict:
    from dinrec.train.metrics import evaluate_predictions

    out, preds = run / "result.json", run / "test_preds.npz"
    if not out.exists():
        run.mkdir(parents=True, exist_ok=True)
        cmd = ["nice", "-n", "10", py, str(HERE / "peer_driver.py"), "--peer", peer, "--model", model,
               "--data", str(export), "--workdir", str(run / "work"), "--out", str(out),
               "--preds", str(preds), "--seed", str(seed), "--threads", str(a.threads),
               "--patience", "3"]
        for k, v in budget.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        _run(cmd, log, env)
    r = json.loads(out.read_text())
    z = np.load(preds)
    m = evaluate_predictions(z["labels"], z["probs"], z["users"])
    return {"speed": r["train_samples_per_s"], **{k: m[k] for k in ("auc", "gauc", "logloss")}}


def _ms(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.4f} ± {sd:.4f}"


def report(ds: str, model: str, res: dict[str, list[dict]]) -> None:
    mine = [k for k in res if k.startswith("dinrec")]
    for who, rows in res.items():
        if not rows:
            continue
        speed = statistics.median(r["speed"] for r in rows)
        ratio = "" if who in mine else " / ".join(
            f"{statistics.median(b['speed'] / r['speed'] for b, r in zip(res[m], rows, strict=True)):.2f}x"
            for m in mine)
        print(f"| {ds} | {model} | {who} | {speed:,.0f} | {ratio} | "
              f"{_ms([r['auc'] for r in rows])} | {_ms([r['gauc'] for r in rows])} | "
              f"{_ms([r['logloss'] for r in rows])} | {len(rows)} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,ml-1m,grocery,beauty")
    p.add_argument("--peers", default="fuxictr")
    p.add_argument("--models", default="din,dien")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="300 steps, one validation: a smoke test")
    p.add_argument("--max-steps", type=int, default=None,
                   help="budget override: N steps, a validation every min(500, N) (a shorter run)")
    p.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data"))
    p.add_argument("--root", default="runs/peers")
    p.add_argument("--venvs", default=".peers", help="folder of the peers' virtual environments")
    p.add_argument("--dinrec-args", default="", help="more `dinrec train` options, e.g. '--threads 2'")
    p.add_argument("--tag", default="", help="suffix of dinrec's run folders (to compare options)")
    p.add_argument("--no-dinrec", action="store_true",
                   help="run only the peers (their results are kept and reused by a later full run)")
    p.add_argument("--reference", action="store_true",
                   help="also run dinrec's DIEN reference configuration (`dinrec train --reference`), interleaved")
    a = p.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.txt"
    peers = [x for x in a.peers.split(",") if x]
    pys = {peer: peer_python(peer, Path(a.venvs), log) for peer in peers}
    table = []
    for ds in a.datasets.split(","):
        store, export = root / ds / "store", root / ds / "export"
        if not (store / "stats.json").exists():
            args = [c.format(data=a.data) for c in DATASETS[ds]]
            _run([sys.executable, "-m", "dinrec", "prepare", *args, "--out", str(store), "--quiet"], log)
        export_store(store, export)
        budget = QUICK if a.quick else BUDGETS[ds]
        q = "-quick" if a.quick else ""
        if a.max_steps:
            budget, q = {"max_steps": a.max_steps, "eval_every": min(500, a.max_steps)}, f"-{a.max_steps}"
        for model in a.models.split(","):
            res: dict[str, list[dict]] = {
                **({} if a.no_dinrec else {"dinrec": [], **({"dinrec-reference": []} if a.reference else {})}),
                **{peer: [] for peer in peers}}
            for seed in map(int, a.seeds.split(",")):
                t0 = time.time()
                if not a.no_dinrec:
                    res["dinrec"].append(dinrec_run(store, root / ds / f"dinrec-{model}{a.tag}{q}-seed{seed}",
                                                    model, seed, budget, a, log))
                if a.reference and not a.no_dinrec:
                    res["dinrec-reference"].append(dinrec_run(
                        store, root / ds / f"dinrec-{model}{a.tag}-ref{q}-seed{seed}", model, seed, budget, a,
                        log, reference=True))
                for peer in peers:
                    if model in PEER_MODELS[peer]:
                        res[peer].append(peer_run(peer, pys[peer], export,
                                                  root / ds / f"{peer}-{model}{q}-seed{seed}",
                                                  model, seed, budget, a, log))
                print(f"# {ds} {model} seed {seed}: {time.time() - t0:.0f}s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            table.append((ds, model, res))
    print("\n| data | model | library | train samples/s | dinrec / peer (median of per-seed ratios; "
          "default / reference) | test AUC | test GAUC "
          "| test logloss | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        report(*row)


if __name__ == "__main__":
    main()
