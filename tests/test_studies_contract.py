"""The worker/trial-process contract and the study records: what earlier versions wrote
(job.json, trial.json, study and trial attributes) is read unchanged."""

from __future__ import annotations

import json

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies.job import TrialJob, TrialResult, WandbSettings

runner = CliRunner()

# A job.json exactly as the sweep worker wrote it before the studies package existed.
OLD_JOB = {"study": "lw", "trial_id": 7, "number": 6, "spec": "loss-weights",
           "objectives": ["overall/geometric"], "prune": True, "reseed_of": None, "seed": 0,
           "pruner": {"name": "median", "n_warmup_steps": 1},
           "params": {"loss.weights.sst": 1.5}, "device": "cpu",
           "wandb": {"mode": "offline", "project": "mtbert", "dir": "/runs"}}


def test_an_old_job_file_reads_into_the_typed_job_and_writes_back_the_same_keys(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(OLD_JOB))
    job = TrialJob.read(tmp_path)
    assert job.number == 6 and job.trial_id == 7 and job.prune is True
    assert job.wandb == WandbSettings("offline", "mtbert", "/runs")
    assert job.params == {"loss.weights.sst": 1.5}
    assert job.retry_of is None and job.resume is False and job.wandb_resume_id is None
    written = json.loads(job.to_json())
    assert {k: written[k] for k in OLD_JOB} == OLD_JOB  # the old keys, unchanged
    assert TrialJob.from_json(job.to_json()) == job


def test_a_job_with_an_unknown_key_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"job.json has unknown keys colour; valid: config_id, "
                                         r"device, direction, number, objectives, params"):
        TrialJob.from_json(json.dumps({**OLD_JOB, "colour": "red"}))


def test_a_trial_result_round_trips_and_a_killed_trial_reads_as_empty(tmp_path):
    assert TrialResult.read(tmp_path) == TrialResult(None, None)
    (tmp_path / "trial.json").write_text('{"wandb_run_id": "abc", "reason": "pruned"}')
    assert TrialResult.read(tmp_path) == TrialResult("abc", "pruned")
    (tmp_path / "trial.json").write_text('{"wandb_run_id": nul')  # cut off mid-write
    assert TrialResult.read(tmp_path) == TrialResult(None, None)


def _trial(number_value: float, **attrs):
    metrics = {"sst/acc": 0.3, "qqp/acc": 0.6, "sts/pearson": 0.2,
               "overall/arithmetic": 0.5, "overall/geometric": number_value}
    return optuna.trial.create_trial(
        params={"train.lr": 1e-4}, distributions={
            "train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)},
        value=number_value, user_attrs={**metrics, "run_dir": "/elsewhere/run",
                                        "checkpoint": "/elsewhere/run/model", **attrs})


def test_a_study_with_the_old_attribute_names_ranks_by_mean_over_seeds(tmp_path):
    """Attribute names as earlier versions wrote them: spec, objectives, reseed_of, seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="old", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'mtbert.db'}")
    study.set_user_attr("spec", "loss-weights")
    study.set_user_attr("objectives", ["overall/geometric"])
    study.add_trial(_trial(0.50))  # trial 0: one lucky seed, never reseeded
    study.add_trial(_trial(0.40))  # trial 1 and its two reseeds: mean 0.44
    study.add_trial(_trial(0.45, reseed_of=1, seed=1))
    study.add_trial(_trial(0.47, reseed_of=1, seed=2))
    result = runner.invoke(app, ["best", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == ("study old: best configuration trial 1 by mean overall/geometric "
                        "over 3 seeds: 0.4400 ± 0.0361")
    # The seed run closest to the mean 0.44 is the reseed with 0.45 (trial 2).
    assert lines[1] == ("  its seed run closest to the mean: trial 2 (seed 1), "
                        "overall/geometric 0.4500")
    by_trial = runner.invoke(app, ["best", "--out", str(tmp_path), "--top", "2", "--by-trial"])
    assert by_trial.stdout.splitlines()[0] == ("study old: top 2 of 4 complete trials by "
                                               "overall/geometric")
    assert [row.split()[0] for row in by_trial.stdout.splitlines()[2:]] == ["0", "3"]
