"""Studies as data: `mtbert studies --json` says what the table says, and `mtbert sweep
NAME --print` writes a spec that `mtbert sweep FILE.yaml` runs unchanged."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies.spec import load_spec, shipped_specs

runner = CliRunner()

LR = {"train.lr": FloatDistribution(1e-5, 1e-3, log=True)}


def _trial(state=TrialState.COMPLETE, values=None, lr=1e-4, system_attrs=None, **attrs):
    return create_trial(state=state, values=values, params={"train.lr": lr},
                        distributions=LR, user_attrs=attrs, system_attrs=system_attrs or {})


@pytest.fixture
def storage(tmp_path):
    """Three studies as sweeps leave them: one raced over seeds with every trial state, a
    budget, a stop and a size; one multi-objective; one without trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/mtbert.db"
    raced = optuna.create_study(study_name="raced", storage=url, direction="maximize")
    raced.set_user_attr("objectives", ["overall/geometric"])
    raced.set_user_attr("spec_def", {"name": "raced", "seeds": 3, "race_alpha": 0.1})
    raced.set_user_attr("budget_hours", 1.0)
    raced.set_user_attr("stop_requested", True)
    raced.set_user_attr("size", "gpu")
    raced.add_trial(_trial(values=[0.40], config_id=0, wall_s=360.0, gpu_share=1.0))
    raced.add_trial(_trial(values=[0.55], config_id=0, wall_s=720.0, gpu_share=0.5))
    raced.add_trial(_trial(values=[0.55], lr=2e-4, config_id=2, wall_s=90.0))  # a tie
    raced.add_trial(_trial(TrialState.PRUNED, lr=3e-4, config_id=3, wall_s=36.0))
    raced.add_trial(_trial(TrialState.FAIL, lr=4e-4, wall_s=18.0))
    raced.add_trial(_trial(TrialState.RUNNING, lr=5e-4, wall_s=36.0))
    raced.add_trial(_trial(TrialState.WAITING, lr=6e-4))
    # Trial 7 was stopped (FAIL "interrupted") and queued again as trial 8: retried, not
    # a failure.
    raced.add_trial(_trial(TrialState.FAIL, lr=7e-4, fail_reason="interrupted"))
    raced.add_trial(_trial(TrialState.WAITING, lr=7e-4,
                           system_attrs={"failed_trial": 7, "retry_history": [7]}))
    front = optuna.create_study(study_name="front", storage=url,
                                directions=["maximize", "maximize"])
    front.set_user_attr("objectives", ["sst/acc", "qqp/acc"])
    for values in ([0.5, 0.6], [0.6, 0.5], [0.4, 0.4]):
        front.add_trial(_trial(values=values, wall_s=3600.0))
    optuna.create_study(study_name="empty", storage=url, direction="minimize")
    return tmp_path


def test_studies_json_says_what_the_table_says(storage):
    table = runner.invoke(app, ["studies", "--out", str(storage)])
    listed = runner.invoke(app, ["studies", "--out", str(storage), "--json"])
    assert table.exit_code == 0 and listed.exit_code == 0, table.output + listed.output
    studies = json.loads(listed.stdout)
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["study", "trials", "complete", "pruned", "fail", "retried",
                              "running", "hours", "budget", "size", "best"]
    assert [r.split()[0] for r in rows] == [s["name"] for s in studies] == \
        ["raced", "front", "empty"]
    for row, study in zip(rows, studies):
        cells = row.split()
        states = study["states"]
        # fail: the FAIL trials no retry took over; retried: the others.
        assert [int(c) for c in cells[1:7]] == [study["trials"], states["COMPLETE"],
                                                states["PRUNED"],
                                                states["FAIL"] - study["retried"],
                                                study["retried"], states["RUNNING"]]
        assert cells[7] == f"{study['hours']:.4f}"
        assert cells[8] == ("-" if study["budget_hours"] is None
                            else f"{study['budget_hours']:.4f}")
        assert cells[9] == (study["size"] or "-")
        best = row.split("  ")[-1] if not study["stop_requested"] else \
            row.split("  ")[-2]
        if study["pareto_front"] is not None:
            assert best == f"{len(study['pareto_front'])} on the front"
        elif study["best"][0]["trial"] is None:
            assert best == "-"
        else:
            assert best == f"{study['best'][0]['value']:.4f} (trial {study['best'][0]['trial']})"
        assert row.endswith("(stop requested)") is study["stop_requested"]

    raced, front, empty = studies
    assert raced["trials"] == 9 and raced["states"] == {
        "RUNNING": 1, "COMPLETE": 3, "PRUNED": 1, "FAIL": 2, "WAITING": 2}
    assert (raced["retried"], front["retried"], empty["retried"]) == (1, 0, 0)
    assert rows[0].split()[4:6] == ["1", "1"]  # one real failure, one retried
    # 360 s + 720 s at half a GPU + 90 + 36 + 18 + 36 (running) = 900 s.
    assert raced["hours"] == pytest.approx(0.25, abs=1e-4)
    assert raced["budget_hours"] == 1.0
    assert raced["budget_left_hours"] == pytest.approx(0.75, abs=1e-4)
    assert raced["best"] == [{"objective": "overall/geometric", "direction": "maximize",
                              "value": 0.55, "trial": 1}]  # the lower number of a tie
    assert (raced["seeds"], raced["configurations"], raced["seed_runs"]) == (3, 3, 4)
    assert raced["stop_requested"] is True and raced["pareto_front"] is None
    assert (raced["size"], front["size"], empty["size"]) == ("gpu", None, None)
    assert front["best"] == [
        {"objective": "sst/acc", "direction": "maximize", "value": 0.6, "trial": 1},
        {"objective": "qqp/acc", "direction": "maximize", "value": 0.6, "trial": 0}]
    assert front["pareto_front"] == [0, 1] and front["seeds"] == 1
    assert front["hours"] == pytest.approx(3.0) and front["budget_left_hours"] is None
    assert empty["trials"] == 0 and empty["hours"] == 0.0
    assert empty["best"] == [{"objective": "objective 0", "direction": "minimize",
                              "value": None, "trial": None}]


