"""Strict YAML and values: what a spec, a run config, `--set`, `--enqueue` or a
`--baseline` says is what runs, or one line (exit 2) names the key and why.

A key given twice, a quoted boolean, an int bound that is no whole number, a number
that does not fit, a step that does not fit its range, a `when:` on its own key;
deep nesting anywhere; files that are directories, devices or binary; options that
no run can use; and `sweep --print`, whose output the same command accepts.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.config import build_config, load_config
from mtbert.errors import ConfigError
from mtbert.safeyaml import load_yaml
from mtbert.studies.constraints import read_baseline
from mtbert.studies.samplers import make_pruner, make_sampler
from mtbert.studies.spec import load_spec, shipped_specs, spec_from_dict, spec_yaml

runner = CliRunner()
LR = "  train.lr: {type: float, low: 1.0e-5, high: 1.0e-4}\n"


def _error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtbert: error: "), result.stderr
    return lines[0]


def _spec_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def _print(spec: Path | str, *extra: str):
    return runner.invoke(app, ["sweep", str(spec), "--print", *extra])


# ---------------------------------------------------------------- a key given twice

@pytest.mark.parametrize("text, key, lines", [
    ("space:\n" + LR + LR, "train.lr", "lines 2 and 3"),
    ("name: a\nname: b\nspace:\n" + LR, "name", "lines 1 and 2"),
    ("base:\n  train.epochs: 2\n  train.epochs: 3\nspace:\n" + LR, "train.epochs",
     "lines 2 and 3"),
    ("space:\n  train.lr: {type: float, low: 1.0e-5, low: 2.0e-5, high: 1.0e-4}\n", "low",
     "line 2"),
])
def test_a_key_given_twice_in_a_spec_is_named_with_its_lines(tmp_path, text, key, lines):
    line = _error_line(_print(_spec_file(tmp_path, text)))
    assert f"key '{key}' is given twice ({lines})" in line


def test_a_key_given_twice_in_a_run_config_a_set_value_or_an_enqueue_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 2.0e-4\n")
    line = _error_line(runner.invoke(app, ["config", str(config)]))
    assert f"config file {config}: key 'lr' is given twice (lines 2 and 4)" in line
    line = _error_line(runner.invoke(app, ["config", "--set",
                                           "loss.weights={sst: 1, qqp: 2, sst: 3}"]))
    assert "--set loss.weights: key 'sst' is given twice (line 1)" in line
    enqueue = tmp_path / "enqueue.yaml"
    enqueue.write_text("- {train.lr: 1.0e-4, optim.layer_decay: 0.9, train.lr: 2.0e-4}\n")
    line = _error_line(_print("lr-decay", "--enqueue", str(enqueue)))
    assert f"enqueue file {enqueue}: key 'train.lr' is given twice" in line


def test_a_merge_key_may_be_overridden_and_keys_may_repeat_across_mappings():
    text = "a: &a {lr: 1, epochs: 2}\nb:\n  <<: *a\n  lr: 3\nc: {lr: 4}\n"
    assert load_yaml(text, "doc") == {"a": {"lr": 1, "epochs": 2}, "b": {"lr": 3, "epochs": 2},
                                      "c": {"lr": 4}}


# ---------------------------------------------------------------- booleans, ints, numbers

BAD_ENTRIES = {
    'log "false"': ('{type: float, low: 1.0e-5, high: 1.0e-4, log: "false"}', "train.lr",
                    "space.train.lr.log must be true or false (unquoted), got 'false'"),
    'log "no"': ('{type: float, low: 1.0e-5, high: 1.0e-4, log: "no"}', "train.lr",
                 "space.train.lr.log must be true or false (unquoted), got 'no'"),
    "log 1": ("{type: float, low: 1.0e-5, high: 1.0e-4, log: 1}", "train.lr",
              "space.train.lr.log must be true or false"),
    "step true": ("{type: int, low: 1, high: 3, step: true}", "train.epochs",
                  "space.train.epochs.step must be a number, got True"),
    "low true": ("{type: int, low: true, high: 3}", "train.epochs",
                 "space.train.epochs.low must be a number, got True"),
    "int low 1.5": ("{type: int, low: 1.5, high: 3}", "train.epochs",
                    "space.train.epochs.low: an int distribution takes whole numbers, got 1.5"),
    "int high 2.5": ("{type: int, low: 1, high: 2.5}", "train.epochs",
                     "space.train.epochs.high: an int distribution takes whole numbers"),
    "int step 0.5": ("{type: int, low: 1, high: 3, step: 0.5}", "train.epochs",
                     "space.train.epochs.step: an int distribution takes whole numbers, "
                     "got 0.5"),
    "int high 1e400": ("{type: int, low: 1, high: 1e400}", "train.epochs",
                       "space.train.epochs.high '1e400' is not a finite number"),
    "int high 10^400": ("{type: int, low: 1, high: 1" + "0" * 400 + "}", "train.epochs",
                        "space.train.epochs.high 1000000000"),
    "float high .inf": ("{type: float, low: 1.0e-5, high: .inf}", "train.lr",
                        "space.train.lr.high inf is not a finite number"),
    "float low .nan": ("{type: float, low: .nan, high: 1.0e-4}", "train.lr",
                       "space.train.lr.low nan is not a finite number"),
    "step 1e-300": ("{type: float, low: 1.0e-5, high: 1.0e-4, step: 1e-300}", "train.lr",
                    "space.train.lr: step 1e-300 makes more than 1e+15 values"),
    "step above the range": ("{type: int, low: 1, high: 3, step: 5}", "train.epochs",
                             "space.train.epochs: step 5 is larger than the range 1..3"),
    "float step above the range": ("{type: float, low: 0.0, high: 0.5, step: 0.75}",
                                   "model.dropout", "step 0.75 is larger than the range"),
    "step not dividing": ("{type: float, low: 0.0, high: 0.5, step: 0.2}", "model.dropout",
                          "step 0.2 does not divide the range 0..0.5; end it at a step, "
                          "e.g. high 0.4"),
    "step on a categorical": ("{type: categorical, choices: [1, 2], step: 1}",
                              "train.epochs", "step do not go with a categorical"),
    "choices on a float": ("{type: float, low: 0.0, high: 0.5, choices: [0.1]}",
                           "model.dropout", "choices go with a categorical"),
    "when on its own key": ("{type: int, low: 1, high: 3, when: {train.epochs: 2}}",
                            "train.epochs", "space.train.epochs.when names train.epochs "
                            "itself"),
    "when in a list on its own key": ("{type: int, low: 1, high: 3, when: [{train.lr: 1.0e-4}"
                                      ", {train.epochs: 2}]}", "train.epochs",
                                      "when names train.epochs itself"),
    "when with no value": ("{type: int, low: 1, high: 3, when: {train.schedule: []}}",
                           "train.epochs", "space.train.epochs.when: train.schedule lists "
                           "no value"),
    "when false": ("{type: int, low: 1, high: 3, when: false}", "train.epochs",
                   "space.train.epochs.when must map keys to values"),
}


@pytest.mark.parametrize("name", BAD_ENTRIES)
def test_a_space_entry_that_would_not_search_what_it_says_is_refused(tmp_path, name):
    entry, key, message = BAD_ENTRIES[name]
    line = _error_line(_print(_spec_file(tmp_path, f"space:\n  {key}: {entry}\n")))
    assert message in line and len(line) < 400


@pytest.mark.parametrize("entry, key, printed", [
    ("{type: int, low: 1.0, high: 3.0, step: 1.0}", "train.epochs",
     {"type": "int", "low": 1, "high": 3, "step": 1}),
    ("{type: float, low: 1e-5, high: 1e-4, log: true}", "train.lr",
     {"type": "float", "low": 1e-5, "high": 1e-4, "log": True}),
    ("{type: float, low: 0.0, high: 0.5, step: 0.1}", "model.dropout",
     {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1}),
    ("{type: int, low: 2, high: 2, step: 5}", "train.epochs",
     {"type": "int", "low": 2, "high": 2, "step": 5}),
    ("{type: float, low: 1e-5, high: 1e-4, log: null}", "train.lr",
     {"type": "float", "low": 1e-5, "high": 1e-4}),
])
def test_what_is_valid_prints_in_its_type(tmp_path, entry, key, printed):
    result = _print(_spec_file(tmp_path, f"space:\n  {key}: {entry}\n"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["space"][key] == printed


@pytest.mark.parametrize("options, message", [
    ({"name": "tpe", "multivariate": "false"},
     "sampler tpe: multivariate must be true or false (unquoted), got 'false'"),
    ({"name": "qmc", "scramble": "no"}, "sampler qmc: scramble must be true or false"),
    ({"name": "tpe", "n_startup_trials": 2.5},
     "sampler tpe: n_startup_trials must be a whole number, got 2.5"),
    ({"name": "random", "seed": True}, "sampler random: seed must be a whole number, got True"),
])
def test_sampler_arguments_take_their_types(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_sampler(options)
    assert make_sampler({"name": "tpe", "multivariate": True, "seed": 0}).__class__.__name__ \
        == "TPESampler"


def test_pruner_arguments_take_their_types():
    with pytest.raises(ConfigError, match="pruner median: n_startup_trials must be a whole "
                                          "number, got '3'"):
        make_pruner({"name": "median", "n_startup_trials": "3"})
    assert make_pruner({"name": "hyperband", "max_resource": "auto"}) is not None


@pytest.mark.parametrize("value", ['"false"', '"no"', '"true"', "1", "0"])
def test_a_config_boolean_is_a_boolean(value):
    with pytest.raises(ConfigError, match="model.siamese_cosine; expected true or false"):
        load_config(None, [f"model.siamese_cosine={value}"])
    assert load_config(None, ["model.siamese_cosine=no"]).model.siamese_cosine is False
    assert build_config({"model": {"siamese_cosine": True}}).model.siamese_cosine is True


# ---------------------------------------------------------------- --print is accepted back

def _fixed_point(raw: dict) -> str:
    """The spec's --print text, after checking the same command accepts it unchanged."""
    printed = spec_yaml(spec_from_dict(raw, where="spec", source="test"))
    again = spec_yaml(spec_from_dict(load_yaml(printed, "printed"), where="printed",
                                     source="test"))
    assert again == printed
    return printed


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_print_of_every_shipped_spec_at_every_size_is_accepted_unchanged(name):
    sizes = load_spec(name).sizes or [None]
    for size in sizes:
        printed = spec_yaml(load_spec(name, size=size))
        reread = load_yaml(printed, "printed")
        assert spec_yaml(spec_from_dict(reread, where="printed", source="test")) == printed


