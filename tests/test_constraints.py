"""Constraints on metrics (`constraints:`, `--baseline`) and warm starts (`--warm-start`):
parsing, a baseline read from a real compare JSON, the ranking of feasible trials only,
sweeps (stand-in trial processes, tests/stub_trial.py) with an impossible and a loose
bound, and an earlier study's best configurations queued first, once."""

import json
import logging

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.compare import Comparison, SeedResult
from mtbert.config import build_config, save_config
from mtbert.errors import ConfigError
from mtbert.studies.constraints import (parse_constraint, resolve_constraints,
                                        store_constraints, study_constraints)
from mtbert.studies.job import (FEASIBLE, RESEED_OF, SEED, STUDY_CONSTRAINTS,
                                STUDY_OBJECTIVES)
from mtbert.studies.runner import SweepOptions, create_study
from mtbert.studies.samplers import make_sampler, trials_record_constraints
from mtbert.studies.spec import load_spec
from mtbert.tasks import METRIC_KEYS

from conftest import tiny_sweep_args
from stub_trial import stub_metrics

runner = CliRunner()
SPACE = ("space:\n  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
         "  model.dropout: {type: float, low: 0.0, high: 0.3}\n")


def _spec(tmp_path, name, *extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n{SPACE}pruner: {{name: none}}\n" + "".join(extra))
    return path


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, key, op, threshold, delta", [
    ("sst/acc >= 0.5", "sst/acc", ">=", 0.5, 0.0),
    ("sts/pearson<=-0.25", "sts/pearson", "<=", -0.25, 0.0),
    ("qqp/acc >= baseline", "qqp/acc", ">=", None, 0.0),
    ("sst/acc >= baseline - 0.01", "sst/acc", ">=", None, -0.01),
    ("overall/geometric <= baseline + 2e-2", "overall/geometric", "<=", None, 0.02),
])
def test_constraints_parse(text, key, op, threshold, delta):
    c = parse_constraint(text)
    assert (c.text, c.key, c.op, c.threshold, c.delta) == (text, key, op, threshold, delta)


@pytest.mark.parametrize("text, why", [
    ("sst/acc > 0.5", "no KEY, >= or <=, and VALUE"),
    ("sst/accuracy >= 0.5", "'sst/accuracy' is not a metric key"),
    ("sst/acc >= high", "'high' is not a number"),
    ("sst/acc >= nan", "'nan' is not a finite number"),
    ("sst/acc >= baseline * 2", "'baseline * 2' is not baseline, baseline + DELTA or "
     "baseline - DELTA"),
    ("sst/acc >= baseline - x", "'x' is not a number"),
])
def test_a_bad_constraint_is_one_line_naming_it_the_form_and_the_keys(tmp_path, text, why):
    with pytest.raises(ConfigError) as err:
        parse_constraint(text)
    assert why in str(err.value)
    spec = _spec(tmp_path, "bad", f"constraints: [{json.dumps(text)}]\n")
    result = runner.invoke(app, ["sweep", str(spec), "--print"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert f"constraints: bad constraint {text!r}: {why}" in line
    assert '"KEY >= VALUE" or "KEY <= VALUE"' in line and ", ".join(METRIC_KEYS) in line


def test_baseline_without_baseline_file_exits_2_before_the_study_exists(tmp_path):
    spec = _spec(tmp_path, "rel", 'constraints: ["sst/acc >= baseline - 0.01"]\n')
    out = tmp_path / "runs"
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--wandb-mode",
                                 "disabled"])
    assert result.exit_code == 2
    assert "pass --baseline FILE" in result.stderr and "sst/acc >= baseline - 0.01" in \
        result.stderr
    assert not (out / "mtbert.db").exists()


# ---------------------------------------------------------------- the baseline

