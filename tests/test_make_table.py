"""`bench/make_table.py`, for real: two workers share the grid study, then the
single-task baselines; the export is every point x seed x epoch once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every configuration x every seed x every epoch (the fixed protocol), as the table's.
PROTOCOL = """objective: overall/geometric
direction: maximize
sampler: {name: grid, seed: 0}
pruner: {name: none}
seeds: 2
race_alpha: 0
"""

GRID = """name: t
base:
  model.max_length: 32
  train.epochs: 2
  train.steps_per_epoch: 2
  train.batch_size: 8
  train.batches_per_step: 3
  loss.method: weighted
space:
  loss.weights.qqp: {type: float, low: 0.1, high: 10.0, grid: [1.0, 2.0]}
  train.schedule: {type: categorical, choices: [proportional, annealed]}
  model.head_hidden: {type: categorical, choices: [0, 16]}
""" + PROTOCOL

SINGLE = """name: t-single
base:
  model.max_length: 32
  train.epochs: 2
  train.batch_size: 8
space:
  model.head_hidden: {type: categorical, choices: [0]}
""" + PROTOCOL


@pytest.mark.slow
def test_two_workers_make_the_whole_table_each_run_once(tiny_encoder, task_dir, tmp_path):
    (tmp_path / "t.yaml").write_text(GRID)
    (tmp_path / "t-single.yaml").write_text(SINGLE)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "make_table.py"), "--name", "t", "--tables",
         str(tmp_path), "--runs", str(tmp_path / "runs"), "--data-dir", str(task_dir),
         "--workers", "2", "--set", f"model.encoder={tiny_encoder}",
         "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    header, *lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert header["workers"] == 2 and header["threads"] == 1
    seen = header["load_seen"]  # sampled from the start, every minute
    assert seen["minutes"] >= 1 and 0 <= seen["min"] <= seen["median"] <= seen["max"]
    grid = [r for r in lines if r["kind"] == "multitask"]
    runs = {(r["config"], r["seed"]) for r in grid}
    assert len(runs) == 8 * 2 and len(grid) == 8 * 2 * 2  # every point x seed x epoch, once
    single = [r for r in lines if r["kind"] == "single"]
    assert {r["study"] for r in single} == {"t-single-sst", "t-single-qqp", "t-single-sts"}
    assert len(single) == 3 * 2 * 2
    for r in single:  # a baseline trains its one task
        task = r["study"].rsplit("-", 1)[1]
        assert r["epoch_examples"][task] > 0
        assert sum(r["epoch_examples"].values()) == r["epoch_examples"][task]
