"""Sweep wall time with K trials per GPU against one at a time, same trials.

    python bench/sweep_packing.py --data-dir DIR --trials 8 --k 4

Runs `mtbert sweep` twice on the same spec, seed and trials (8 one-epoch
minilm-l6 trials by default): once with --trials-per-gpu 1, once with
--trials-per-gpu K, each into a fresh directory, and prints both wall times
and their ratio. The last line on stdout is `ratio K/1 wall time: X.XX`.
Meant for a GPU; on CPU it runs too, but K processes then share the cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One short trial: one epoch on a seeded sample of each task, batch 32.
SPEC = """name: packing
description: sweep-packing benchmark, one-epoch trials
base:
  model.encoder: {encoder}
  train.epochs: 1
  train.batch_size: 32
  data.max_train_examples: {examples}
  data.max_eval_examples: {examples}
space:
  train.lr: {{type: float, low: 1.0e-5, high: 1.0e-4, log: true}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
"""


def run(k: int, args, spec: Path, root: Path) -> float:
    out = root / f"k{k}"
    command = [sys.executable, "-m", "mtbert", "-q", "sweep", str(spec), "--trials",
               str(args.trials), "--trials-per-gpu", str(k), "--out", str(out),
               "--data-dir", args.data_dir, "--wandb-mode", "disabled", "--device", args.device]
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if done.returncode != 0:
        sys.exit(f"sweep_packing: K={k} sweep failed (exit {done.returncode}): "
                 f"{done.stderr.strip().splitlines()[-1:]}")
    print(f"K={k}: {args.trials} trials in {seconds:.1f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("MTBERT_DATA_DIR"))
    parser.add_argument("--encoder", default="minilm-l6")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="trials per GPU of the packed sweep")
    parser.add_argument("--examples", type=int, default=2000,
                        help="training (and dev) examples per task of each trial")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("--data-dir is required when MTBERT_DATA_DIR is not set")
    with tempfile.TemporaryDirectory(prefix="mtbert-sweep-packing-") as tmp:
        root = Path(tmp)
        spec = root / "packing.yaml"
        spec.write_text(SPEC.format(encoder=args.encoder, examples=args.examples))
        one = run(1, args, spec, root)
        many = run(args.k, args, spec, root)
    print(f"ratio K/1 wall time: {many / one:.2f}")


if __name__ == "__main__":
    main()