def _compare_json(tmp_path, *, max_train=0, epochs=3, sts_done=True) -> tuple:
    """A compare.json as `mtbert compare individual multitask --seeds 2` writes it, with
    run directories holding their config.yaml."""
    out = tmp_path / "cmp"
    runs = {"individual": {}, "multitask": {}}
    values = {"individual": [(0.40, 0.70, 0.30), (0.44, 0.74, 0.34)],
              "multitask": [(0.36, 0.71, 0.31), (0.39, 0.77, 0.36)]}
    for config, rows in values.items():
        for seed, (sst, qqp, sts) in enumerate(rows):
            run_dir = out / config / f"seed{seed}"
            for task in (("sst", "qqp", "sts") if config == "individual" else ("",)):
                (run_dir / task).mkdir(parents=True, exist_ok=True)
                save_config(build_config({"data": {"max_train_examples": max_train},
                                          "train": {"epochs": epochs, "seed": seed}}),
                            run_dir / task / "config.yaml")
            metrics = {"sst/acc": sst, "qqp/acc": qqp}
            if sts_done:
                metrics["sts/pearson"] = sts
            runs[config][seed] = SeedResult("done", metrics, str(run_dir))
    result = Comparison("cmp", ["individual", "multitask"], "individual", [0, 1],
                        "overall/geometric", runs)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.json"
    path.write_text(json.dumps(result.to_json(), indent=2))
    return path


def test_baseline_is_the_mean_of_the_compare_baseline_config(tmp_path, caplog):
    path = _compare_json(tmp_path)
    base = load_spec(str(_spec(tmp_path, "s"))).base_values  # data.max_train_examples 0, 3 epochs
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        resolved = resolve_constraints(["sst/acc >= baseline - 0.01", "qqp/acc <= baseline",
                                        "sts/pearson >= baseline + 0.02",
                                        "overall/arithmetic >= 0.25"], path, base)
    assert [c.threshold for c in resolved] == pytest.approx([0.41, 0.72, 0.34, 0.25])
    assert [c.key for c in resolved] == ["sst/acc", "qqp/acc", "sts/pearson",
                                         "overall/arithmetic"]
    assert not [r for r in caplog.records if r.name == "mtbert"]  # same caps and epochs


def test_a_baseline_with_other_caps_or_epochs_warns(tmp_path, caplog):
    path = _compare_json(tmp_path, max_train=200, epochs=1)
    base = load_spec(str(_spec(tmp_path, "s"))).base_values
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        resolve_constraints(["sst/acc >= baseline"], path, base)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "mtbert"]
    assert "data.max_train_examples 200 vs 0" in warning and "train.epochs 1 vs 3" in warning
    assert "data.max_eval_examples" not in warning


def test_a_baseline_missing_the_metric_or_not_a_compare_json_is_bad_input(tmp_path):
    path = _compare_json(tmp_path, sts_done=False)
    base = load_spec(str(_spec(tmp_path, "s"))).base_values
    with pytest.raises(ConfigError, match="baseline config 'individual' .* has no "
                                          "sts/pearson"):
        resolve_constraints(["sts/pearson >= baseline"], path, base)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": {}}))
    with pytest.raises(ConfigError, match="is not a `mtbert compare` JSON"):
        resolve_constraints(["sst/acc >= baseline"], other, base)


# ---------------------------------------------------------------- ranking

DISTRIBUTIONS = {"train.lr": FloatDistribution(1e-6, 1.0, log=True),
                 "model.dropout": FloatDistribution(0.0, 0.5),
                 "train.batch_size": IntDistribution(4, 64)}


def _add(study, value, params, reseed_of=None, **metrics):
    reseed = {} if reseed_of is None else {RESEED_OF: reseed_of, SEED: 1}
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, values=[value], params=params,
        distributions={k: DISTRIBUTIONS[k] for k in params},
        user_attrs={"overall/geometric": value, **metrics, "run_dir": "/nowhere", **reseed}))


def _ranked_study(tmp_path, constraints: list[str]):
    url = f"sqlite:///{tmp_path}/mtbert.db"
    study = optuna.create_study(study_name="ranked", storage=url, direction="maximize")
    study.set_user_attr(STUDY_OBJECTIVES, ["overall/geometric"])
    store_constraints(study, resolve_constraints(constraints, None, {}))
    _add(study, 0.9, {"train.lr": 1e-4}, **{"sst/acc": 0.30})  # best value, infeasible
    _add(study, 0.8, {"train.lr": 2e-4}, **{"sst/acc": 0.60})
    _add(study, 0.7, {"train.lr": 3e-4}, **{"sst/acc": 0.55})
    _add(study, 0.6, {"train.lr": 4e-4})  # no sst/acc recorded: infeasible
    return study