def _odd_number(rng: random.Random, kind: str):
    """A number of the kind a person or a typo writes: ints, integral and fractional
    floats, tiny and huge magnitudes, YAML 1.1 strings, booleans, infinities."""
    return rng.choice([
        rng.randint(-3, 40), float(rng.randint(0, 40)), rng.uniform(0, 2), 10 ** rng.randint(-9, 9),
        f"{rng.randint(1, 9)}e-{rng.randint(1, 6)}", rng.choice([True, False]),
        rng.choice([float("inf"), -float("inf"), 1e-300, 1e300, 2 ** 70]), 0.5, 0.25,
        rng.choice(["1_0", "0x10", ".5", "abc"]),
    ])


def test_print_output_is_accepted_back_for_odd_values():
    """A property: for any entry, either the spec is refused (ConfigError) or its --print
    text loads to the same spec, which prints the same text."""
    rng = random.Random(27)
    keys = {"model.head_hidden": "int", "train.epochs": "int", "model.dropout": "float",
            "train.lr": "float", "loss.weights.sst": "float", "optim.warmup": "float"}
    accepted = refused = 0
    for _ in range(400):
        key = rng.choice(sorted(keys))
        kind = rng.choice([keys[key], keys[key], "int" if keys[key] == "float" else "float"])
        entry = {"type": kind, "low": _odd_number(rng, kind), "high": _odd_number(rng, kind)}
        if rng.random() < 0.4:
            entry["step"] = _odd_number(rng, kind)
        if rng.random() < 0.3:
            entry["log"] = rng.choice([True, False, "false", "no", 1, None])
        raw = {"name": "odd", "space": {key: entry}}
        try:
            printed = _fixed_point(raw)
        except ConfigError:
            refused += 1
            continue
        accepted += 1
        shown = yaml.safe_load(printed)["space"][key]
        if kind == "int":  # an int distribution prints whole numbers only
            assert all(isinstance(shown[f], int) and not isinstance(shown[f], bool)
                       for f in ("low", "high", "step") if f in shown), shown
    assert accepted > 20 and refused > 100  # both sides of the property were exercised


