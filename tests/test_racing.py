"""Racing configurations over seeds (`mtbert sweep --seeds N`): the decisions on controlled
per-seed values, the sampler's view of the study, and sweeps of real worker processes
(two on PostgreSQL, one killed) whose trials are the stand-in trial program
(tests/stub_trial.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies import racing
from mtbert.studies import trial as trial_process
from mtbert.studies.job import RACED_OUT, RESEED_OF, SEED, TrialJob, TrialResult
from mtbert.studies.runner import SweepOptions, TrialRunner, run_sweep
from mtbert.studies.spec import load_spec
from mtbert.tasks import METRIC_KEYS

from conftest import use_stub_trials
from stub_trial import stub_metrics

runner = CliRunner()

SPEC = """name: race
base:
  train: {seed: 7}
space:
  train.lr: {type: categorical, choices: [1.0e-5, 2.0e-5, 3.0e-5, 4.0e-5, 5.0e-5]}
objective: overall/geometric
pruner: {name: none}
seeds: 3
enqueue:
  - {train.lr: 1.0e-5}
  - {train.lr: 2.0e-5}
  - {train.lr: 3.0e-5}
"""

# The objective's value of each configuration (by train.lr) on seeds 7, 8, 9, which
# share an effect on every configuration (+0, +0.03, +0.01) as real seeds do, plus a
# little noise of their own: 1e-5 is best, 2e-5 behind it by 0.05 on every seed, 3e-5
# as good within the noise (ahead on one seed, behind on two), and 5e-5 far below
# everything (a race that ends on its first seed).
VALUES = {1e-5: [0.800, 0.832, 0.809], 2e-5: [0.751, 0.779, 0.760],
          3e-5: [0.803, 0.826, 0.808], 4e-5: [0.700, 0.730, 0.710],
          5e-5: [0.200, 0.230, 0.210]}


def controlled_process(self, trial, run_dir: Path, slot) -> int:
    """A trial process whose training gives the VALUES above: it writes what a training
    writes for its worker, then decides the race like the real trial process."""
    job = TrialJob.read(run_dir)
    value = VALUES[job.params["train.lr"]][job.seed - 7]
    metrics = {key: value for key in METRIC_KEYS}
    (run_dir / "summary.json").write_text(json.dumps({"best": {"metrics": metrics}}))
    result = TrialResult()
    if job.seeds > 1:
        trial_process._race(trial.study, trial, job, run_dir, result)
    result.write(run_dir)
    return 0


@pytest.fixture
def controlled(monkeypatch):
    monkeypatch.setattr(TrialRunner, "_run_process", controlled_process)


def _sweep(tmp_path, trials: int, spec_text: str = SPEC):
    path = tmp_path / "race.yaml"
    path.write_text(spec_text)
    options = SweepOptions(trials=trials, out=tmp_path / "runs", device="cpu")
    return run_sweep(load_spec(str(path)), options).study


def _by_config(study) -> dict[float, list]:
    groups: dict[float, list] = {}
    for t in study.get_trials(deepcopy=False):
        groups.setdefault(t.params["train.lr"], []).append(t)
    return groups


def test_race_stops_the_worse_configuration_and_gives_the_incumbent_every_seed(
        tmp_path, controlled):
    study = _sweep(tmp_path, trials=3)
    groups = _by_config(study)
    assert set(groups) == {1e-5, 2e-5, 3e-5}  # --trials counts configurations
    seeds = {lr: sorted(t.user_attrs[SEED] for t in ts) for lr, ts in groups.items()}
    # The best configuration got all three seeds, s, s+1, s+2 of its train.seed 7.
    assert seeds[1e-5] == [7, 8, 9]
    # The one worse on every seed was raced out before its third seed.
    assert seeds[2e-5] == [7, 8]
    raced = [t for t in groups[2e-5] if t.user_attrs.get(RACED_OUT)]
    assert [t.user_attrs[SEED] for t in raced] == [8]
    # The close one was not (its differences are within the seed noise): all three seeds.
    assert seeds[3e-5] == [7, 8, 9]
    assert not any(t.user_attrs.get(RACED_OUT) for t in groups[1e-5] + groups[3e-5])
    # Every seed run is a trial of its own, COMPLETE, grouped by its first trial.
    for ts in groups.values():
        first = min(t.number for t in ts)
        assert {t.user_attrs["config_id"] for t in ts} == {first}
        assert all(t.state.name == "COMPLETE" for t in ts)
        assert all(t.user_attrs.get(RESEED_OF) == first for t in ts if t.number != first)
    spend = racing.spend(study, 3)
    assert (spend.spent, spend.fixed, spend.configurations) == (8, 9, 3)


def test_a_first_seed_is_raced_out_once_the_pooled_variance_exists(tmp_path, controlled):
    _sweep(tmp_path, trials=3)
    study = _sweep(tmp_path, trials=1, spec_text=SPEC.replace(
        "  - {train.lr: 3.0e-5}\n", "  - {train.lr: 3.0e-5}\n  - {train.lr: 5.0e-5}\n"))
    hopeless = _by_config(study)[5e-5]
    assert [(t.user_attrs[SEED], t.user_attrs.get(RACED_OUT)) for t in hopeless] == \
        [(7, True)]


def test_the_sweep_prints_configurations_by_mean_and_the_seed_runs_spent(tmp_path,
                                                                          controlled):
    path = tmp_path / "race.yaml"
    path.write_text(SPEC.replace("seeds: 3\n", ""))
    result = runner.invoke(app, ["-q", "sweep", str(path), "--seeds", "3", "--trials", "3",
                                 "--out", str(tmp_path / "runs"), "--device", "cpu",
                                 "--wandb-mode", "disabled"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["trial", "seeds"]
    rows = [line.split() for line in lines[1:4]]
    # Best mean first (1e-5 over 3 seeds), the raced-out configuration last.
    assert [(r[0], r[1]) for r in rows] == [("0", "3"), ("2", "3"), ("1", "2")]
    assert lines[3].endswith("(raced out)")
    assert lines[4] == ("seed runs: 8 spent by racing; the fixed protocol (3 seeds for each "
                        "of the 3 configurations that finished a first seed) would spend 9 "
                        "(11% saved)")
    # `best` reads the raced study: the best mean, its seed run closest to the mean.
    best = runner.invoke(app, ["-q", "best", "--out", str(tmp_path / "runs")])
    assert best.exit_code == 0, best.output
    values = VALUES[1e-5]
    assert best.stdout.splitlines()[0] == (
        "study race: best configuration trial 0 by mean overall/geometric over 3 seeds: "
        f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}")


def test_a_resumed_study_keeps_its_seeds(tmp_path, controlled):
    _sweep(tmp_path, trials=1)
    path = tmp_path / "race.yaml"
    result = runner.invoke(app, ["-q", "sweep", str(path), "--seeds", "2", "--trials", "1",
                                 "--out", str(tmp_path / "runs"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "races each configuration over 3 seed(s), this sweep over 2" in result.output


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "1", "--race-alpha", "0.05"], "--race-alpha goes with --seeds"),
    (["--seeds", "3", "--race-alpha", "1.5"], "--race-alpha must be a number from 0"),
])
def test_bad_racing_options_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["sweep", "loss-weights", "--print", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_the_spec_keys_print_and_load_back(tmp_path):
    result = runner.invoke(app, ["sweep", "loss-weights", "--print", "--seeds", "4",
                                 "--race-alpha", "0.05"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "printed.yaml"
    path.write_text(result.stdout)
    spec = load_spec(str(path))
    assert (spec.seeds, spec.race_alpha) == (4, 0.05)


def _study_with(values: dict[int, list[float]]):
    """An in-memory study whose configuration c (first trial number) has these seed
    values, its later seeds linked like racing links them."""
    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions.FloatDistribution(0, 1)
    firsts = {}
    for config, seeds in values.items():
        for i, value in enumerate(seeds):
            attrs = {SEED: 7 + i} if i == 0 else {SEED: 7 + i, RESEED_OF: firsts[config]}
            study.add_trial(optuna.trial.create_trial(
                params={"x": config / 10}, distributions={"x": dist}, value=value,
                user_attrs=attrs))
            if i == 0:
                firsts[config] = study.trials[-1].number
    return study, firsts


def test_the_seed_paired_test_by_hand():
    from scipy.stats import t as student_t

    # Two configurations on seeds 7, 8, 9. The additive model (configuration + seed)
    # leaves residuals -0.005, 0, 0.005 and 0.005, 0, -0.005: 1e-4 on 6 - 2 - 3 + 1 = 2 df.
    study, firsts = _study_with({1: [0.80, 0.82, 0.81], 2: [0.71, 0.72, 0.70]})
    groups = racing.races(study)
    variance, df = racing.residual_variance(groups.values())
    assert df == 2 and variance == pytest.approx(5e-5)
    # A third configuration after its first seed (7): 0.005 behind the leader there,
    # t = 0.005 / sqrt(2 * 5e-5) = 0.5 on 2 df; 0.05 behind, t = 5.
    go_on = racing.decide(study, config=99, value=0.795, seeds=3, alpha=0.1, seed=7)
    p = student_t.sf(0.5, 2)
    assert go_on.state == racing.CONTINUE and f"p = {p:.3g}" in go_on.note
    out = racing.decide(study, config=99, value=0.75, seeds=3, alpha=0.1, seed=7)
    assert out.state == racing.RACED and f"p = {student_t.sf(5.0, 2):.3g}" in out.note
    assert "+0.0500 behind trial 0 on 1 shared seed" in out.note
    # Minimising, the leader is the lowest mean (2, 0.71): at seed 7 it scored 0.71.
    assert racing.decide(study, config=99, value=0.70, seeds=3, alpha=0.1, seed=7,
                         direction="minimize").state == racing.CONTINUE
    assert racing.decide(study, config=99, value=0.80, seeds=3, alpha=0.1, seed=7,
                         direction="minimize").state == racing.RACED
    # No seed in common with the leader: the two-sample test with the pooled
    # within-configuration variance (1e-4 on 4 df).
    pooled, df = racing.pooled_variance(groups.values())
    assert df == 4 and pooled == pytest.approx(1e-4)
    alone = racing.decide(study, config=99, value=0.795, seeds=3, alpha=0.1, seed=42)
    t = 0.015 / (1e-4 * (1 + 1 / 3)) ** 0.5
    assert alone.state == racing.CONTINUE and f"p = {student_t.sf(t, 4):.3g}" in alone.note


def test_the_sampler_sees_one_trial_per_configuration_valued_by_its_mean():
    study, firsts = _study_with({1: [0.80, 0.82, 0.81], 2: [0.70], 3: [0.60, 0.64]})
    seen = racing.mean_view(study).get_trials(deepcopy=False)
    assert [(t.number, round(t.value, 4)) for t in seen] == \
        [(firsts[1], 0.81), (firsts[2], 0.70), (firsts[3], 0.62)]
    # The study itself is unchanged.
    assert [t.value for t in study.trials][:3] == [0.80, 0.82, 0.81]
    sampler = racing.mean_sampler(optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    view_study = optuna.load_study(study_name=study.study_name, storage=study._storage,
                                   sampler=sampler)
    view_study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(view_study.trials) == 8


def _top_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()[2:]]


@pytest.mark.parametrize("seeds", [3, 1])
def test_best_json_matches_best_top(tmp_path, controlled, seeds):
    spec = SPEC.replace("seeds: 3\n", f"seeds: {seeds}\n")
    _sweep(tmp_path, trials=3, spec_text=spec)
    out = ["--out", str(tmp_path / "runs")]
    top = runner.invoke(app, ["-q", "best", "--top", "2", *out])
    as_json = runner.invoke(app, ["-q", "best", "--top", "2", "--json", *out])
    everything = runner.invoke(app, ["-q", "best", "--json", *out])
    assert top.exit_code == as_json.exit_code == everything.exit_code == 0, as_json.output
    ranking = json.loads(as_json.stdout)
    assert len(ranking) == 2 and json.loads(everything.stdout)[:2] == ranking
    assert len(json.loads(everything.stdout)) == 3
    rows = _top_rows(top.stdout)
    for row, element in zip(rows, ranking):
        assert int(row[0]) == element["trials"][0]
        assert set(element) == {"params", "n_seeds", "seeds", "trials", "mean", "std", "state",
                                "raced_out", "feasible", "representative_trial"}
        values = VALUES[element["params"]["train.lr"]][:element["n_seeds"]]
        assert element["seeds"] == [7 + i for i in range(element["n_seeds"])]
        assert element["mean"]["sst/acc"] == pytest.approx(sum(values) / len(values))
        assert element["raced_out"] is False and element["feasible"] is True
        if seeds == 3:
            assert int(row[1]) == element["n_seeds"] == 3
            assert row[2:5] == [f"{element['mean']['sst/acc']:.4f}", "±",
                                f"{element['std']['sst/acc']:.4f}"]
            assert element["state"] == "complete"
            # The seed run closest to the mean (0.81 of 0.80, 0.82, 0.81: the third).
            assert element["representative_trial"] in element["trials"]
        else:
            assert float(row[1]) == pytest.approx(element["mean"]["sst/acc"], abs=5e-5)
            assert element["std"]["sst/acc"] is None and element["n_seeds"] == 1
    if seeds == 3:
        assert ranking[0]["representative_trial"] == ranking[0]["trials"][2]


def test_best_json_refuses_export(tmp_path):
    result = runner.invoke(app, ["best", "--json", "--export", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--json prints the ranking" in result.output


def test_keep_top_keeps_every_seed_run_of_the_best_configurations_and_no_raced_out_one(
        tmp_path, monkeypatch):
    def with_model(self, trial, run_dir, slot):
        (run_dir / "model").mkdir(exist_ok=True)
        return controlled_process(self, trial, run_dir, slot)

    monkeypatch.setattr(TrialRunner, "_run_process", with_model)
    path = tmp_path / "race.yaml"
    path.write_text(SPEC.replace("  - {train.lr: 3.0e-5}\n",
                                 "  - {train.lr: 3.0e-5}\n  - {train.lr: 4.0e-5}\n"))
    options = SweepOptions(trials=4, out=tmp_path / "runs", device="cpu", keep_top=1)
    study = run_sweep(load_spec(str(path)), options).study
    kept = {lr: sorted(Path(t.user_attrs["checkpoint"]).is_dir() for t in ts)
            for lr, ts in _by_config(study).items()}
    # Only the best configuration by mean keeps its models, all three of them; the
    # raced-out 2e-5 keeps none (its seeds stay in the study, their models go).
    assert kept[1e-5] == [True, True, True]
    assert kept[2e-5] == [False, False] or kept[2e-5] == [False]
    assert not any(kept[3e-5]) and not any(kept[4e-5])


# Real worker processes, real storages, a real SIGKILL; the trials are the stand-in's,
# whose objective is a fixed function of the configuration, the seed and the epoch.
TINY = """name: tiny-race
base:
  train: {seed: 3}
