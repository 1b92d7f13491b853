"""Racing over seeds against the fixed protocol, on the same configurations.

1. `mtbert sweep` of a shipped spec with `--seeds N --trials T` (pruner off, so
   that every configuration finishes its first seed): the raced study, its
   seed runs and its best configuration by mean.
2. The fixed protocol on the same configurations: every seed the race did not
   run (s+1 .. s+N-1 of each configuration) is queued in the same study and
   run; a seed run is deterministic, so the runs racing made are the fixed
   protocol's runs too. Its best configuration is the best mean over all N
   seeds.

Prints the seed runs and wall time of both, both choices, and where each
raced-out configuration ranks under the fixed protocol.

    python bench/racing.py --data-dir ../shared/data/cs224n-qqp16k --trials 8 --seeds 3
    python bench/racing.py --data-dir ../shared/data/cs224n-qqp16k --resume  # step 2 only
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

from mtbert.studies.job import RACED_OUT, RESEED_OF, SEED
from mtbert.studies.configurations import config_of
from mtbert.studies.racing import spend
from mtbert.studies.configurations import seed_groups
from mtbert.studies.runner import SweepOptions, optimize
from mtbert.studies.spec import find_spec, stored_spec, with_racing
from mtbert.studies.storage import storage_url

SMALL = ["data.max_train_examples=1000", "data.max_eval_examples=300", "train.epochs=1",
         "train.steps_per_epoch=40", "train.batch_size=16"]


def raced_sweep(args, spec_file: Path) -> float:
    command = [sys.executable, "-m", "mtbert", "sweep", str(spec_file), "--trials",
               str(args.trials), "--seeds", str(args.seeds), "--study", args.study,
               "--out", str(args.out), "--data-dir", str(args.data_dir), "--device", "cpu",
               "--wandb-mode", "disabled"]
    for item in SMALL + args.set:
        command += ["--set", item]
    started = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - started


def complete_fixed_protocol(args, study) -> tuple[int, float]:
    """Queue and run every seed of every configuration that the race did not run, with the
    spec the sweep stored (its --set and data directory), not raced."""
    spec = with_racing(stored_spec(study), 1, None)
    trials = study.get_trials(deepcopy=False)
    held = {(config_of(t), t.user_attrs.get(SEED)) for t in trials if t.state.name == "COMPLETE"}
    queued = 0
    for t in trials:
        if t.state.name != "COMPLETE" or RESEED_OF in t.user_attrs:
            continue
        first = t.user_attrs[SEED]
        for seed in range(first + 1, first + args.seeds):
            if (t.number, seed) not in held:
                study.enqueue_trial(t.params, user_attrs={RESEED_OF: t.number, SEED: seed})
                queued += 1
    options = SweepOptions(study=args.study, out=args.out, device="cpu")
    started = time.monotonic()
    if queued:
        optimize(study, spec, options, n_trials=queued, timeout=None)
    return queued, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="loss-weights")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench-racing"))
    parser.add_argument("--study", default="race-bench")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="more config overrides")
    parser.add_argument("--resume", action="store_true",
                        help="the raced study exists: only complete the fixed protocol")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(find_spec(args.spec).read_text())
    raw["pruner"] = {"name": "none"}  # every configuration finishes its first seed
    spec_file = args.out / f"{args.spec}-raced.yaml"
    spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))

    raced_s = math.nan if args.resume else raced_sweep(args, spec_file)
    study = optuna.load_study(study_name=args.study, storage=storage_url(None, args.out))
    raced = seed_groups(study)
    cost = spend(study, args.seeds)
    raced_best = raced[0]
    raced_out = {g.number for g in raced if g.raced_out}
    print(cost.line())
    print(f"raced: best configuration trial {raced_best.number}, mean "
          f"{raced_best.mean():.4f} over {len(raced_best.trials)} seeds; "
          f"{len(raced_out)} of {len(raced)} configurations raced out; {raced_s / 60:.1f} min")

    queued, fixed_s = complete_fixed_protocol(args, study)
    values: dict[int, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        values.setdefault(config_of(t), []).append(t.value)
    fixed = sorted(values, key=lambda c: -statistics.fmean(values[c]))
    print(f"fixed protocol: {sum(len(v) for v in values.values())} seed runs "
          f"({queued} more than racing, {fixed_s / 60:.1f} min for them); best configuration "
          f"trial {fixed[0]}, mean {statistics.fmean(values[fixed[0]]):.4f} over "
          f"{len(values[fixed[0]])} seeds")
    print(f"same best configuration: {'yes' if fixed[0] == raced_best.number else 'no'}")
    print("configuration  fixed rank  fixed mean ± std   seeds raced  raced out")
    for rank, c in enumerate(fixed, 1):
        raced_seeds = next(len(g.trials) for g in raced if g.number == c)
        std = statistics.stdev(values[c]) if len(values[c]) > 1 else math.nan
        print(f"{c:>13}  {rank:>10}  {statistics.fmean(values[c]):.4f} ± "
              f"{std:.4f}  {raced_seeds:>11}  "
              f"{'yes' if c in raced_out else 'no'}")
    if any(RACED_OUT in t.user_attrs for t in study.get_trials(deepcopy=False)
           if config_of(t) == fixed[0]):
        print("note: the fixed protocol's best configuration was raced out")


if __name__ == "__main__":
    main()