# ---------------------------------------------------------------- deep nesting

DEEP = "[" * 5000 + "]" * 5000


def test_deep_nesting_in_set_keys_and_values_is_one_line(tmp_path):
    deep_key = "loss.weights." + "a." * 5000 + "b=1"
    for args in (["config", "--set", deep_key], ["sweep", "lr-decay", "--print", "--set",
                                                 deep_key],
                 ["sweep", "lr-decay", "--print", "--set", f"train.lr={DEEP}"]):
        line = _error_line(runner.invoke(app, args))
        assert "nests deeper than 50 levels" in line
    # A spec's base with a dotted key 5,000 parts long (YAML keys past 1,024 characters
    # are explicit: `? KEY`).
    spec = _spec_file(tmp_path, "base:\n  ? " + "a." * 5000 + "b\n  : 1\nspace:\n" + LR)
    assert "nests deeper than 50 levels" in _error_line(_print(spec))


def test_deep_nesting_in_a_baseline_json_is_one_line(tmp_path):
    baseline = tmp_path / "compare.json"
    baseline.write_text('{"baseline": "a", "summary": {"a": ' + '{"x": ' * 5000 + "1"
                        + "}" * 5000 + "}}")
    with pytest.raises(ConfigError, match=f"--baseline {baseline} nests deeper than 50"):
        read_baseline(baseline)