def test_best_ranks_feasible_trials_only_and_counts_the_others(tmp_path):
    _ranked_study(tmp_path, ["sst/acc >= 0.5"])
    best = runner.invoke(app, ["-q", "best", "--out", str(tmp_path)])
    assert best.exit_code == 0, best.output
    lines = best.stdout.splitlines()
    assert lines[0] == "study ranked: best trial 1"
    assert lines[1] == ("  2 of 4 complete trials infeasible, not ranked (sst/acc >= "
                        "0.5000)")
    top = runner.invoke(app, ["best", "--out", str(tmp_path), "--top", "10"])
    assert top.exit_code == 0, top.output
    rows = top.stdout.splitlines()
    assert rows[0] == ("study ranked: top 2 of 2 feasible complete trials by "
                       "overall/geometric")
    assert [int(r.split()[0]) for r in rows[2:]] == [1, 2]
    assert "2 of 4 complete trials infeasible" in top.stderr


def test_without_constraints_the_same_trials_rank_as_before(tmp_path):
    _ranked_study(tmp_path, [])
    top = runner.invoke(app, ["-q", "best", "--out", str(tmp_path), "--top", "10"])
    assert top.exit_code == 0, top.output
    rows = top.stdout.splitlines()
    assert rows[0] == "study ranked: top 4 of 4 complete trials by overall/geometric"
    assert [int(r.split()[0]) for r in rows[2:]] == [0, 1, 2, 3]


def test_no_feasible_trial_best_is_one_line_exit_1(tmp_path):
    _ranked_study(tmp_path, ["sst/acc >= 0.99"])
    for extra in ([], ["--top", "3"]):
        result = runner.invoke(app, ["best", "--out", str(tmp_path), *extra])
        assert result.exit_code == 1
        assert result.stderr == ("mtbert: error: study ranked: none of its 4 complete trials "
                                 "meets the constraints (sst/acc >= 0.9900)\n")
        assert result.stdout == ""


def test_configurations_over_seeds_are_feasible_by_their_means(tmp_path):
    url = f"sqlite:///{tmp_path}/mtbert.db"
    study = optuna.create_study(study_name="seeds", storage=url, direction="maximize")
    study.set_user_attr(STUDY_OBJECTIVES, ["overall/geometric"])
    store_constraints(study, resolve_constraints(["sst/acc >= 0.5"], None, {}))
    # Configuration 0: one seed below the bound, its mean above it; configuration 2: the
    # best mean, its sst/acc mean below the bound; configuration 4: feasible on both.
    for value, sst, origin, lr in ((0.80, 0.56, None, 1e-4), (0.78, 0.46, 0, 1e-4),
                                   (0.90, 0.45, None, 2e-4), (0.88, 0.53, 2, 2e-4),
                                   (0.70, 0.60, None, 3e-4), (0.72, 0.62, 4, 3e-4)):
        _add(study, value, {"train.lr": lr}, reseed_of=origin, **{"sst/acc": sst})
    top = runner.invoke(app, ["best", "--out", str(tmp_path), "--top", "5"])
    assert top.exit_code == 0, top.output
    rows = top.stdout.splitlines()
    assert rows[0] == ("study seeds: top 2 of 2 feasible reseeded configurations by mean "
                       "overall/geometric over their seeds (mean ± std)")
    assert [r.split()[:2] for r in rows[2:]] == [["0", "2"], ["4", "2"]]
    assert "1 of 3 reseeded configurations infeasible, not ranked (sst/acc >= 0.5000)" in \
        top.stderr
    best = runner.invoke(app, ["-q", "best", "--out", str(tmp_path)])
    assert best.stdout.splitlines()[0] == ("study seeds: best configuration trial 0 by mean "
                                           "overall/geometric over 2 seeds: 0.7900 ± 0.0141")


