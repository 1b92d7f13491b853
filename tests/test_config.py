"""The typed config: defaults, overrides, and one-line errors naming what is valid."""

import dataclasses
from pathlib import Path

import pytest

from mtbert.config import RunConfig, describe, load_config, overrides_to_dict
from mtbert.errors import ConfigError


def test_defaults_and_overrides_last_value_wins():
    config = load_config(None, ["train.lr=2e-5", "train.lr=1e-4", "model.head_hidden=256",
                                "loss.weights.sts=3", "data.tasks=sst,sts"])
    assert config.train.lr == pytest.approx(1e-4)  # "1e-4" is a YAML string, coerced
    assert config.model.head_hidden == 256
    assert config.loss.weights == {"sst": 1.0, "qqp": 1.0, "sts": 3.0}
    assert config.data.tasks == ["sst", "sts"]
    assert config.data.files["qqp"]["train"] == "quora-train.csv"


def test_yaml_file_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 5\n  batch_size: 16\nmodel:\n  pooling: mean\n")
    config = load_config(path, ["train.epochs=2"])
    assert (config.train.epochs, config.train.batch_size, config.model.pooling) == (2, 16, "mean")


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; valid keys: train.epochs, "),
    ("modle.encoder=x", "unknown config key 'modle'; valid keys: model, data, train, optim, loss"),
    ("train.schedule=zigzag", "bad value 'zigzag' for train.schedule; valid: round_robin_batch, "
                              "proportional, annealed"),
    ("model.pooling=max", "bad value 'max' for model.pooling; valid: cls, mean"),
    ("train.epochs=0", "bad value 0 for train.epochs; valid range: 1..10000"),
    ("train.batch_size=many", "bad value 'many' for train.batch_size; expected an integer"),
    ("optim.layer_decay=1.5", "bad value 1.5 for optim.layer_decay; valid range: 0.0..1.0"),
    ("data.tasks=sst,mnli", "bad value 'mnli' in data.tasks; valid: sst, qqp, sts"),
    ("loss.weights.mnli=2", "unknown task 'mnli' in loss.weights; valid: sst, qqp, sts"),
    ("data.files.sst.val=x.csv", "unknown split 'data.files.sst.val'; valid: train, dev, test"),
    ("train.select_metric=sst/f1", "bad value 'sst/f1' for train.select_metric; valid: sst/acc"),
    ("trainlr", "bad --set 'trainlr'; expected KEY=VALUE"),
])
def test_bad_keys_and_values_name_what_is_valid(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_select_metric_of_a_task_not_trained():
    with pytest.raises(ConfigError, match="names a task not in data.tasks"):
        load_config(None, ["data.tasks=sst", "train.select_metric=qqp/acc"])


def test_bad_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML \(line \d+\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_describe_lists_every_key_the_issues_name():
    keys = {key for key, _, _ in describe()}
    for key in ("model.encoder", "model.head_hidden", "model.dropout", "data.dir",
                "data.max_train_examples", "data.max_eval_examples", "train.epochs",
                "train.steps_per_epoch", "train.batch_size", "train.lr", "train.seed",
                "train.schedule", "loss.method", "loss.weights.sst", "loss.weights.qqp",
                "loss.weights.sts", "optim.layer_decay", "data.files.sst.train"):
        assert key in keys
    assert all(meaning for _, _, meaning in describe())


def test_overrides_nest():
    assert overrides_to_dict(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_directories_from_config_then_environment_then_home(monkeypatch, tmp_path):
    from mtbert.config import cache_dir, data_dir
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MTBERT_DATA_DIR", raising=False)
    monkeypatch.delenv("MTBERT_CACHE_DIR", raising=False)
    config = load_config()
    assert data_dir(config) == tmp_path / ".cache" / "mtbert" / "data"
    assert cache_dir(config) == tmp_path / ".cache" / "mtbert" / "tokens"
    monkeypatch.setenv("MTBERT_DATA_DIR", "/env/data")
    assert data_dir(config) == Path("/env/data")
    assert data_dir(load_config(None, ["data.dir=/cfg/data"])) == Path("/cfg/data")


def test_quickstart_example_config_is_valid():
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "examples" / "quickstart.yaml")
    assert (config.model.encoder, config.train.lr, config.data.max_train_examples,
            config.train.steps_per_epoch) == ("minilm-l6", 1e-4, 2000, 100)


# The keys that only some schedule or loss method reads.
STRATEGY_KEYS = {"train.alpha", "train.alpha_start", "train.alpha_end", "train.alpha_shape",
                 "train.temperature", "train.target_task", "train.triple_batch_truncate",
                 "train.batches_per_step", "loss.weights", "loss.weight_lr",
                 "loss.gradnorm_alpha", "loss.dwa_temperature", "loss.dwa_window"}


def test_every_declared_read_is_a_config_key_and_every_strategy_key_is_declared():
    from mtbert.balancing import LOSS_METHODS
    from mtbert.schedules import SCHEDULES

    defaults = RunConfig()
    schema = {f"{section.name}.{f.name}" for section in dataclasses.fields(defaults)
              for f in dataclasses.fields(getattr(defaults, section.name))}
    declared = {key for registry in (SCHEDULES, LOSS_METHODS)
                for entry in registry.values() for key in entry.reads}
    assert declared - schema == set()
    assert STRATEGY_KEYS - declared == set()
    assert SCHEDULES["proportional"].reads == ("train.alpha", "train.batches_per_step")
    assert LOSS_METHODS["sum"].reads == LOSS_METHODS["pcgrad"].reads == ()
