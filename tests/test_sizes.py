"""Spec sizes: `sizes:` in a spec, `mtbert sweep --size cpu|gpu|NAME|auto`, the size a
study stores and every later worker runs, and where it shows (studies, best, report, the
W&B config of a trial). No trial runs here: a sweep's start is checked up to the call
that would run it (`_run_sweep`), the study made in-process by `create_study`."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from typer.testing import CliRunner

from mtbert import cli
from mtbert.cli import app
from mtbert.errors import ConfigError
from mtbert.studies.job import TrialJob
from mtbert.studies.options import SweepOptions
from mtbert.studies.runner import create_study
from mtbert.studies.sizes import NO_STUDY, choose_size
from mtbert.studies.spec import load_spec, shipped_specs, stored_spec, trial_config
from conftest import tiny_sweep_args

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

SIZED = """name: sized
base:
  train.epochs: 4
  train.lr: 1.0e-5
sizes:
  cpu: {train.epochs: 1, train.lr: 1.0e-4}
  gpu: {}
  tiny: {train.epochs: 2}
space:
  model.dropout: {type: float, low: 0.0, high: 0.3}
"""
UNSIZED = """name: unsized
base:
  train.epochs: 3
space:
  model.dropout: {type: float, low: 0.0, high: 0.3}
"""


@pytest.fixture
def sized(tmp_path):
    path = tmp_path / "sized.yaml"
    path.write_text(SIZED)
    return path


@pytest.fixture
def unsized(tmp_path):
    path = tmp_path / "unsized.yaml"
    path.write_text(UNSIZED)
    return path


@pytest.fixture
def cuda(monkeypatch):
    """PyTorch sees a GPU (what `--device auto` asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def started(monkeypatch):
    """`mtbert sweep` runs up to the call that would run the sweep: the spec and options it
    would run with, and the study made as the sweep makes it (no trial)."""
    seen = {}

    def run(spec, options, size=None):
        options.out.mkdir(parents=True, exist_ok=True)
        seen.update(spec=spec, options=options, study=create_study(spec, options)[0],
                    size=size and size.line(spec.name))

    monkeypatch.setattr(cli, "_run_sweep", run)
    return seen


def _printed(*args: str):
    result = runner.invoke(app, ["sweep", *args, "--print"])
    assert result.exit_code == 0, result.output
    return result


def _base(printed: str) -> dict:
    import yaml

    return yaml.safe_load(printed)["base"]


# ---------------------------------------------------------------- which size


def _never():
    raise AssertionError("auto had no need to ask for the device")


@pytest.mark.parametrize("requested, stored, on_cuda, expected", [
    ("auto", NO_STUDY, False, "cpu"),
    ("auto", NO_STUDY, True, "gpu"),
    ("tiny", NO_STUDY, True, "tiny"),
    ("auto", "tiny", True, "tiny"),  # the study's size, whatever the device
    ("tiny", "tiny", False, "tiny"),
    ("auto", None, True, "cpu"),  # made before sizes: the shipped bases were cpu then
    ("gpu", None, False, "gpu"),
])
def test_the_size_of_a_sweep(requested, stored, on_cuda, expected):
    ask = (lambda: on_cuda) if requested == "auto" and stored is NO_STUDY else _never
    choice = choose_size(requested, ["cpu", "gpu", "tiny"], where="spec s", on_cuda=ask,
                         study="s", stored=stored)
    assert choice.name == expected


def test_auto_runs_a_spec_without_the_machines_size_as_written():
    choice = choose_size("auto", ["small", "big"], where="spec s", on_cuda=lambda: True)
    assert choice.name is None
    assert choice.line("s") == ("spec s: no size (auto: the trials train on CUDA and the spec "
                                "has no size gpu (sizes: small, big); its base as written)")


@pytest.mark.parametrize("requested, sizes, stored, message", [
    ("big", ["cpu", "gpu"], NO_STUDY, "spec s has no size 'big'; its sizes: cpu, gpu"),
    ("cpu", [], NO_STUDY, "spec s has no size 'cpu'; its sizes: none (it runs as written)"),
    ("gpu", ["cpu", "gpu"], "cpu", "study s was made with size cpu; a worker of it runs size "
                                   "cpu (leave --size out), or use --study NEW_NAME"),
    ("auto", ["gpu"], "cpu", "study s was made with size cpu, which spec s does not have"),
])
def test_a_size_that_cannot_run_is_refused(requested, sizes, stored, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        choose_size(requested, sizes, where="spec s", on_cuda=_never, study="s", stored=stored)


# ---------------------------------------------------------------- the spec at a size


def test_the_base_takes_the_size_then_set(sized):
    assert load_spec(str(sized)).base_values["train.epochs"] == 4  # no size: as written
    cpu = load_spec(str(sized), size="cpu")
    assert (cpu.size, cpu.sizes) == ("cpu", ["cpu", "gpu", "tiny"])
    assert (cpu.base_values["train.epochs"], cpu.base_values["train.lr"]) == (1, 1e-4)
    tiny = load_spec(str(sized), ["train.epochs=7"], size="tiny")
    assert (tiny.base_values["train.epochs"], tiny.base_values["train.lr"]) == (7, 1e-5)
    assert "sizes" not in tiny.to_dict()  # folded in: the resolved spec has one base


@pytest.mark.parametrize("sizes, message", [
    ("[cpu, gpu]", "sizes must map size names to base overrides"),
    ("{auto: {}}", "sizes: bad size name 'auto'"),
    ("{cpu: 3}", "sizes.cpu must be a mapping of run config keys (or empty)"),
    ("{gpu: {train.epochz: 2}}", "sizes.gpu: unknown config key 'train.epochz'"),
    ("{gpu: {train.epochs: 0}}", "sizes.gpu: bad value 0 for train.epochs"),
])
def test_a_bad_sizes_mapping_is_one_line_exit_2(tmp_path, sizes, message):
    path = tmp_path / "bad.yaml"
    path.write_text(UNSIZED + f"sizes: {sizes}\n")
    result = runner.invoke(app, ["sweep", str(path), "--print", "--size", "auto"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"mtbert: error: sweep spec {path}: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_auto_picks_cpu_where_trials_run_on_the_cpu_and_gpu_on_cuda(sized, cuda):
    on_gpu = _printed(str(sized))
    assert _base(on_gpu.stdout)["train"] == {"epochs": 4, "lr": 1e-5}
    assert "spec sized: size gpu (auto: the trials train on CUDA)" in on_gpu.stderr
    on_cpu = _printed(str(sized), "--device", "cpu")
    assert _base(on_cpu.stdout)["train"] == {"epochs": 1, "lr": 1e-4}
    assert "spec sized: size cpu (auto: the trials train on the CPU)" in on_cpu.stderr


def test_auto_without_cuda_and_with_gpus_or_device_cuda(sized, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _base(_printed(str(sized)).stdout)["train"]["epochs"] == 1
    assert _base(_printed(str(sized), "--device", "cuda").stdout)["train"]["epochs"] == 4
    assert _base(_printed(str(sized), "--gpus", "0").stdout)["train"]["epochs"] == 4


def test_print_folds_the_size_in_and_the_printed_file_runs_the_same_anywhere(sized, tmp_path,
                                                                           cuda):
    printed = _printed(str(sized), "--size", "tiny", "--set", "train.lr=0.001").stdout
    assert "sizes" not in printed
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again = _printed(str(path))  # auto on CUDA: a spec without sizes runs as written
    assert again.stdout == printed and again.stderr == ""
    assert _base(printed)["train"] == {"epochs": 2, "lr": 0.001}


def test_a_spec_without_sizes_runs_as_written_and_names_none(unsized, cuda):
    printed = _printed(str(unsized))
    assert _base(printed.stdout) == {"train": {"epochs": 3}} and printed.stderr == ""
    result = runner.invoke(app, ["sweep", str(unsized), "--size", "cpu", "--print"])
    assert result.exit_code == 2
    assert result.stderr == (f"mtbert: error: sweep spec {unsized} has no size 'cpu'; its "
                             "sizes: none (it runs as written)\n")


def test_a_size_the_spec_lacks_is_one_line_exit_2(sized, tmp_path):
    result = runner.invoke(app, ["sweep", str(sized), "--size", "huge", "--out",
                                 str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.stderr == (f"mtbert: error: sweep spec {sized} has no size 'huge'; its "
                             "sizes: cpu, gpu, tiny\n")
    assert not (tmp_path / "runs" / "mtbert.db").exists()


# ---------------------------------------------------------------- the study keeps its size


def _sweep(spec, tmp_path, *args: str):
    return runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "runs"),
                               "--wandb-mode", "disabled", *args])


def test_the_study_stores_its_size_and_every_later_worker_runs_it(sized, tmp_path, started,
                                                                  monkeypatch):
    first = _sweep(sized, tmp_path, "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert started["study"].user_attrs["size"] == "cpu"
    assert started["study"].user_attrs["spec_def"]["base"]["train"]["epochs"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    later = _sweep(sized, tmp_path)  # auto, now on CUDA: still the study's size
    assert later.exit_code == 0, later.output
    assert (started["spec"].size, started["spec"].base_values["train.epochs"]) == ("cpu", 1)
    assert started["size"] == "spec sized: size cpu (study sized's size)"
    refused = _sweep(sized, tmp_path, "--size", "gpu")
    assert refused.exit_code == 2
    assert refused.stderr == ("mtbert: error: study sized was made with size cpu; a worker "
                              "of it runs size cpu (leave --size out), or use --study "
                              "NEW_NAME\n")
    other = _sweep(sized, tmp_path, "--size", "gpu", "--study", "sized-gpu")
    assert other.exit_code == 0, other.output
    assert started["study"].user_attrs["size"] == "gpu"
    assert started["spec"].base_values["train.epochs"] == 4


def test_a_study_made_before_sizes_runs_as_it_always_did(sized, unsized, tmp_path, started,
                                                         cuda):
    # The study of an older mtbert: its spec stored, no size (then: the base of today's cpu).
    old = load_spec(str(sized), size="cpu")
    old.size = None
    (tmp_path / "runs").mkdir()
    create_study(old, SweepOptions(out=tmp_path / "runs"))
    joined = _sweep(sized, tmp_path)
    assert joined.exit_code == 0, joined.output
    assert started["spec"].base_values["train.epochs"] == 1
    assert started["size"] == ("spec sized: size cpu (study sized has no stored size: made "
                               "before sizes, when shipped bases were the cpu size)")
    assert "size" not in started["study"].user_attrs  # not written into an old study
    plain = _sweep(unsized, tmp_path, "--study", "plain")  # a spec without sizes: no size
    assert plain.exit_code == 0 and "size" not in started["study"].user_attrs


def test_a_spec_printed_at_the_studys_size_joins_it(sized, tmp_path, started):
    printed = tmp_path / "printed.yaml"
    printed.write_text(_printed(str(sized), "--size", "tiny").stdout)
    assert _sweep(sized, tmp_path, "--size", "tiny").exit_code == 0
    joined = _sweep(printed, tmp_path)  # the study's name; no sizes: its base as written
    assert joined.exit_code == 0, joined.output
    assert started["study"].user_attrs["size"] == "tiny"
    assert started["spec"].base_values == load_spec(str(sized), size="tiny").base_values


def test_two_workers_that_chose_different_sizes_do_not_share_a_study(sized, tmp_path):
    options = SweepOptions(out=tmp_path)
    create_study(load_spec(str(sized), size="cpu"), options)
    with pytest.raises(ConfigError, match=r"^study 'sized' was made with size cpu, this sweep "
                                          r"runs gpu; pass --size cpu, or use --study "):
        create_study(load_spec(str(sized), size="gpu"), SweepOptions(out=tmp_path))


def test_reseeding_reads_the_studys_size(sized, tmp_path):
    study, _ = create_study(load_spec(str(sized), size="tiny"), SweepOptions(out=tmp_path))
    spec = stored_spec(study)
    assert (spec.size, spec.base_values["train.epochs"]) == ("tiny", 2)


# ---------------------------------------------------------------- where the size shows


@pytest.fixture
def finished(sized, tmp_path):
    """A study made at size tiny, with one complete trial."""
    study, _ = create_study(load_spec(str(sized), size="tiny"), SweepOptions(out=tmp_path))
    study.add_trial(create_trial(
        value=0.5, params={"model.dropout": 0.1},
        distributions={"model.dropout": FloatDistribution(0.0, 0.3)},
        user_attrs={"overall/geometric": 0.5, "run_dir": str(tmp_path / "trial-0000")}))
    return tmp_path


def test_studies_best_and_report_show_the_size(finished):
    out = str(finished)
    table = runner.invoke(app, ["studies", "--out", out])
    assert table.stdout.splitlines()[0].split()[-2:] == ["size", "best"]
    header = table.stdout.splitlines()[0].split()
    assert table.stdout.splitlines()[1].split()[header.index("size")] == "tiny"
    assert json.loads(runner.invoke(app, ["studies", "--out", out, "--json"]).stdout)[0][
        "size"] == "tiny"
    best = runner.invoke(app, ["best", "--out", out])
    assert best.stdout.splitlines()[:2] == ["study sized: best trial 0", "  size   tiny"]
    top = runner.invoke(app, ["best", "--out", out, "--top", "1"])
    assert top.stdout.splitlines()[0] == ("study sized: top 1 of 1 complete trials by "
                                          "overall/geometric, size tiny")
    report = runner.invoke(app, ["report", "--out", out, "--to", str(finished / "report")])
    assert report.exit_code == 0, report.output
    assert "<li>size: <b>tiny</b>" in (finished / "report" / "index.html").read_text()


def test_the_trial_job_and_its_wandb_config_carry_the_size(sized, tmp_path, monkeypatch):
    from mtbert.config import save_config
    from mtbert.studies.process import TrialRunner
    from mtbert.studies.trial import TrackedTraining

    spec = load_spec(str(sized), size="tiny")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    job = TrialRunner(spec, SweepOptions(out=tmp_path), "sized")._job(study.ask(), {}, 0)
    assert TrialJob.from_json(job.to_json()).size == "tiny"
    seen = {}

    class Tracker:
        run_id = None

        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr("mtbert.tracking.Tracker", Tracker)
    save_config(trial_config(spec, {}), tmp_path / "config.yaml")
    TrackedTraining(job, tmp_path)
    assert (seen["config"]["size"], seen["config"]["train"]["epochs"]) == ("tiny", 2)


# ---------------------------------------------------------------- the shipped specs

# The research protocol every shipped spec's base (its gpu size) follows.
PROTOCOL = {"model.encoder": "bert-base-uncased", "data.max_train_examples": 0,
            "data.max_eval_examples": 0, "train.epochs": 10, "train.steps_per_epoch": 0,
            "train.batch_size": 8, "train.lr": 1e-5}


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_every_shipped_spec_is_the_protocol_on_cuda_and_small_on_a_cpu(name):
    gpu, cpu = load_spec(name, size="gpu"), load_spec(name, size="cpu")
    assert gpu.sizes == ["cpu", "gpu"]
    assert {key: gpu.base_values[key] for key in PROTOCOL} == PROTOCOL
    assert gpu.base_values == load_spec(name).base_values  # gpu: the base as written
    small = cpu.base_values
    assert (small["model.encoder"], small["train.epochs"], small["data.max_eval_examples"]) \
        == ("minilm-l6", 2, 600)
    assert 0 < small["train.steps_per_epoch"] <= 50


def test_the_strategies_windows_act_at_both_sizes():
    """DWA sets its weights after two windows; the gradient-conflict readings come
    inside an epoch."""
    cpu, gpu = (load_spec("strategies", size=size).base_values for size in ("cpu", "gpu"))
    # cpu: windows of 10 steps in 2 x 50 steps (weights from step 21); readings every 25.
    assert (cpu["loss.dwa_window"], cpu["train.epochs"] * cpu["train.steps_per_epoch"]) \
        == (10, 100)
    assert cpu["train.log_grad_conflict_every"] == 25
    # gpu: DWA over epochs, as its paper counts (weights from epoch 3 of 10); a reading
    # every 1,000 steps of a pass of round robin over the 16k QQP part (3,824 batches of 8).
    assert (gpu["loss.dwa_window"], gpu["train.epochs"]) == (0, 10)
    assert gpu["train.log_grad_conflict_every"] == 1000 < 8544 // 8 + 16002 // 8 + 6040 // 8


def test_loss_weights_prints_the_cpu_size_without_cuda_and_the_protocol_with_size_gpu(
        monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    small = _printed("loss-weights")
    assert _base(small.stdout)["model"] == {"encoder": "minilm-l6"}
    assert "spec loss-weights: size cpu (auto: the trials train on the CPU)" in small.stderr
    protocol = _base(_printed("loss-weights", "--size", "gpu").stdout)
    assert protocol["model"] == {"encoder": "bert-base-uncased"}
    assert protocol["data"] == {"max_train_examples": 0, "max_eval_examples": 0}


def test_readme_command_1_sweeps_the_cpu_size_on_this_machine(tmp_path, started,
                                                               monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command = next(line for line in (ROOT / "README.md").read_text().splitlines()
                   if line.startswith("pip install "))
    args = command.split(" && mtbert ")[-1].split()
    assert args[:2] == ["sweep", "loss-weights"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path), "--wandb-mode", "disabled"])
    assert result.exit_code == 0, result.output
    spec, options = started["spec"], started["options"]
    assert (spec.size, options.trials, started["study"].user_attrs["size"]) == ("cpu", 3, "cpu")
    assert spec.base_values == load_spec("loss-weights", size="cpu").base_values | {
        "data.dir": "../shared/data/cs224n-qqp16k"}
    assert (spec.base_values["model.encoder"], spec.base_values["train.steps_per_epoch"]) == \
        ("minilm-l6", 34)


def test_print_check_and_size_gpu_download_nothing(tmp_path, started, monkeypatch):
    import huggingface_hub

    import mtbert.encoder

    def download(*args, **kwargs):
        raise AssertionError("an encoder was fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(mtbert.encoder, "resolve_encoder", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    printed = _printed("loss-weights", "--size", "gpu")
    assert _base(printed.stdout)["model"] == {"encoder": "bert-base-uncased"}
    checked = runner.invoke(app, ["sweep", "loss-weights", "--size", "gpu", "--check"])
    assert checked.exit_code == 0, checked.output
    swept = runner.invoke(app, ["sweep", "loss-weights", "--size", "gpu", "--out",
                                str(tmp_path), "--wandb-mode", "disabled"])
    assert swept.exit_code == 0, swept.output
    assert started["spec"].base_values["model.encoder"] == "bert-base-uncased"


def test_a_sweep_says_its_size_as_its_trials_start(sized, tmp_path, caplog):
    from mtbert.studies.runner import run_sweep, sized_spec

    options = SweepOptions(out=tmp_path, trials=0, wandb_mode="disabled")
    spec, size = sized_spec(str(sized), [], "auto", on_cuda=lambda: False, options=options)
    with caplog.at_level("INFO", logger="mtbert"):
        run = run_sweep(spec, options, size=size)
    assert run.study.user_attrs["size"] == "cpu"
    lines = [r.getMessage() for r in caplog.records]
    assert lines.index("spec sized: size cpu (auto: the trials train on the CPU)") == \
        lines.index(next(line for line in lines if line.startswith("study sized in "))) - 1


@pytest.mark.slow
def test_a_sized_sweep_runs_its_trials_at_its_size(sized, tiny_encoder, task_dir, tmp_path,
                                                   stub_trials):
    out = tmp_path / "runs"
    args = tiny_sweep_args(sized, tiny_encoder, task_dir, out, 1, "--size", "cpu")
    result = runner.invoke(app, args[1:])  # not quiet: the size line is INFO
    assert result.exit_code == 0, result.output
    assert "spec sized: size cpu (--size)" in result.stderr
    run_dir = out / "sized" / "trial-0000"
    assert TrialJob.read(run_dir).size == "cpu"
    from mtbert.config import load_config

    assert load_config(run_dir / "config.yaml").train.lr == 1e-4  # the size's, not 1e-5
    study = optuna.load_study(study_name="sized", storage=f"sqlite:///{out}/mtbert.db")
    assert study.user_attrs["size"] == "cpu" and study.trials[0].state.name == "COMPLETE"
