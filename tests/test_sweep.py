"""Sweeps: every shipped spec (its trials through the stand-in trial program, one spec
trained for real), failures, best/export, studies, signals, several trials at once."""

import json
import math
import os
import signal
import subprocess
import sys

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies.spec import shipped_specs
from mtbert.tasks import METRIC_KEYS
from conftest import use_stub_trials, wait_for, write_tiny_encoder

runner = CliRunner()


def _sweep_args(spec, tiny_encoder, task_dir, out, *extra):
    # One seed a configuration: a plain sweep (the shipped specs race 3 seeds).
    return ["-q", "sweep", spec, "--trials", "2", "--seeds", "1", "--out", str(out),
            "--data-dir", str(task_dir),
            "--wandb-mode", "disabled", "--device", "cpu",
            "--set", f"model.encoder={tiny_encoder}", "--set", f"data.cache_dir={out}/cache",
            "--set", "data.max_train_examples=0", "--set", "data.max_eval_examples=0",
            "--set", "train.steps_per_epoch=3", "--set", "train.batch_size=8",
            "--set", "model.max_length=32", *extra]


def _terminate_when_running(args, logs, *, stdout: list | None = None) -> str:
    """Start a sweep worker, SIGTERM it once every trial log says its training started; its
    stderr (exit 130). Its stdout is appended to `stdout` when given."""
    worker = subprocess.Popen([sys.executable, "-m", "mtbert", *args], stderr=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    def training():
        if worker.poll() is not None:
            pytest.fail(f"the worker exited {worker.returncode} before every trial trained: "
                        f"{worker.communicate()[1]}")
        # train() logs "training TASKS on DEVICE: ..., N optimizer steps in E epochs"
        # right before its first step.
        return all(log.exists() and "optimizer steps in" in log.read_text() for log in logs)

    wait_for(training, timeout=120, what=f"training to start in {', '.join(map(str, logs))}")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 130, err
    if stdout is not None:
        stdout.append(out)
    return err


def _trials(out, study):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{out}/mtbert.db").trials


@pytest.fixture(scope="module")
def six_layer_encoder(tmp_path_factory):
    """Specs name layers 0..5 of minilm-l6: a tiny encoder with as many layers."""
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-6"), num_hidden_layers=6)


@pytest.mark.parametrize("spec", sorted(shipped_specs()))
def test_every_shipped_spec_prints_and_its_configurations_are_run_configs(spec, tmp_path):
    """Each spec's --print loads back as the same spec, and what a worker does for each
    trial, done here in this process for two configurations its sampler draws: the run
    config built through the schema, written, read back unchanged."""
    from mtbert.config import load_config, save_config
    from mtbert.studies.samplers import make_pruner, make_sampler
    from mtbert.studies.spec import load_spec, suggest, trial_config

    printed = runner.invoke(app, ["sweep", spec, "--print", "--device", "cpu"])
    assert printed.exit_code == 0, printed.output
    (tmp_path / "printed.yaml").write_text(printed.stdout)
    resolved = load_spec(str(tmp_path / "printed.yaml"))
    assert resolved.to_dict() == load_spec(spec, size="cpu").to_dict()
    study = optuna.create_study(sampler=make_sampler(resolved.sampler),
                                pruner=make_pruner(resolved.pruner),
                                directions=resolved.directions)
    for params in resolved.enqueue:
        study.enqueue_trial(params)
    for number in range(2):
        trial = study.ask()
        params = suggest(trial, resolved)
        config = trial_config(resolved, params)
        save_config(config, tmp_path / f"{number}.yaml")
        assert load_config(tmp_path / f"{number}.yaml").to_dict() == config.to_dict()
        study.tell(trial, [0.5] * len(resolved.directions))


@pytest.mark.slow
def test_a_shipped_spec_trains_two_trials(six_layer_encoder, task_dir, tmp_path):
    spec = "strategies"  # every schedule and loss method: the most code a trial runs
    out = tmp_path / "runs"
    result = runner.invoke(app, _sweep_args(spec, six_layer_encoder, task_dir, out))
    assert result.exit_code == 0, result.output
    trials = [t for t in _trials(out, spec) if t.state.name != "WAITING"]  # enqueued, not run
    assert len(trials) == 2
    for t in trials:
        assert t.state.name in ("COMPLETE", "PRUNED"), t.user_attrs.get("fail_reason")
        metrics = {key: t.user_attrs[key] for key in METRIC_KEYS}
        assert all(0.0 <= metrics[key] <= 1.0 for key in METRIC_KEYS if key != "sts/pearson")
        assert math.isfinite(metrics["sts/pearson"]) and -1.0 <= metrics["sts/pearson"] <= 1.0
        run = out / spec / f"trial-{t.number:04d}"
        assert t.user_attrs["run_dir"] == str(run.resolve())
        if t.state.name == "COMPLETE":  # the metrics of the model the run kept
            best = json.loads((run / "summary.json").read_text())["best"]["metrics"]
            assert metrics == {key: best[key] for key in METRIC_KEYS}
        else:  # pruned: those of one of its evaluations
            records = [json.loads(line) for line in
                       (run / "metrics.jsonl").read_text().splitlines()]
            assert metrics in [{key: r[key] for key in METRIC_KEYS} for r in records]
    assert result.stdout.splitlines()[0].startswith("trial ")


@pytest.mark.slow
def test_failed_trials_do_not_stop_the_study_and_no_finish_exits_1(tiny_encoder, task_dir,
                                                                    tmp_path, monkeypatch):
    import wandb  # noqa: F401 - a core dependency, never skipped
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    out = tmp_path / "runs"
    spec = tmp_path / "nan.yaml"
    spec.write_text("name: nan\nbase:\n  train.lr: 1.0e+30\n  optim.max_grad_norm: 0\n"
                    "  train.log_every: 1\nspace:\n  model.dropout: {type: float, low: 0.0, "
                    "high: 0.2}\npruner: {name: none}\n")
    args = _sweep_args(str(spec), tiny_encoder, task_dir, out)
    args[args.index("--wandb-mode") + 1] = "offline"  # W&B prints after the error: no matter
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "no trial could finish" in result.stderr
    trials = _trials(out, "nan")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert "loss became nan" in trials[0].user_attrs["fail_reason"].lower()


@pytest.mark.slow
def test_second_sweep_adds_trials_best_exports_and_eval_scores(tiny_encoder, task_dir, tmp_path):
    out = tmp_path / "runs"
    for _ in range(2):
        result = runner.invoke(app, _sweep_args("hidden-size", tiny_encoder, task_dir, out,
                                                "--keep-top", "1"))
        assert result.exit_code == 0, result.output
    trials = _trials(out, "hidden-size")
    assert [t.number for t in trials] == [0, 1, 2, 3]
    kept = [t.number for t in trials if (out / "hidden-size" / f"trial-{t.number:04d}" /
                                         "model").exists()]
    assert len(kept) == 1

    listed = runner.invoke(app, ["studies", "--out", str(out)])
    assert listed.exit_code == 0
    assert listed.stdout.splitlines()[1].split()[:2] == ["hidden-size", "4"]

    export = tmp_path / "best-model"
    best = runner.invoke(app, ["best", "--out", str(out), "--export", str(export)])
    assert best.exit_code == 0, best.output
    assert f"best trial {kept[0]}" in best.stdout
    card = (export / "README.md").read_text()
    assert "study: hidden-size" in card and f"trial: {kept[0]}" in card
    assert "model.head_hidden" in card
    scored = runner.invoke(app, ["eval", str(export), "--task", "qqp", "--file",
                                 str(task_dir / "quora-dev.csv"), "--json", "--device", "cpu"])
    assert scored.exit_code == 0, scored.output
    assert 0.0 <= json.loads(scored.stdout)["qqp/acc"] <= 1.0
    again = runner.invoke(app, ["best", "--out", str(out), "--export", str(export)])
    assert again.exit_code == 2 and "not empty" in again.stderr


@pytest.mark.slow
def test_wandb_offline_runs_one_per_trial(tiny_encoder, task_dir, tmp_path, monkeypatch):
    import wandb  # noqa: F401 - a core dependency, never skipped
    out = tmp_path / "runs"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = _sweep_args("loss-weights", tiny_encoder, task_dir, out)
    args[args.index("--wandb-mode") + 1] = "offline"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {t.user_attrs["wandb_run_id"] for t in _trials(out, "loss-weights")}
    assert {r.name.rsplit("-", 1)[1] for r in runs} == ids


@pytest.mark.parametrize("body, message", [
    ("space:\n  train.lrr: {type: float, low: 1, high: 2}\n",
     "space: unknown config key 'train.lrr'"),
    ("space:\n  train.lr: {type: float, low: 2, high: 1}\n", "space.train.lr: low 2 > high 1"),
    ("space:\n  train.lr: {type: beta, low: 1, high: 2}\n",
     "space.train.lr: type 'beta'; valid: float, int, categorical"),
    ("space:\n  train.lr: {type: float, low: 0, high: 1, log: true}\n",
     "a log distribution needs low > 0"),
    ("space:\n  train.schedule: {type: categorical, choices: [zigzag]}\n",
     "space.train.schedule: value 'zigzag' is invalid"),
    ("space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\nobjective: sst/f1\n",
     "objective 'sst/f1' is not a metric"),
    ("space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\npruner: {name: magic}\n",
     "pruner 'magic'; valid: median, hyperband, successive_halving, none"),
    ("space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\nsampler: {name: tpe, "
     "n_startup: 3}\n", "sampler tpe:"),
    ("spaces: {}\n", "unknown key 'spaces'; valid: name, description, base, space"),
    ("base:\n  train.epochs: 0\nspace:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\n",
     "base: bad value 0 for train.epochs"),
    ("space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\nsampler: tpe\n",
     "sampler must be a mapping such as {name: tpe, seed: 0}"),
    ("space:\n  train.alpha: {type: float, low: 0, high: 1, when: {train.schedule: propo}}\n",
     "space.train.alpha.when: bad value 'propo' for train.schedule"),
    ("space:\n  train.alpha: {type: float, low: 0, high: 1, when: {train.schedule: annealed}}\n"
     "  train.schedule: {type: categorical, choices: [annealed, proportional]}\n",
     "space.train.alpha.when: 'train.schedule' must come before 'train.alpha'"),
])
def test_bad_specs_exit_2_before_any_trial(tmp_path, body, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(body)
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "runs"),
                                 "--wandb-mode", "disabled"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "mtbert.db").exists()