def _baseline(tmp_path: Path, runs, mean=0.5) -> Path:
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"baseline": "a", "summary": {"a": {"sst/acc": {"mean": mean}}},
                                "runs": runs}))
    return path


@pytest.mark.parametrize("config_text", [DEEP, "- a list\n", "\x00binary", "a: 1\na: 2\n"])
def test_a_baseline_run_config_that_cannot_be_read_is_a_warning(tmp_path, caplog,
                                                                 config_text):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_text)
    path = _baseline(tmp_path, {"a": {"0": {"status": "done", "run_dir": str(run_dir)}}})
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        found = read_baseline(path)
    assert found.means == {"sst/acc": 0.5} and found.config is None
    assert "a run config of its baseline cannot be read" in caplog.text


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("runs", [[1, 2], {"a": [1]}, {"a": {"0": "done"}}, "runs"])
def test_a_baseline_whose_runs_are_not_mappings_keeps_its_means(tmp_path, caplog, runs):
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        found = read_baseline(_baseline(tmp_path, runs))
    assert found.means == {"sst/acc": 0.5} and found.config is None


@pytest.mark.parametrize("mean", ["abc", True, [0.5], 1e999, "nan"])
def test_a_baseline_mean_that_is_no_number_is_one_line(tmp_path, mean):
    with pytest.raises(ConfigError, match="the mean sst/acc of its baseline config 'a' is "
                                          ".*, not a number between -1 and 1"):
        read_baseline(_baseline(tmp_path, {}, mean=mean))


def test_a_binary_enqueue_file_or_spec_is_one_line(tmp_path):
    binary = tmp_path / "enqueue.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    line = _error_line(_print("lr-decay", "--enqueue", str(binary)))
    assert f"enqueue file {binary} is not UTF-8 text (byte 128)" in line
    assert f"sweep spec {binary} is not UTF-8 text" in _error_line(_print(binary))


@pytest.mark.parametrize("value", ['"inf"', ".nan", "true", "[1, 2]"])
def test_an_enqueued_value_that_is_no_number_is_one_line(tmp_path, value):
    enqueue = tmp_path / "enqueue.yaml"
    enqueue.write_text(f"- {{train.lr: {value}}}\n")
    line = _error_line(_print("lr-decay", "--enqueue", str(enqueue)))
    assert f"enqueue file {enqueue}: enqueue[0].train.lr:" in line


def test_an_enqueued_boolean_is_no_numeric_choice(tmp_path):
    spec = _spec_file(tmp_path, "space:\n  model.head_hidden: {type: categorical, choices: "
                                "[0, 1]}\nenqueue:\n  - {model.head_hidden: true}\n")
    assert "enqueue[0].model.head_hidden: True is not a choice" in _error_line(_print(spec))


@pytest.mark.parametrize("command", [["best"], ["studies"], ["report"],
                                     ["sweep", "lr-decay", "--trials", "1"]])
