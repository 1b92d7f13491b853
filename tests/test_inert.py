"""`mtbert sweep SPEC --check`: settings a spec searches that cannot change the model,
and conditional parameters (`when:`) with several values or alternatives."""

import json

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.errors import ConfigError
from mtbert.studies.enqueue import check_configuration
from mtbert.studies.inert import check_spec
from mtbert.studies.spec import load_spec, shipped_specs, suggest

runner = CliRunner()

# The strategies spec as it shipped before the check: every schedule x every loss method.
OLD_STRATEGIES = """\
name: old-strategies
base:
  train.epochs: 2
  train.steps_per_epoch: 50
space:
  train.schedule:
    type: categorical
    choices: [round_robin_batch, proportional, annealed, temperature, sequential,
              round_robin_epoch, smart_round_robin, triple_batch]
  train.alpha: {type: float, low: 0.0, high: 1.0, when: {train.schedule: proportional}}
  train.alpha_shape: {type: categorical, choices: [linear, cosine], when: {train.schedule: annealed}}
  train.temperature: {type: float, low: 1.0, high: 10.0, log: true, when: {train.schedule: temperature}}
  loss.method:
    type: categorical
    choices: [sum, weighted, uncertainty, liebel, dwa, gradnorm, pcgrad]
  loss.weights.sts: {type: float, low: 0.2, high: 5.0, log: true, when: {loss.method: weighted}}
"""


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    return path


def _findings(tmp_path, body: str):
    findings, _ = check_spec(load_spec(str(_spec(tmp_path, body))))
    return findings


@pytest.mark.parametrize("size", ["cpu", "gpu"])
@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_every_shipped_spec_passes_the_check_at_both_sizes(name, size):
    findings, combinations = check_spec(load_spec(name, size=size))
    assert [f.line() for f in findings] == []
    assert combinations >= 1


def test_the_old_strategies_spec_is_named_for_every_kind_of_dead_setting(tmp_path):
    findings = _findings(tmp_path, OLD_STRATEGIES)
    lines = [f.line() for f in findings]
    kinds = {(f.parameter, f.kind) for f in findings}
    # gradient methods on one-task steps: the plain sum
    assert ("loss.method: gradnorm has no two tasks to balance on one-task steps: it trains "
            "the model of sum (where train.schedule=sequential, loss.method=gradnorm)") in lines
    # a weight on one-task steps under clipping acts only below a threshold
    assert ("loss.weights.sts", "threshold") in kinds
    assert any(f.parameter == "loss.weights.sts" and dict(f.where)["train.schedule"] ==
               "round_robin_batch" for f in findings if f.kind == "threshold")
    # DWA never sets its weights in 2 epochs
    assert any("dwa sets its weights after two epochs; a run of 2 epochs x 50 steps ends "
               "first" in line for line in lines)
    # the shape of the annealing never shows at 2 epochs
    assert ("train.alpha_shape", "ignored") in kinds
    # two names of one model
    duplicates = {f.message.split(" train one model")[0] for f in findings
                  if f.kind == "duplicate"}
    assert duplicates == {"proportional and temperature", "round_robin_batch and triple_batch"}
    assert sum(f.kind == "duplicate" for f in findings) == 3  # under gradnorm, under pcgrad