def test_report_marks_infeasible_trials(tmp_path):
    _ranked_study(tmp_path, ["sst/acc >= 0.5"])
    result = runner.invoke(app, ["-q", "report", "--out", str(tmp_path), "--to",
                                 str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text()
    rows = [line for line in page.splitlines() if line.startswith("<tr class=")]
    classes = [line.split('"')[1] for line in rows]
    assert classes == ["COMPLETE infeasible", "COMPLETE best", "COMPLETE",
                       "COMPLETE infeasible"]
    assert "infeasible, misses sst/acc &gt;= 0.5000" in rows[0]
    assert "<b>2</b> of 4 complete trials infeasible" in page
    assert "best: trial <b>1</b>" in page


def test_a_study_with_trials_refuses_other_constraints(tmp_path):
    study = _ranked_study(tmp_path, ["sst/acc >= 0.5"])
    with pytest.raises(ConfigError, match="other constraints .*sst/acc >= 0.5000.* than these "
                                          r"\(sst/acc >= 0.6000\)"):
        store_constraints(study, resolve_constraints(["sst/acc >= 0.6"], None, {}))
    store_constraints(study, resolve_constraints(["sst/acc >= 0.5"], None, {}))  # the same
    assert [c.threshold for c in study_constraints(study)] == [0.5]


def _constraint_values(trial) -> list[float]:
    """The constraint values Optuna's samplers read: recorded on the trial (Optuna 5), or
    computed by the sampler's constraints_func (before)."""
    if trials_record_constraints():
        return list(trial.constraints.values())
    return list(trial.system_attrs["constraints"])


def test_constraints_reach_the_samplers_that_take_them(caplog):
    def gaps(trial):
        return [0.0]

    # From Optuna 5 on the trial records its constraint values (the sampler argument is
    # deprecated there); before, the sampler computes them with the function.
    expected = None if trials_record_constraints() else gaps
    assert make_sampler({"name": "tpe", "seed": 0}, gaps)._constraints_func is expected
    assert make_sampler({"name": "nsga2", "seed": 0}, gaps)._constraints_func is expected
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        sampler = make_sampler({"name": "random", "seed": 0}, gaps)
    assert isinstance(sampler, optuna.samplers.RandomSampler)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "mtbert"]
    assert "sampler random ignores constraints" in warning


@pytest.mark.slow
def test_sweeps_with_an_impossible_and_a_loose_bound(stub_trials, tiny_encoder, task_dir,
                                                     tmp_path):
    out = tmp_path / "runs"
    for name, bound in (("impossible", "sst/acc >= 1.01"), ("loose", "sst/acc >= 0.0")):
        spec = _spec(tmp_path, name, f'constraints: ["{bound}"]\n')
        result = runner.invoke(app, tiny_sweep_args(spec, tiny_encoder, task_dir, out, 2))
        assert result.exit_code == 0, result.output  # an infeasible sweep ran: exit 0
        trials = optuna.load_study(study_name=name,
                                   storage=f"sqlite:///{out}/mtbert.db").trials
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
        assert [t.user_attrs[FEASIBLE] for t in trials] == [name == "loose"] * 2
        # The metric bounded is the trial's own (the stand-in's sst/acc after its epoch).
        assert [t.user_attrs["sst/acc"] for t in trials] == [
            pytest.approx(stub_metrics(t.params, 0, 0, {})["sst/acc"]) for t in trials]
        # What TPE learns from: each trial's gap to the bound (<= 0 feasible)
        assert [_constraint_values(t) for t in trials] == [
            pytest.approx([(1.01 if name == "impossible" else 0.0) - t.user_attrs["sst/acc"]])
            for t in trials]
        best = runner.invoke(app, ["best", "--out", str(out), "--study", name])
        if name == "impossible":
            assert result.stdout.splitlines()[1:] == []  # the table: a header, no row
            assert best.exit_code == 1 and best.stderr.count("\n") == 1
            assert "none of its 2 complete trials meets the constraints (sst/acc >= " \
                   "1.0100)" in best.stderr
        else:
            assert len(result.stdout.splitlines()) == 3
            assert best.exit_code == 0, best.output
            assert "infeasible" not in best.stdout
        stored = optuna.load_study(study_name=name,
                                   storage=f"sqlite:///{out}/mtbert.db").user_attrs
        assert stored[STUDY_CONSTRAINTS][0]["threshold"] == (1.01 if name == "impossible"
                                                              else 0.0)


# ---------------------------------------------------------------- warm start

def _earlier_study(url: str):
    """An earlier study: its best trial infeasible, then configurations that fit the new
    space, one with a parameter the new space lacks, one outside its range."""
    study = optuna.create_study(study_name="small", storage=url, direction="maximize")
    store_constraints(study, resolve_constraints(["sst/acc >= 0.5"], None, {}))
    _add(study, 0.95, {"train.lr": 3e-4, "model.dropout": 0.15}, **{"sst/acc": 0.2})
    _add(study, 0.90, {"train.lr": 5e-4, "model.dropout": 0.1, "train.batch_size": 16},
         **{"sst/acc": 0.6})
    _add(study, 0.85, {"train.lr": 5e-2, "model.dropout": 0.1}, **{"sst/acc": 0.6})
    _add(study, 0.80, {"train.lr": 1e-4, "model.dropout": 0.2}, **{"sst/acc": 0.6})
    _add(study, 0.70, {"train.lr": 2e-4, "model.dropout": 0.0}, **{"sst/acc": 0.6})
    return study


def _waiting(url: str, name: str) -> list[dict]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t.system_attrs["fixed_params"] for t in study.trials
            if t.state == TrialState.WAITING]