def test_out_through_a_loop_of_symbolic_links_is_one_line(tmp_path, command):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = _error_line(runner.invoke(app, [*command, "--out", str(loop / "x")]))
    assert f"Too many levels of symbolic links: {loop}" in line


@pytest.mark.parametrize("args, message", [
    (["--heartbeat", "99999999999"], "--heartbeat"),
    (["--grace", "99999999999"], "--grace"),
    (["--heartbeat", "10", "--grace", "10"], "--grace 10 must be longer than --heartbeat 10"),
    (["--storage-timeout", "inf"], "bad --storage-timeout inf; valid: 1 to 3600 seconds"),
    (["--storage-outage", "inf"], "bad --storage-outage inf"),
    (["--timeout", "0"], "bad --timeout 0: no trial could start"),
    (["--timeout", "inf"], "bad --timeout inf"),
    (["--gpus", ""], "--gpus is empty"),
    (["--gpus", " "], "--gpus is empty"),
    (["--trials-per-gpu", "99999999999"], "--trials-per-gpu"),
])
def test_sweep_options_no_run_can_use_are_refused_before_the_study(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", "lr-decay", "--trials", "1", "--out", str(out),
                                 *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (out / "mtbert.db").exists()


# ---------------------------------------------------------------- what a path is

@pytest.mark.parametrize("kind, message", [("directory", "is a directory"),
                                           ("device", "is not a regular file"),
                                           ("missing", "does not exist")])
def test_directories_and_devices_are_named_as_such(tmp_path, kind, message):
    path = {"directory": tmp_path, "device": Path(os.devnull),
            "missing": tmp_path / "gone.yaml"}[kind]
    spec = _spec_file(tmp_path, "space:\n" + LR + "constraints: ['sst/acc >= baseline']\n")
    cases = {
        ("sweep", str(spec), "--trials", "1", "--out", str(tmp_path / "o"), "--baseline",
         str(path)): f"--baseline {path} {message}",
        ("sweep", "lr-decay", "--print", "--enqueue", str(path)): f"enqueue file {path} "
                                                                   f"{message}",
        ("compare", str(path)): f"config file {path} {message}",
        ("train", str(path)): f"config file {path} {message}",
        ("config", str(path)): f"config file {path} {message}",
    }
    if kind != "device":  # a device without a .yaml suffix reads as a shipped spec's name
        cases[("sweep", str(path), "--print")] = f"sweep spec {path} {message}"
    for args, expected in cases.items():
        assert expected in _error_line(runner.invoke(app, list(args))), args


@pytest.mark.parametrize("command", [["best"], ["report"], ["studies", "--stop"],
                                     ["studies", "--delete"]])
def test_a_newline_in_a_study_name_cannot_split_the_error_line(tmp_path, command):
    import optuna

    out = tmp_path / "out"
    out.mkdir()
    optuna.create_study(study_name="real", storage=f"sqlite:///{out / 'mtbert.db'}")
    option = [] if command[0] == "studies" else ["--study"]
    result = runner.invoke(app, [*command, *option, "evil\nmtbert: error: forged", "--out",
                                 str(out), *(["--yes"] if "--delete" in command else [])])
    line = _error_line(result)
    assert "no study 'evil\\nmtbert: error: forged'" in line


@pytest.mark.parametrize("args, message", [
    (["--seeds", "99999999999"], "bad --seeds 99999999999; valid: 1 to 1000"),
    (["--seed-list", ",".join(map(str, range(1001)))], "valid: at most 1000 seeds"),
])
def test_compare_seeds_past_a_thousand_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["compare", "individual", "--out", str(tmp_path / "c"), *args])
    assert message in _error_line(result)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", [["sweep", "lr-decay", "--trials", "1", "--out"],
                                     ["train", "--out"]])
def test_a_file_or_a_loop_where_out_must_be_a_directory_says_so(tmp_path, command):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("kept")
    line = _error_line(runner.invoke(app, [*command, str(in_the_way)]))
    assert f"{in_the_way} is not a directory (a file is in its place)" in line
    assert in_the_way.read_text() == "kept"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = _error_line(runner.invoke(app, [*command, str(loop)]))
    assert f"Too many levels of symbolic links: {loop}" in line
