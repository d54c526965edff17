"""Model-level speed on the default schema and a rich one; optionally against old sources.

Prints, per case, the median time of:

* ``score``: DIN's prepared candidate scorer (``model.candidate_scorer()``), one history
  of T = 100 against N = 1000 candidates (the serving path);
* ``train``: one DIN forward + backward on a batch of B = 128 rows, T = 100;
* the same two on a rich schema (6 item/user/context features incl. a multi-valued one
  and a numeric one, two sequences, per-event features), new code only.

``--baseline-src DIR`` runs the default-schema cases on another source tree too (e.g. the
commit before the schema: ``git archive 8cc926c src | tar -x -C /tmp/old`` then
``--baseline-src /tmp/old/src``), alternating fresh processes round by round, and prints
the ratio of medians (new / old). No assertion on time: a busy machine moves every figure.

    OMP_NUM_THREADS=2 python benchmarks/models_schema.py --rounds 5 --baseline-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

SIZES = {"user": 50_000, "item": 200_000, "cat": 2_000}
T, N, B = 100, 1000, 128


def _median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _ids(n: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(2, n, shape, generator=g)


def _default_inputs(g: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(20, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return {
        "user": _ids(SIZES["user"], (B,), g), "item": _ids(SIZES["item"], (B,), g),
        "cat": _ids(SIZES["cat"], (B,), g), "hist_items": _ids(SIZES["item"], (B, T), g) * mask,
        "hist_cats": _ids(SIZES["cat"], (B, T), g) * mask, "mask": mask,
        "label": torch.randint(0, 2, (B,), generator=g).float(),
        "cand_items": _ids(SIZES["item"], (N,), g), "cand_cats": _ids(SIZES["cat"], (N,), g),
    }


def _train_ms(model: torch.nn.Module, batch: object, repeat: int) -> float:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch).logits.sum().backward()

    return _median_ms(step, repeat)


def worker_default(repeat: int) -> dict[str, float]:
    """The default-schema cases, on whichever sources ``dinrec`` imports from."""
    import dinrec.models as M

    g = torch.Generator().manual_seed(0)
    x = _default_inputs(g)
    torch.manual_seed(0)
    if hasattr(M, "create_model"):  # the schema-built models
        from dinrec.data.batch import Batch
        from dinrec.data.schema import Schema

        model = M.create_model("din", Schema.default(), SIZES)
        batch = Batch.from_ids(x["user"], x["item"], x["cat"], x["hist_items"], x["hist_cats"], x["mask"], x["label"])
        history = batch.apply(lambda t: t[:1])
        cands = {"item": x["cand_items"], "cat": x["cand_cats"]}
        args: tuple = (history, cands)
    else:  # the fixed user / item / category models
        from dinrec.data.batches import Batch as OldBatch

        model = M.build_model("din", n_users=SIZES["user"], n_items=SIZES["item"], n_cats=SIZES["cat"])
        batch = OldBatch(user=x["user"], item=x["item"], cat=x["cat"], hist_items=x["hist_items"],
                         hist_cats=x["hist_cats"], mask=x["mask"], label=x["label"])
        args = (x["user"][0], x["hist_items"][0], x["hist_cats"][0], x["cand_items"], x["cand_cats"])
    train = _train_ms(model, batch, repeat)
    model.eval()
    scorer = model.candidate_scorer()
    return {"score_ms": _median_ms(lambda: scorer(*args), repeat * 5), "train_ms": train}


def worker_rich(repeat: int) -> dict[str, float]:
    from dinrec.data.batch import Batch, SequenceBatch
    from dinrec.data.schema import Feature, Schema, SequenceSpec
    from dinrec.models import create_model

    schema = Schema(
        user=[Feature("user"), Feature("age", kind="numeric")],
        item=[Feature("item"), Feature("cat"), Feature("genres", kind="multi", max_values=4),
              Feature("price", kind="numeric")],
        context=[Feature("hour")],
        sequences=[SequenceSpec("liked", max_len=T, event_features=[Feature("rating")]),
                   SequenceSpec("disliked", max_len=T // 2)],
    )
    sizes = {**SIZES, "genres": 20, "hour": 26, "rating": 7}
    g = torch.Generator().manual_seed(0)

    def items(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {"item": _ids(sizes["item"], shape, g), "cat": _ids(sizes["cat"], shape, g),
                "genres": _ids(sizes["genres"], (*shape, 4), g), "price": torch.randn(shape, generator=g)}

    def seq(t: int, events: bool) -> SequenceBatch:
        mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (B, 1), generator=g)  # (B, t)
        ev = {"rating": _ids(7, (B, t), g)} if events else {}
        return SequenceBatch(items=items((B, t)), mask=mask, events=ev)

    batch = Batch(label=torch.randint(0, 2, (B,), generator=g).float(),
                  user={"user": _ids(sizes["user"], (B,), g), "age": torch.randn(B, generator=g)},
                  item=items((B,)), context={"hour": _ids(26, (B,), g)},
                  sequences={"liked": seq(T, True), "disliked": seq(T // 2, False)})
    torch.manual_seed(0)
    model = create_model("din", schema, sizes)
    train = _train_ms(model, batch, repeat)
    model.eval()
    scorer = model.candidate_scorer()
    history, cands = batch.apply(lambda t: t[:1]), items((N,))
    return {"score_ms": _median_ms(lambda: scorer(history, cands), repeat * 5), "train_ms": train}


def _run(src: str | None, what: str, repeat: int) -> dict[str, float]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--worker", what, "--repeat", str(repeat)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--baseline-src", default=None, help="another source tree (its src/) to compare with")
    p.add_argument("--worker", choices=["default", "rich"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        fn = worker_default if a.worker == "default" else worker_rich
        print(json.dumps(fn(a.repeat)))
        return
    runs: dict[str, list[dict[str, float]]] = {"default": [], "baseline": [], "rich": []}
    for _ in range(a.rounds):  # interleaved: each round runs every variant once
        runs["default"].append(_run(None, "default", a.repeat))
        if a.baseline_src:
            runs["baseline"].append(_run(a.baseline_src, "default", a.repeat))
        runs["rich"].append(_run(None, "rich", a.repeat))
    print(f"threads {os.environ.get('OMP_NUM_THREADS', '2')}, T={T}, N={N}, B={B}, {a.rounds} rounds "
          "(median of the rounds' medians)")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("score_ms", "train_ms")}
           for k, v in runs.items() if v}
    for k, m in med.items():
        print(f"  {k:<9} score 1x{N}: {m['score_ms']:7.2f} ms   train step B={B}: {m['train_ms']:7.2f} ms")
    if a.baseline_src:
        ratios = {m: statistics.median(n[m] / o[m] for n, o in zip(runs["default"], runs["baseline"], strict=True))
                  for m in ("score_ms", "train_ms")}
        print(f"  new/old (median of per-round ratios): score {ratios['score_ms']:.3f}  "
              f"train {ratios['train_ms']:.3f}")


if __name__ == "__main__":
    main()
