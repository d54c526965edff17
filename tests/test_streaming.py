"""Training streams the store: peak memory is bounded by the shuffle buffer, not the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dinrec.data import PrepareConfig, SampleStore, generate, prepare_events, preset

# Trains in a child process: a warm-up run (imports, model, logs, the first window: costs
# paid once), then the VmHWM high-water mark is reset and the rest of the epoch is trained
# by a resume; the growth of the peak over the resident size before it is what streaming
# the remaining shards, evaluating and writing the run folder cost.
CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from dinrec.train.trainer import TrainConfig, train

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

store, run, buffer = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = TrainConfig(model="base", embedding_dim=8, hidden=(32, 16), batch_size=256,
                  eval_batch_size=512, threads=1, progress=False, epochs=1, max_len=100,
                  shuffle_buffer=buffer, log_every=10**9, checkpoint_every=10**9, stop_after=40)
train(cfg, store, run)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
cfg.stop_after = None
m = train(cfg, store, run, resume=True).metrics
print(json.dumps({"base": base, "peak": status("VmHWM"), "steps": m["steps"],
                  "samples": m["train_samples"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_training_memory_is_bounded_by_the_shuffle_buffer(tmp_path):
    store = tmp_path / "store"
    events, _ = generate(preset("small", seed=1, n_users=1500, events_per_user=100))
    prepare_events(events, store, PrepareConfig(seed=1, shard_rows=5000, max_len=100))
    s = SampleStore(store)
    files = s.files("train")
    rows = s.num_rows("train")
    assert len(files) >= 40
    # What holding the train split in memory as padded batches takes (the loader's int64
    # histories, items and categories; labels, users, items, categories): a lower bound of
    # loading the whole split at once.
    values = sum(  # history ids of every row, were they materialised per row
        int(np.minimum(pq.read_table(f, columns=["end.hist"])["end.hist"].to_numpy(), s.max_len).sum())
        for f in files
    )
    whole = values * 2 * 8 + rows * 25
    assert whole > 200e6  # the store is several times the bound below
    buffer = 5000  # one shard of rows
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(tmp_path / "run"), str(buffer)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["samples"] == rows  # the whole epoch was streamed
    growth = r["peak"] - r["base"]
    # Observed ~50 MB: a window (5,000 rows), a bucketing unit (50 x 256 rows), the
    # evaluation arrays, checkpoint and plot. A whole-store load needs > 200 MB more.
    assert growth < min(0.4 * whole, 120e6), (growth / 1e6, whole / 1e6)