def test_unknown_spec_name_lists_the_shipped_ones():
    result = runner.invoke(app, ["sweep", "nope"])
    assert result.exit_code == 2
    assert "unknown sweep 'nope'; shipped: alpha, default, encoder-training, hidden-size" in \
        result.stderr


def test_print_shows_the_resolved_spec_without_running(tmp_path):
    result = runner.invoke(app, ["sweep", "alpha", "--print", "--set", "train.epochs=7",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0
    assert "epochs: 7" in result.stdout and "when:" in result.stdout
    assert not (tmp_path / "mtbert.db").exists()


def test_unreachable_storage_exits_1_with_masked_password(tmp_path):
    result = runner.invoke(app, ["sweep", "alpha", "--wandb-mode", "disabled", "--storage",
                                 "postgresql://mtbert:s3cret@127.0.0.1:1/none", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 1
    assert "cannot reach the study storage postgresql://mtbert:***@127.0.0.1:1/none" in \
        result.stderr
    assert "s3cret" not in result.output


def test_device_cuda_without_a_gpu_is_refused_before_the_storage_or_any_trial(monkeypatch,
                                                                             tmp_path):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["sweep", "alpha", "--wandb-mode", "disabled", "--device",
                                 "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "mtbert: error: --device cuda was asked for, but PyTorch sees no CUDA device; pass "
        "--device cpu, or --device auto to use a GPU only where there is one")
    assert list(tmp_path.iterdir()) == []  # no storage made, no run directory
    # With a GPU there, the same command goes on to the storage (here: one that is down).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = runner.invoke(app, ["sweep", "alpha", "--wandb-mode", "disabled", "--device",
                                 "cuda", "--storage", "postgresql://u@127.0.0.1:1/none"])
    assert result.exit_code == 1 and "cannot reach the study storage" in result.stderr


def test_wandb_mode_without_wandb_installed_exits_2(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    result = runner.invoke(app, ["sweep", "alpha", "--wandb-mode", "offline", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("mtbert: error: --wandb-mode offline needs the wandb "
                                     "package: pip install wandb (or --wandb-mode disabled)")


def test_best_with_several_studies_asks_for_one(tmp_path):
    storage = f"sqlite:///{tmp_path}/mtbert.db"
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=storage)
    result = runner.invoke(app, ["best", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds 2 studies, pick one with --study: a, b" in result.stderr
    missing = runner.invoke(app, ["best", "--out", str(tmp_path / "empty")])
    assert missing.exit_code == 2 and "no study storage at" in missing.stderr


@pytest.mark.slow
def test_an_interrupted_sweep_prints_the_table_so_far(tiny_encoder, task_dir, tmp_path,
                                                      monkeypatch):
    # Trial 0 is quick, trial 1 runs until the worker is stopped.
    use_stub_trials(monkeypatch, step_s=0.01)
    (tmp_path / "two.yaml").write_text(
        "name: two\nspace:\n  train.steps_per_epoch: {type: categorical, choices: [3, 5000]}\n"
        "enqueue:\n  - {train.steps_per_epoch: 3}\n  - {train.steps_per_epoch: 5000}\n"
        "pruner: {name: none}\n")
    out = tmp_path / "runs"
    stdout: list[str] = []
    err = _terminate_when_running(_sweep_args(str(tmp_path / "two.yaml"), tiny_encoder,
                                              task_dir, out),
                                  [out / "two" / "trial-0001" / "trial.log"], stdout=stdout)
    assert "Traceback" not in err and "interrupted" in err
    # The stopped trial is queued again, to resume when the sweep runs again.
    trials = _trials(out, "two")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[2].system_attrs["retry_history"] == [1]
    rows = stdout[0].splitlines()
    assert rows[0].split()[0] == "trial" and len(rows) == 2
    assert rows[1].split()[0] == "0"


@pytest.mark.slow
def test_sigterm_ends_the_running_trial_as_fail(tiny_encoder, task_dir, tmp_path, monkeypatch):
    use_stub_trials(monkeypatch, step_s=0.01)
    out = tmp_path / "runs"
    args = _sweep_args("alpha", tiny_encoder, task_dir, out, "--set", "train.steps_per_epoch=5000")
    err = _terminate_when_running(args, [out / "alpha" / "trial-0000" / "trial.log"])
    assert "Traceback" not in err and "interrupted" in err
    trials = _trials(out, "alpha")
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["fail_reason"] == "interrupted"


@pytest.mark.slow
def test_multi_objective_study_lists_the_front_and_exports_by_trial(tiny_encoder, task_dir,
                                                                     tmp_path):
    spec = tmp_path / "mo.yaml"
    spec.write_text("name: mo\nspace:\n  model.dropout: {type: float, low: 0.0, high: 0.3}\n"
                    "objective: [sst/acc, qqp/acc]\ndirections: [maximize, maximize]\n"
                    "sampler: {name: nsga2, seed: 0}\n")
    out = tmp_path / "runs"
    result = runner.invoke(app, _sweep_args(str(spec), tiny_encoder, task_dir, out))
    assert result.exit_code == 0, result.output
    best = runner.invoke(app, ["best", "--out", str(out)])
    assert best.exit_code == 0 and "Pareto front of" in best.stdout
    refused = runner.invoke(app, ["best", "--out", str(out), "--export", str(tmp_path / "m")])
    assert refused.exit_code == 2 and "pick one from the front with --trial N" in refused.stderr
    front = optuna.load_study(study_name="mo", storage=f"sqlite:///{out}/mtbert.db").best_trials
    exported = runner.invoke(app, ["best", "--out", str(out), "--trial", str(front[0].number),
                                   "--export", str(tmp_path / "m")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "m" / "model.safetensors").exists()


def _overlap(a, b) -> bool:
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


@pytest.mark.slow
def test_trials_per_gpu_runs_trials_concurrently(tiny_encoder, task_dir, tmp_path, monkeypatch):
    use_stub_trials(monkeypatch, epoch_s=0.5)
    out = tmp_path / "runs"
    spec = tmp_path / "pack.yaml"
    spec.write_text("name: pack\nspace:\n  model.dropout: {type: float, low: 0.0, high: 0.3}\n"
                    "pruner: {name: none}\n")
    args = _sweep_args(str(spec), tiny_encoder, task_dir, out, "--trials-per-gpu", "2",
                       "--keep-top", "1")
    args[args.index("--trials") + 1] = "4"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    trials = _trials(out, "pack")
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert any(_overlap(a, b) for a in trials for b in trials if a.number < b.number)
    # keep-top from concurrent callbacks: exactly the best trial keeps its model.
    kept = [t.number for t in trials if (out / "pack" / f"trial-{t.number:04d}" / "model").is_dir()]
    best = max(trials, key=lambda t: t.value).number
    assert kept == [best]


@pytest.mark.slow
def test_sigterm_with_trials_per_gpu_ends_every_running_trial(tiny_encoder, task_dir, tmp_path,
                                                              monkeypatch):
    use_stub_trials(monkeypatch, step_s=0.01)
    out = tmp_path / "runs"
    args = _sweep_args("alpha", tiny_encoder, task_dir, out, "--set", "train.steps_per_epoch=5000",
                       "--trials-per-gpu", "2")
    err = _terminate_when_running(
        args, [out / "alpha" / f"trial-{n:04d}" / "trial.log" for n in (0, 1)])
    assert "Traceback" not in err and "interrupted" in err
    trials = _trials(out, "alpha")
    # Both stopped trials are queued again, to resume when the sweep runs again.
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert all(t.user_attrs.get("fail_reason") == "interrupted" for t in trials[:2])
    assert sorted(t.system_attrs["retry_history"][-1] for t in trials[2:]) == [0, 1]


def test_each_worker_of_a_study_draws_its_own_configurations(tmp_path):
    from mtbert.studies.runner import SweepOptions, create_study
    from mtbert.studies.spec import load_spec, suggest

    spec_path = tmp_path / "draws.yaml"
    spec_path.write_text("name: draws\nspace:\n  train.lr: {type: float, low: 1.0e-6, "
                         "high: 1.0e-4, log: true}\n  train.batch_size: {type: categorical, "
                         "choices: [8, 16, 32, 64]}\nsampler: {name: random, seed: 0}\n")
    spec = load_spec(str(spec_path))
    options = SweepOptions(trials=3, out=tmp_path / "runs", device="cpu", heartbeat=0)
    options.out.mkdir()
    # Three workers (or one sweep run three times) on one study, each asking 3 trials.
    drawn = []
    for _ in range(3):
        study, _ = create_study(spec, options)
        drawn.append([tuple(suggest(study.ask(), spec).values()) for _ in range(3)])
    assert len({draw for draws in drawn for draw in draws}) == 9
    assert study.user_attrs["workers_started"] == 3
    # The first worker draws what the spec's seed draws alone: a study swept once by one
    # worker is as reproducible as before.
    alone = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert drawn[0] == [tuple(suggest(alone.ask(), spec).values()) for _ in range(3)]