def test_the_old_strategies_spec_fails_the_cli_check_and_json_lists_the_findings(tmp_path):
    path = _spec(tmp_path, OLD_STRATEGIES)
    result = runner.invoke(app, ["sweep", str(path), "--check"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(set(lines)) > 10
    assert "findings in 63 reachable combinations" in result.stderr
    listed = runner.invoke(app, ["sweep", str(path), "--check", "--json"])
    assert listed.exit_code == 1
    findings = json.loads(listed.stdout)
    assert len(findings) == len(lines)
    assert set(findings[0]) == {"parameter", "kind", "message", "where"}
    assert {f["kind"] for f in findings} == {"ignored", "threshold", "duplicate"}


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_a_shipped_spec_passes_the_cli_check_with_exit_0(size):
    result = runner.invoke(app, ["sweep", "strategies", "--check", "--size", size])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "spec strategies: no findings in 27 reachable combinations" in result.stderr
    listed = runner.invoke(app, ["sweep", "strategies", "--check", "--json", "--size", size])
    assert (listed.exit_code, json.loads(listed.stdout)) == (0, [])


def test_json_without_check_is_a_usage_error():
    result = runner.invoke(app, ["sweep", "strategies", "--json"])
    assert result.exit_code == 2
    assert "--json goes with --check" in result.stderr


def test_all_task_weights_searched_spend_a_dimension_on_their_scale(tmp_path):
    body = ("base: {train.schedule: triple_batch, loss.method: weighted}\nspace:\n" +
            "".join(f"  loss.weights.{t}: {{type: float, low: 0.1, high: 10, log: true}}\n"
                    for t in ("sst", "qqp", "sts")))
    findings = _findings(tmp_path, body)
    assert [(f.parameter, f.kind) for f in findings] == [("loss.weights", "scale")]
    # Two of them, as ratios to the third: nothing to report.
    assert _findings(tmp_path, body.rsplit("  loss.weights.sts", 1)[0]) == []


def test_weights_on_one_task_steps_are_reported_only_while_clipping(tmp_path):
    body = ("base: {loss.method: weighted, optim.max_grad_norm: %s}\nspace:\n"
            "  loss.weights.sts: {type: float, low: 0.1, high: 10, log: true}\n")
    clipped = _findings(tmp_path, body % 1.0)
    assert [(f.parameter, f.kind) for f in clipped] == [("loss.weights.sts", "threshold")]
    assert "optim.max_grad_norm 1.0" in clipped[0].message
    assert _findings(tmp_path, body % 0) == []


def test_a_frozen_encoder_makes_its_learning_rates_inert(tmp_path):
    body = ("space:\n  optim.freeze: {type: categorical, choices: [none, encoder]}\n"
            "  optim.unfreeze_after: {type: int, low: 0, high: 1, when: {optim.freeze: encoder}}\n"
            "  optim.layer_decay: {type: float, low: 0.7, high: 1.0%s}\n")
    findings = _findings(tmp_path, body % "")
    assert [f.line() for f in findings] == [
        "optim.layer_decay: the encoder is frozen for the whole run (where optim.freeze=encoder, "
        "optim.unfreeze_after=0)"]
    guarded = ", when: [{optim.freeze: none}, {optim.unfreeze_after: 1}]"
    assert _findings(tmp_path, body % guarded) == []


def test_keys_of_other_schedules_and_methods_are_named_with_their_readers(tmp_path):
    body = ("base: {train.schedule: round_robin_batch}\nspace:\n"
            "  train.alpha: {type: float, low: 0, high: 1}\n"
            "  loss.gradnorm_alpha: {type: float, low: 0.5, high: 2}\n")
    lines = [f.line() for f in _findings(tmp_path, body)]
    assert lines == [
        "train.alpha: read only by train.schedule proportional (where "
        "train.schedule=round_robin_batch)",
        "loss.gradnorm_alpha: read only by loss.method gradnorm (where loss.method=sum)"]


def test_dwa_over_windows_of_steps_acts_in_two_epochs(tmp_path):
    body = ("base: {train.schedule: triple_batch, train.epochs: 2, train.steps_per_epoch: 10, "
            "loss.dwa_window: %d}\n"
            "space:\n  loss.method: {type: categorical, choices: [sum, dwa]}\n")
    assert _findings(tmp_path, body % 5) == []  # weights set after step 10 of 20
    late = _findings(tmp_path, body % 10)  # first set after step 20: the run is over
    assert [f.kind for f in late] == ["ignored"]
    assert "dwa sets its weights after two windows of 10 steps" in late[0].message


def test_sweep_start_warns_with_the_first_findings(tmp_path):
    path = _spec(tmp_path, OLD_STRATEGIES)
    result = runner.invoke(app, ["sweep", str(path), "--storage", "bogus://x",
                                 "--wandb-mode", "disabled", "--out", str(tmp_path / "runs")])
    warned = [line for line in result.stderr.splitlines()
              if line.startswith("mtbert: spec old-strategies: ")]
    assert len(warned) == 11, result.stderr  # ten findings, how many more, how to list them
    assert warned[0].startswith("mtbert: spec old-strategies: loss.weights.sts: acts only on "
                                "steps whose gradient norm stays under")
    assert warned[-1] == (f"mtbert: spec old-strategies: 35 more settings that cannot act; "
                          f"`mtbert sweep {path} --check` lists them all")
    assert result.exit_code == 2  # the bogus storage, after the warnings
    assert result.stderr.splitlines()[-1].startswith("mtbert: error: bad storage URL")


# ---------------------------------------------------------------- when:

WHEN_SPEC = """\
space:
  train.schedule: {type: categorical, choices: [round_robin_batch, proportional, annealed, triple_batch]}
  train.batches_per_step: {type: categorical, choices: [1, 3], when: {train.schedule: [proportional, annealed]}}
  loss.method:
    type: categorical
    choices: [sum, weighted]
    when: [{train.schedule: triple_batch}, {train.batches_per_step: 3}]
"""


@pytest.mark.parametrize("fixed, sampled", [
    ({"train.schedule": "round_robin_batch"}, {"train.schedule"}),
    ({"train.schedule": "annealed", "train.batches_per_step": 1},
     {"train.schedule", "train.batches_per_step"}),
    ({"train.schedule": "annealed", "train.batches_per_step": 3, "loss.method": "sum"},
     {"train.schedule", "train.batches_per_step", "loss.method"}),
    ({"train.schedule": "triple_batch", "loss.method": "weighted"},
     {"train.schedule", "loss.method"}),
])
def test_when_takes_a_list_of_values_and_a_list_of_alternatives(tmp_path, fixed, sampled):
    spec = load_spec(str(_spec(tmp_path, WHEN_SPEC)))
    params = suggest(optuna.trial.FixedTrial(fixed), spec)
    assert set(params) == sampled
    assert params == {k: fixed[k] for k in sampled}


def test_an_enqueued_configuration_outside_a_when_names_the_condition(tmp_path):
    spec = load_spec(str(_spec(tmp_path, WHEN_SPEC)))
    with pytest.raises(ConfigError) as err:
        check_configuration({"train.schedule": "round_robin_batch", "loss.method": "sum"},
                            spec.space, spec.base_values, ConfigError)
    assert str(err.value) == (
        "'loss.method' is only sampled when train.schedule is triple_batch, or "
        "train.batches_per_step is 3; here train.schedule is 'round_robin_batch', "
        "train.batches_per_step is 1")


@pytest.mark.parametrize("when, message", [
    ("[train.schedule]", "space.train.alpha.when must map keys to values, or be a list of "
                         "such mappings"),
    ("[{train.schedule: [proportional, zigzag]}]", "bad value 'zigzag' for train.schedule"),
    ("[{train.schedule: proportional}, {train.nope: 1}]", "unknown config key 'train.nope'"),
])
def test_a_bad_when_is_one_line(tmp_path, when, message):
    path = _spec(tmp_path, "space:\n  train.schedule: {type: categorical, choices: "
                 "[proportional, annealed]}\n  train.alpha: {type: float, low: 0, high: 1, "
                 f"when: {when}}}\n")
    result = runner.invoke(app, ["sweep", str(path), "--check"])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_best_shows_the_three_weights_a_ratio_search_implies(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    url = f"sqlite:///{tmp_path}/mtbert.db"
    study = optuna.create_study(study_name="weights", storage=url, direction="maximize")
    study.set_user_attr("objectives", ["overall/geometric"])
    study.set_user_attr("spec_def", load_spec("loss-weights").to_dict())
    ratio = FloatDistribution(0.1, 10.0, log=True)
    study.add_trial(create_trial(
        values=[0.5], params={"loss.weights.qqp": 2.0, "loss.weights.sts": 1.0},
        distributions={"loss.weights.qqp": ratio, "loss.weights.sts": ratio},
        user_attrs={"overall/geometric": 0.5, "run_dir": str(tmp_path)}))
    result = runner.invoke(app, ["best", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "  weights sst 1 (25%)  qqp 2 (50%)  sts 1 (25%)" in result.stdout.splitlines()