space:
  loss.weights.sst: {type: float, low: 0.5, high: 2.0}
objective: overall/arithmetic
pruner: {name: none}
"""


def _worker(spec: Path, storage: str, study: str, out: Path, encoder: Path, data: Path,
            *extra: str, epochs: int = 1, steps: int = 2):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "mtbert", "-q", "sweep", str(spec), "--study", study,
            "--storage", storage, "--out", str(out), "--data-dir", str(data), "--device", "cpu",
            "--wandb-mode", "disabled", "--heartbeat", "1", "--grace", "2",
            "--set", f"model.encoder={encoder}", "--set", "model.max_length=32",
            "--set", f"data.cache_dir={out}/cache",
            "--set", "data.max_train_examples=0", "--set", "data.max_eval_examples=0",
            "--set", f"train.epochs={epochs}", "--set", f"train.steps_per_epoch={steps}",
            "--set", "train.batch_size=8", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _seed_runs(trials) -> list[tuple[int, int]]:
    """(configuration, seed) of every seed run that did not fail."""
    return sorted((racing.config_of(t), t.user_attrs["seed"]) for t in trials
                  if t.state.name != "FAIL")


def _stub_value(trial, epochs: int = 1, behaviour: dict | None = None) -> float:
    """The objective the stand-in gives the trial's configuration and seed after `epochs`
    epochs (its best: the stand-in's values rise over the epochs)."""
    return stub_metrics(trial.params, trial.user_attrs[SEED], epochs - 1,
                        behaviour or {})["overall/arithmetic"]


# Two configurations, one per worker, with seed values that are not configuration + seed
# effect exactly (the stand-in's own values are, which leaves the paired test no residual
# variance: any difference on two shared seeds would race a configuration out).
TWO = TINY + "enqueue:\n  - {loss.weights.sst: 0.5}\n  - {loss.weights.sst: 2.0}\n"
TWO_VALUES = {"key": "loss.weights.sst", "first_seed": 3, "0.5": [0.60, 0.63, 0.61],
              "2.0": [0.58, 0.64, 0.60]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_on_one_postgresql_raced_study_never_run_a_seed_twice(
        tiny_encoder, task_dir, tmp_path, monkeypatch):
    import uuid

    from conftest import POSTGRES_URL, postgres_unreachable
    from mtbert.studies.storage import with_driver

    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    use_stub_trials(monkeypatch, epoch_s=0.5, values=TWO_VALUES)  # the workers' trials overlap
    spec = tmp_path / "tiny-race.yaml"
    spec.write_text(TWO)
    study = f"race-{uuid.uuid4().hex[:8]}"
    try:
        # Level 0 races nothing out: every configuration gets its three seeds.
        workers = [_worker(spec, POSTGRES_URL, study, tmp_path / "runs", tiny_encoder,
                           task_dir, "--trials", "1", "--seeds", "3", "--race-alpha", "0")
                   for _ in range(2)]
        for w in workers:
            _, err = w.communicate(timeout=600)
            assert w.returncode == 0, err
        trials = optuna.load_study(study_name=study, storage=with_driver(POSTGRES_URL)).trials
    finally:
        if study in optuna.study.get_all_study_names(with_driver(POSTGRES_URL)):
            optuna.delete_study(study_name=study, storage=with_driver(POSTGRES_URL))
    runs = _seed_runs(trials)
    assert len(runs) == len(set(runs)) == 6  # 2 configurations x 3 seeds, none twice
    configs = {c for c, _ in runs}
    assert len(configs) == 2
    assert sorted(t.params["loss.weights.sst"] for t in trials) == [0.5] * 3 + [2.0] * 3
    assert all(sorted(s for c2, s in runs if c2 == c) == [3, 4, 5] for c in configs)
    assert all(t.state.name == "COMPLETE" for t in trials)
    # Each seed run trained its own seed (train.seed) of its configuration.
    controlled = {"values": TWO_VALUES}
    assert [t.value for t in trials] == [pytest.approx(_stub_value(t, behaviour=controlled))
                                         for t in trials]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_workers_seed_is_retried_and_reseed_continues_the_seeds(
        tiny_encoder, task_dir, tmp_path, monkeypatch):
    import signal
    import time

    from conftest import wait_for

    spec = tmp_path / "tiny-race.yaml"
    spec.write_text(TINY)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    out = tmp_path / "runs"
    # A level no race reaches: the stand-in's configurations differ by far more than its
    # seeds, which could race the second one out after its first seed; it gets both here.
    args = ("--trials", "1", "--seeds", "2", "--race-alpha", "1e-9")
    use_stub_trials(monkeypatch, epoch_s=1.0)  # killed in its second seed's second epoch
    doomed = _worker(spec, storage, "race", out, tiny_encoder, task_dir, *args, epochs=3,
                     steps=40)
    second = out / "race" / "trial-0001"  # the configuration's second seed run
    wait_for(lambda: (second / "metrics.jsonl").exists() and (second / "resume.pt").exists()
             or doomed.poll() is not None,
             timeout=300, what="the second seed's first epoch")
    assert doomed.poll() is None, doomed.communicate()[1]
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    time.sleep(2.5)  # past --grace: the seed run's heartbeat is stale
    use_stub_trials(monkeypatch)  # nothing more to stop: epochs take no time
    later = _worker(spec, storage, "race", out, tiny_encoder, task_dir, *args, epochs=3,
                    steps=40)
    _, err = later.communicate(timeout=600)
    assert later.returncode == 0, err
    trials = optuna.load_study(study_name="race", storage=storage).trials
    killed = trials[1]
    assert killed.state.name == "FAIL" and killed.user_attrs[RESEED_OF] == 0
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.state.name == "COMPLETE"
    assert (retry.user_attrs[RESEED_OF], retry.user_attrs[SEED]) == (0, 4)
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    # The resumed seed run ends as an uninterrupted one of its configuration and seed.
    assert retry.value == pytest.approx(_stub_value(retry, epochs=3))
    assert [s for c, s in _seed_runs(trials) if c == 0] == [3, 4]

    # `best --reseed` continues after the race's seeds, in the same configuration.
    result = runner.invoke(app, ["-q", "best", "--storage", storage, "--study", "race",
                                 "--out", str(out), "--reseed", "1", "--top", "1",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    runs = _seed_runs(optuna.load_study(study_name="race", storage=storage).trials)
    reseeded = [c for c, s in runs if s == 5]
    assert len(reseeded) == 1 and len(runs) == 5  # one new seed run: the third seed
    assert [s for c, s in runs if c == reseeded[0]] == [3, 4, 5]
    ranking = json.loads(runner.invoke(app, ["-q", "best", "--storage", storage, "--study",
                                             "race", "--json"]).stdout)
    assert sorted(e["seeds"] for e in ranking) == [[3, 4], [3, 4, 5]]


def test_the_report_shows_the_raced_configurations_and_marks_the_raced_out(tmp_path,
                                                                           controlled):
    _sweep(tmp_path, trials=3)
    dest = tmp_path / "report"
    result = runner.invoke(app, ["-q", "report", "--out", str(tmp_path / "runs"),
                                 "--to", str(dest)])
    assert result.exit_code == 0, result.output
    page = (dest / "index.html").read_text()
    assert (dest / "seeds.png").stat().st_size > 1000
    seeds_table = page[page.index('<table id="seeds">'):]
    seeds_table = seeds_table[:seeds_table.index("</table>")]
    rows = seeds_table.split("<tr>")[2:]
    assert [r.split("</td>")[0].removeprefix("<td>") for r in rows] == ["0", "2", "1"]
    assert "<td>raced out</td>" in rows[2] and "<td>complete</td>" in rows[0]
    assert "trial 1 with seed 8: raced out" in page


def test_racing_with_two_trials_at_once_runs_no_seed_twice(tmp_path, controlled):
    path = tmp_path / "race.yaml"
    path.write_text(SPEC)
    options = SweepOptions(trials=3, out=tmp_path / "runs", device="cpu", trials_per_gpu=2)
    study = run_sweep(load_spec(str(path)), options).study
    runs = [(racing.config_of(t), t.user_attrs[SEED]) for t in study.trials]
    assert len(runs) == len(set(runs)) and all(t.state.name == "COMPLETE" for t in study.trials)
    seeds = {lr: sorted(t.user_attrs[SEED] for t in ts) for lr, ts in _by_config(study).items()}
    # Whether 2e-5 is raced out depends on which seeds finished first; every
    # configuration's seeds are still s, s+1, ... and the best one has all three.
    assert seeds[1e-5] == [7, 8, 9]
    assert all(s == [7, 8, 9][:len(s)] for s in seeds.values())


def test_a_raced_worker_takes_seed_runs_and_starts_exactly_its_configurations(tmp_path):
    from mtbert.studies.optuna_api import shared_storage
    from mtbert.studies.storage import open_storage
    from mtbert.studies.worker import NextTrial

    url = f"sqlite:///{tmp_path / 'queue.db'}"
    storage = shared_storage(open_storage(url))  # as the worker holds it
    study = optuna.create_study(study_name="queue", storage=storage)
    study_id = storage.get_study_id_from_name("queue")
    study.enqueue_trial({"x": 1.0})  # a configuration queued (a spec's `enqueue:`)
    study.enqueue_trial({"x": 2.0}, user_attrs={RESEED_OF: 7, SEED: 8})  # a seed run
    study.enqueue_trial({"x": 3.0}, user_attrs={RESEED_OF: 7, SEED: 9})
    # A worker that started its one configuration takes the seed runs, not the queued
    # configuration, and then draws none: nothing is created.
    done = NextTrial(configurations=1, started=1)
    assert [done(study, storage, study_id).number for _ in range(2)] == [1, 2]
    assert done(study, storage, study_id) is None
    assert len(study.trials) == 3 and done.started == 1
    # A worker with two configurations to start takes the queued one, draws one more,
    # and stops there.
    fresh = NextTrial(configurations=2)
    other = optuna.load_study(study_name="queue", storage=storage)
    assert [fresh(other, storage, study_id).number for _ in range(2)] == [0, 3]
    assert fresh(other, storage, study_id) is None
    assert len(other.trials) == 4 and fresh.started == 2
    # A reseed draws nothing; a plain worker draws once the queue is empty.
    assert NextTrial(sample=False)(other, storage, study_id) is None
    assert NextTrial()(other, storage, study_id).number == 4
