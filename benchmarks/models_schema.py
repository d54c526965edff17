"""Model-level speed on the default schema and a rich one; optionally against old sources.

Prints, per case, the median time of:

* ``score``: DIN's prepared candidate scorer (``model.candidate_scorer()``), one history
  of T = 100 against N = 1000 candidates (the serving path);
* ``train``: one DIN forward + backward on a batch of B = 128 rows, T = 100;
* the same two on a rich schema (6 item/user/context features incl. a multi-valued one
  and a numeric one, two sequences, per-event features), new code only.

``--baseline-src DIR`` also runs DIN on the default schema against the models of another
source tree (e.g. the commit before the schema: ``git archive 8cc926c src | tar -x -C
/tmp/old`` then ``--baseline-src /tmp/old/src``), imported in this process as
``dinrec_old``, same seed and inputs, calls alternating old / new, and prints the median
per-pair ratio (new / old) of wall and CPU time. No assertion on time: a busy machine moves
every absolute figure; the interleaved ratio is what to read.

    OMP_NUM_THREADS=2 python benchmarks/models_schema.py --baseline-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def _old_package(src: str) -> str:
    """A copy of ``src``/dinrec importable as ``dinrec_old`` (imports rewritten), so that the
    old and the new models run side by side in this process. Returns the folder to add."""
    import re
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="dinrec_old_")
    shutil.copytree(os.path.join(src, "dinrec"), os.path.join(root, "dinrec_old"))
    for d, _, files in os.walk(os.path.join(root, "dinrec_old")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                with open(path) as fh:
                    text = fh.read()
                with open(path, "w") as fh:
                    fh.write(re.sub(r"\b(from|import) dinrec\b", r"\1 dinrec_old", text))
    return root


def _pairs(fo: Callable[[], object], fn: Callable[[], object], n: int) -> dict[str, float]:
    """Old and new called alternately (order flipped every pair): medians and the median
    per-pair ratio new / old of wall and CPU time (CPU: all threads of the process)."""
    for _ in range(3):
        fo()
        fn()
    wall: dict[str, list[float]] = {"o": [], "n": []}
    ratio_w, ratio_c = [], []
    for i in range(n):
        t = {}
        for f, k in ([(fo, "o"), (fn, "n")] if i % 2 == 0 else [(fn, "n"), (fo, "o")]):
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            t[k] = (time.perf_counter() - w0, time.process_time() - c0)
            wall[k].append(t[k][0] * 1e3)
        ratio_w.append(t["n"][0] / t["o"][0])
        ratio_c.append(t["n"][1] / max(t["o"][1], 1e-9))
    return {"old_ms": statistics.median(wall["o"]), "new_ms": statistics.median(wall["n"]),
            "ratio_wall": statistics.median(ratio_w), "ratio_cpu": statistics.median(ratio_c)}


def against(src: str, n: int) -> None:
    """DIN on the default schema, new vs the models of ``src``: same seed, same inputs."""
    sys.path.insert(0, _old_package(src))
    import dinrec_old.models as OM  # type: ignore[import-not-found]
    from dinrec_old.data.batches import Batch as OldBatch  # type: ignore[import-not-found]

    from dinrec.data.batch import Batch
    from dinrec.data.schema import Schema
    from dinrec.models import create_model

    x = _default_inputs(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    old = OM.build_model("din", n_users=SIZES["user"], n_items=SIZES["item"], n_cats=SIZES["cat"])
    torch.manual_seed(0)
    new = create_model("din", Schema.default(), SIZES)
    ob = OldBatch(user=x["user"], item=x["item"], cat=x["cat"], hist_items=x["hist_items"],
                  hist_cats=x["hist_cats"], mask=x["mask"], label=x["label"])
    nb = Batch.from_ids(x["user"], x["item"], x["cat"], x["hist_items"], x["hist_cats"], x["mask"], x["label"])

    def step(m: torch.nn.Module, b: object) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        out = m(b).logits
        out.sum().backward()
        return out.detach()

    diff = float((step(old.train(), ob) - step(new.train(), nb)).abs().max())
    train = _pairs(lambda: step(old, ob), lambda: step(new, nb), n)
    so, sn = old.eval().candidate_scorer(), new.eval().candidate_scorer()
    args = (x["user"][0], x["hist_items"][0], x["hist_cats"][0], x["cand_items"], x["cand_cats"])
    history, cands = nb.apply(lambda t: t[:1]), {"item": x["cand_items"], "cat": x["cand_cats"]}
    score_diff = float((so(*args).logits - sn(history, cands).logits).abs().max())
    score = _pairs(lambda: so(*args), lambda: sn(history, cands), n * 5)
    print(f"new vs {src}: max |logit difference| train {diff:.2e}, scores {score_diff:.2e}")
    for name, r in (("train step", train), ("score 1x1000", score)):
        print(f"  {name:<13} old {r['old_ms']:7.2f} ms  new {r['new_ms']:7.2f} ms  "
              f"new/old per pair: wall {r['ratio_wall']:.3f}  cpu {r['ratio_cpu']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--baseline-src", default=None, help="another source tree (its src/) to compare with")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"threads {torch.get_num_threads()}, T={T}, N={N}, B={B}")
    for name, fn in (("default", worker_default), ("rich", worker_rich)):
        m = fn(a.repeat)
        print(f"  {name:<8} score 1x{N}: {m['score_ms']:7.2f} ms   train step B={B}: {m['train_ms']:7.2f} ms")
    if a.baseline_src:
        against(a.baseline_src, a.repeat * 4)


if __name__ == "__main__":
    main()