def test_studies_json_lists_only(storage):
    result = runner.invoke(app, ["studies", "--out", str(storage), "--json", "--stop", "raced"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "mtbert: error: --stop and --json do not go together; " \
                                    "pick one"


def _printed(*args: str) -> str:
    result = runner.invoke(app, ["sweep", *args, "--print"])
    assert result.exit_code == 0, result.output
    return result.stdout


def _round_trip(tmp_path, *args: str):
    """`sweep ARGS --print` written to a file: loaded by load_spec and printed again
    unchanged; returns the loaded spec."""
    printed = _printed(*args)
    path = tmp_path / "printed.yaml"
    path.write_text(printed, encoding="utf-8")
    spec = load_spec(str(path))
    assert _printed(str(path)) == printed
    return spec


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_every_shipped_spec_prints_as_a_spec_that_runs_unchanged(name, tmp_path):
    spec = _round_trip(tmp_path, name, "--device", "cpu")  # auto: the cpu size
    shipped = load_spec(name, size="cpu")
    assert spec.to_dict() == shipped.to_dict()
    assert spec.base_values == shipped.base_values


def test_print_folds_set_overrides_and_keeps_seeds_race_alpha_and_constraints(tmp_path):
    source = tmp_path / "raced.yaml"
    source.write_text(
        "name: raced\nspace:\n  train.schedule: {type: categorical, choices: [annealed, "
        "proportional]}\n  train.alpha_start: {type: float, low: 0.5, high: 1.0, "
        "when: &annealed {train.schedule: annealed}}\n  train.alpha_end: {type: float, "
        "low: 0.0, high: 0.5, when: *annealed}\n  model.head_hidden: {type: int, low: 0, "
        "high: 64, step: 16}\nseeds: 3\nrace_alpha: 0.2\n"
        "constraints: ['sst/acc >= 0.5', 'sts/pearson >= baseline - 0.01']\n"
        "enqueue:\n  - {train.schedule: annealed, train.alpha_start: 0.75}\n")
    spec = _round_trip(tmp_path, str(source), "--set", "train.lr=3e-4", "--set",
                       "train.epochs=2", "--data-dir", str(tmp_path / "my data"))
    assert (spec.name, spec.seeds, spec.race_alpha) == ("raced", 3, 0.2)
    assert spec.constraints == ["sst/acc >= 0.5", "sts/pearson >= baseline - 0.01"]
    assert spec.base_values["train.lr"] == pytest.approx(3e-4)
    assert spec.base_values["train.epochs"] == 2
    assert spec.base_values["data.dir"] == str(tmp_path / "my data")
    assert spec.enqueue == [{"train.schedule": "annealed", "train.alpha_start": 0.75}]
    assert spec.space["model.head_hidden"].step == 16
    printed = (tmp_path / "printed.yaml").read_text()
    assert "&" not in printed and "*" not in printed  # the anchor written out in full
    assert printed.count("train.schedule: annealed") == 3  # two `when`s, one enqueue


def test_print_keeps_a_race_level_given_without_seeds(tmp_path):
    """`--seeds N` on the command line races at the spec's level."""
    (tmp_path / "s.yaml").write_text("space:\n  model.dropout: {type: float, low: 0.0, "
                                     "high: 0.3}\nrace_alpha: 0.05\n")
    spec = _round_trip(tmp_path, str(tmp_path / "s.yaml"))
    assert (spec.seeds, spec.race_alpha) == (1, 0.05)
