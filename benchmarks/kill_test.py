"""Randomized kill test: `dinrec train ... --resume` killed with SIGKILL at random moments,
re-run with the same command until it finishes, must end bit-identical to a run that was
never interrupted.

It prepares its own sample store (the tiny synthetic preset, through the CLI), trains one
uninterrupted reference run per model, then for each round starts the same command,
kills its process group after a random delay (anywhere from start-up and the creation of
the run folder to checkpoint writes, validations and the final evaluation; checkpoints
every few steps and frequent validations make those moments common), and repeats until a
run exits on its own. Every tensor of last.pt and best.pt (model, optimiser, scheduler)
and the recorded validations and test metrics are then compared with the reference.

    python benchmarks/kill_test.py --rounds 6 --kills 6            # DIN and DIEN
    python benchmarks/kill_test.py --models din --rounds 1 --kills 2

Prints one line per round and a summary: kills, rounds, mismatches. Exit status 1 when
any round differs from its reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dinrec.checkpoint import load_checkpoint

ARGS = ["--embedding-dim", "8", "--hidden", "32,16", "--batch-size", "32", "--threads", "1",
        "--eval-every", "20", "--checkpoint-every", "5", "--log-every", "10", "--quiet"]
STEPS = {"din": 90, "dien": 60}


def _cmd(store: Path, run: Path, model: str, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "dinrec", "train", str(store), str(run), "--model", model,
            "--max-steps", str(steps), *ARGS, *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a nested checkpoint state, by its path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def differences(ref: Path, run: Path) -> list[str]:
    """Names of what differs between two finished run folders (empty: bit-identical)."""
    diff = []
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(ref / "checkpoints" / name)
        b = load_checkpoint(run / "checkpoints" / name)
        keys = [k for k in ("model", "optimizer", "scheduler", "step") if k in a]
        ta, tb = _tensors({k: a[k] for k in keys}), _tensors({k: b.get(k) for k in keys})
        if ta.keys() != tb.keys():
            diff.append(f"{name}: tensor names differ")
            continue
        diff += [f"{name}{k}" for k in ta if not torch.equal(ta[k], tb[k])]
        if name == "best.pt" and a["step"] != b["step"]:
            diff.append(f"best.pt step {a['step']} != {b['step']}")
    ma = json.loads((ref / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    for key in ("steps", "best_step", "validations", "stopped_early"):
        if ma[key] != mb[key]:
            diff.append(f"metrics.json {key}")
    for split in ("valid", "test"):
        for key in ("auc", "gauc", "logloss", "n"):
            if ma[split][key] != mb[split][key]:
                diff.append(f"metrics.json {split}.{key}")
    return diff


def _where(run: Path) -> str:
    """How far a killed run had got: no folder yet, folder without checkpoint, the step of
    its last checkpoint, or finished training (final checkpoint, no metrics.json yet)."""
    if not (run / "config.json").exists():
        return "start"
    last = run / "checkpoints" / "last.pt"
    if not last.exists():
        return "folder"
    try:
        state = load_checkpoint(last)["state"]
    except Exception:  # noqa: BLE001 - a damaged file is itself a finding worth showing
        return "damaged"
    return "final" if state.get("finished") else str(state["step"])


def _wait_for_new_checkpoint(run: Path, proc: subprocess.Popen) -> None:
    """Until ``proc`` writes a new last.pt (or ends): it is then training, validating,
    writing checkpoints or finishing."""
    last = run / "checkpoints" / "last.pt"

    def stamp() -> int | None:
        try:
            return last.stat().st_mtime_ns
        except OSError:
            return None

    before = stamp()
    while stamp() == before and proc.poll() is None:
        time.sleep(0.01)


def kill_round(cmd: list[str], run: Path, duration: float, max_kills: int,
               rng: random.Random, in_training: float = 0.5) -> tuple[list[str], int]:
    """Run ``cmd`` until it exits on its own, killing it up to ``max_kills`` times after a
    random delay (with probability ``in_training`` counted from this process's first
    checkpoint, so that it falls in training, validation, checkpoint writes or the end). Returns (where each kill left the run, exit status of the last run)."""
    kills: list[str] = []
    while True:
        proc = subprocess.Popen(cmd, start_new_session=True, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if len(kills) < max_kills:
            try:
                if rng.random() < in_training:  # once this process has written a checkpoint
                    _wait_for_new_checkpoint(run, proc)
                    proc.wait(timeout=rng.uniform(0.0, 0.4 * duration))
                else:  # anywhere, start-up and the folder's creation included
                    proc.wait(timeout=rng.uniform(0.0, duration))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append(_where(run))
                continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            print(err.decode()[-2000:], file=sys.stderr)
        return kills, proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="din,dien")
    ap.add_argument("--rounds", type=int, default=3, help="interrupted runs per model")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (default: din 90, dien 60); longer runs: more kills "
                    "mid-training")
    ap.add_argument("--kills", type=int, default=6, help="kills per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-training", type=float, default=0.5,
                    help="share of kills timed from the process's first checkpoint (mid-training)")
    ap.add_argument("--work", default=None, help="folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="dinrec-kill-"))
    store = work / "store"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "dinrec", "prepare", "synthetic", "--preset", "tiny",
                        "--out", str(store), "--quiet"], check=True, env=_env(),
                       stdout=subprocess.DEVNULL)
    total_kills, rounds, mismatched = 0, 0, 0
    try:
        for model in args.models.split(","):
            ref = work / f"{model}-ref"
            shutil.rmtree(ref, ignore_errors=True)
            t0 = time.perf_counter()
            steps = args.steps or STEPS[model]
            subprocess.run(_cmd(store, ref, model, steps, False), check=True, env=_env(),
                           stdout=subprocess.DEVNULL)
            # The kills fall anywhere in a whole run (a little shorter: the machine varies).
            duration = 0.8 * (time.perf_counter() - t0)
            for r in range(args.rounds):
                run = work / f"{model}-{r}"
                shutil.rmtree(run, ignore_errors=True)
                cmd = _cmd(store, run, model, steps, True)  # the one command, always
                kills, rc = kill_round(cmd, run, duration, args.kills, rng, args.in_training)
                diff = differences(ref, run) if rc == 0 else [f"exit status {rc}"]
                total_kills += len(kills)
                rounds += 1
                mismatched += bool(diff)
                print(f"{model} round {r}: {len(kills)} kills (left at: {' '.join(kills)}), "
                      f"{'identical' if not diff else 'DIFFERENT: ' + ', '.join(diff[:8])}",
                      flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"kills {total_kills}, rounds {rounds}, mismatched rounds {mismatched}")
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