def test_warm_start_queues_the_best_that_fit_first_and_once(tmp_path, caplog):
    out = tmp_path / "runs"
    out.mkdir()
    url = f"sqlite:///{out}/mtbert.db"
    _earlier_study(url)
    spec = load_spec(str(_spec(tmp_path, "big",
                               "enqueue:\n  - {train.lr: 3.0e-5, model.dropout: 0.05}\n")))
    options = SweepOptions(out=out, study="big", warm_start="small", warm_top=3)
    with caplog.at_level(logging.INFO, logger="mtbert"):
        create_study(spec, options)
    logs = [r.getMessage() for r in caplog.records if r.name == "mtbert"]
    # The 3 best feasible: trials 1, 2, 3; trial 2's learning rate is outside the new space.
    assert _waiting(url, "big") == [{"train.lr": 5e-4, "model.dropout": 0.1},
                                    {"train.lr": 1e-4, "model.dropout": 0.2},
                                    {"train.lr": 3e-5, "model.dropout": 0.05}]
    assert "warm start: trial 1 of study small: train.batch_size dropped, not in the space " \
           "of big" in logs
    assert any(line.startswith("warm start: trial 2 of study small skipped") and
               "train.lr: 0.05 is outside [1e-05, 0.001]" in line for line in logs)
    assert "warm start from study small: 2 of its 3 best configurations queued, 0 in the " \
           "study already, 1 skipped" in logs
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtbert"):
        create_study(spec, options)  # the same command again
    assert len(_waiting(url, "big")) == 3
    assert "warm start from study small: 0 of its 3 best configurations queued, 2 in the " \
           "study already, 1 skipped" in [r.getMessage() for r in caplog.records]


@pytest.mark.slow
def test_warm_start_from_another_storage_runs_its_best_first(stub_trials, tiny_encoder,
                                                               task_dir, tmp_path):
    earlier = f"sqlite:///{tmp_path}/earlier.db"
    _earlier_study(earlier)
    out = tmp_path / "runs"
    spec = _spec(tmp_path, "big")
    args = tiny_sweep_args(spec, tiny_encoder, task_dir, out, 1, "--warm-start", "small",
                           "--warm-storage", earlier, "--warm-top", "1")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    [trial] = optuna.load_study(study_name="big", storage=f"sqlite:///{out}/mtbert.db").trials
    assert trial.state.name == "COMPLETE"
    assert trial.params == {"train.lr": 5e-4, "model.dropout": 0.1}
    missing = runner.invoke(app, [*args[:-6], "--warm-start", "nope", "--warm-storage",
                                  earlier])
    assert missing.exit_code == 2
    assert "no study 'nope' in this storage; studies: small" in missing.stderr


@pytest.mark.parametrize("mean", ["NaN", "1e999", '"abc"', "7"])
def test_a_baseline_mean_that_is_no_score_is_one_line_and_nothing_is_stored(tmp_path, mean):
    path = _compare_json(tmp_path)
    data = json.loads(path.read_text())
    data["summary"]["individual"]["sst/acc"]["mean"] = "@"
    path.write_text(json.dumps(data).replace('"@"', mean))
    spec = tmp_path / "c.yaml"
    spec.write_text("space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\n"
                    "constraints: [\"sst/acc >= baseline - 0.01\"]\n")
    result = runner.invoke(app, ["sweep", str(spec), "--baseline", str(path), "--out",
                                 str(tmp_path / "runs"), "--wandb-mode", "disabled"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a number between -1 and 1" in lines[0]
    assert not (tmp_path / "runs" / "mtbert.db").exists()


def test_seeds_have_an_upper_bound(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\n"
                    "seeds: 10000000000000000000000000000000000000000\n")
    result = runner.invoke(app, ["sweep", str(spec), "--print"])
    assert result.exit_code == 2
    assert "seeds must be a whole number from 1 to 100, got 1000000000" in result.stderr
