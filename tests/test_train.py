"""The training loop end to end on a tiny random model: files, determinism, resume."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mtbert
from mtbert.cli import app
from mtbert.errors import ResumeStateError, TrainingError
from mtbert.tasks import METRIC_KEYS
from conftest import rng_states_across_a_resume, timeless_metrics, train_killed_and_resumed
from mtbert.rundir import RESUME_FILE
from mtbert.train import train


def test_run_directory_files(tiny_config, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(), run_dir=run, device="cpu", progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 6), (2, 12)]
    assert all(key in records[0] for key in METRIC_KEYS)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["selection_metric"] == "overall/geometric"
    assert set(on_disk["best"]["metrics"]) == set(METRIC_KEYS)
    assert on_disk["best"]["epoch"] in (1, 2)
    assert on_disk["data"]["qqp/train"]["rows"] == 48
    assert on_disk["env"]["device"] == "cpu" and on_disk["env"]["mtbert"] == mtbert.__version__
    assert on_disk["examples_per_s"] > 0 and summary == on_disk
    for name in ("config.yaml", "encoder_config.json", "model.safetensors", "vocab.txt",
                 "metrics.json", "README.md"):
        assert (run / "model" / name).exists(), name
    best = json.loads((run / "model" / "metrics.json").read_text())
    assert best == on_disk["best"]["metrics"]
    assert "## Dev metrics" in (run / "model" / "README.md").read_text()


def test_on_step_sees_every_step_and_the_loss_only_where_the_loop_reads_it(tiny_config,
                                                                          tmp_path):
    """A sweep's progress file comes from on_step: it must cost no host-device sync, so
    the loss it gets is the one the loop reads every train.log_every steps anyway."""
    calls = []
    run = tmp_path / "run"
    train(tiny_config(train={"log_every": 4}), run_dir=run, device="cpu", progress=False,
          on_step=lambda **position: calls.append(position))
    assert [(c["epoch"], c["step"]) for c in calls] == [
        (0, step) for step in range(7)] + [(1, step) for step in range(6, 13)]
    assert {(c["epochs"], c["steps"]) for c in calls} == {(2, 12)}
    readings = {c["step"]: c["loss"] for c in calls if c["loss"] is not None}
    assert sorted(readings) == [4, 6, 10, 12]  # every 4 steps and where each epoch ends
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record, (window, rest) in zip(records, [(4, 6), (10, 12)]):
        # The epoch's train/loss is the mean of the same readings, per step.
        assert record["train/loss"] == pytest.approx((4 * readings[window] +
                                                      2 * readings[rest]) / 6)


def test_same_seed_same_metrics_other_seed_differs(tiny_config, tmp_path):
    a = train(tiny_config(), run_dir=tmp_path / "a", device="cpu", progress=False)
    b = train(tiny_config(), run_dir=tmp_path / "b", device="cpu", progress=False)
    c = train(tiny_config(train={"seed": 1}), run_dir=tmp_path / "c", device="cpu",
              progress=False)
    assert a["best"] == b["best"]
    assert a["best"]["metrics"] != c["best"]["metrics"]


def test_resume_after_a_kill_matches_the_uninterrupted_run(tiny_config, tmp_path):
    full, resumed = train_killed_and_resumed(tiny_config(train={"epochs": 3}), tmp_path)
    assert resumed["best"] == full["best"]
    assert timeless_metrics(tmp_path / "killed") == timeless_metrics(tmp_path / "full")


def test_single_task_training(tiny_config, tmp_path):
    summary = train(tiny_config(data={"tasks": ["sts"]}, train={"select_metric": "sts/pearson"}),
                    run_dir=tmp_path / "sts", device="cpu", progress=False)
    assert set(summary["best"]["metrics"]) == {"sts/pearson", "overall/arithmetic",
                                               "overall/geometric"}


def test_training_learns_the_toy_tasks(tiny_config, tmp_path):
    config = tiny_config(model={"pooling": "mean"},
                         train={"epochs": 4, "steps_per_epoch": 30, "lr": 1e-3})
    summary = train(config, run_dir=tmp_path / "learn", device="cpu", progress=False)
    best = summary["best"]["metrics"]
    # Chance is 0.2 and 0.5; the label word is in every SST sentence, duplicates are copies.
    assert best["sst/acc"] >= 0.4 and best["qqp/acc"] >= 0.7


def test_patience_stops_early(tiny_config, tmp_path):
    config = tiny_config(train={"epochs": 6, "patience": 1, "lr": 0.0})
    summary = train(config, run_dir=tmp_path / "p", device="cpu", progress=False)
    assert summary["stopped_early"] and summary["epochs_completed"] == 2


def test_one_pass_epochs_and_grad_accum(tiny_config, tmp_path):
    config = tiny_config(train={"epochs": 1, "steps_per_epoch": 0, "grad_accum": 2})
    summary = train(config, run_dir=tmp_path / "pass", device="cpu", progress=False)
    assert summary["steps"] == 9  # 3 tasks x 6 batches of 8 = 18 batches, 2 per step


def test_sampled_steps_of_several_batches_spend_one_pass_in_fewer_steps(tiny_config, tmp_path):
    def steps(batches_per_step: int) -> int:
        config = tiny_config(train={"epochs": 1, "steps_per_epoch": 0, "schedule": "temperature",
                                    "batches_per_step": batches_per_step})
        run = tmp_path / str(batches_per_step)
        return train(config, run_dir=run, device="cpu", progress=False)["steps"]

    assert [steps(1), steps(4)] == [18, 5]  # 18 batches of 8: ceil(18 / 4) = 5 steps


def test_resume_with_sampled_steps_of_several_batches_matches_the_uninterrupted_run(
        tiny_config, tmp_path):
    config = tiny_config(loss={"method": "pcgrad"},
                         train={"epochs": 3, "schedule": "annealed", "batches_per_step": 3})
    full, resumed = train_killed_and_resumed(config, tmp_path, kill_epoch=1)
    assert resumed["best"] == full["best"] and resumed["steps"] == 18
    assert timeless_metrics(tmp_path / "killed") == timeless_metrics(tmp_path / "full")


def test_nan_loss_is_a_training_error(tiny_config, tmp_path):
    config = tiny_config(train={"lr": 1e30, "log_every": 1}, optim={"max_grad_norm": 0.0})
    with pytest.raises(TrainingError, match="loss became"):
        train(config, run_dir=tmp_path / "nan", device="cpu", progress=False)


def test_weighted_loss_scales_the_task_loss():
    from mtbert.balancing import make_loss_combiner
    from mtbert.config import LossConfig
    combiner = make_loss_combiner(LossConfig(method="weighted",
                                             weights={"sst": 2.0, "qqp": 1.0, "sts": 0.5}),
                                  ["sst", "qqp", "sts"])
    losses = {"sst": torch.tensor(1.0), "sts": torch.tensor(4.0)}
    assert combiner(losses).item() == pytest.approx(4.0)
    assert make_loss_combiner(LossConfig(), ["sst"])(losses).item() == pytest.approx(5.0)


def test_exported_model_predicts_through_the_python_api(tiny_config, tmp_path):
    train(tiny_config(train={"epochs": 1}), run_dir=tmp_path / "r", device="cpu", progress=False)
    model = mtbert.load(tmp_path / "r" / "model")
    sst = model.predict("sst", ["good movie", "awful plot"])
    sts = model.predict("sts", [("a man plays", "a woman plays")])
    qqp = model.predict("qqp", [("what is it", "what is it")])
    assert all(isinstance(x, int) and 0 <= x < 5 for x in sst) and len(sst) == 2
    assert isinstance(sts[0], float) and 0.0 <= sts[0] <= 5.0
    assert qqp[0] in (0, 1)
    with pytest.raises(mtbert.errors.MtbertError, match="takes 2 text"):
        model.predict("qqp", ["only one"])


def test_sampling_by_size_over_equal_capped_tasks_warns(tiny_config, tmp_path, caplog):
    config = tiny_config(train={"schedule": "proportional", "epochs": 1})
    with caplog.at_level("WARNING", logger="mtbert"):
        train(config, run_dir=tmp_path / "p", device="cpu", progress=False)
    assert "every task has 48 training examples" in caplog.text
    assert "samples them uniformly" in caplog.text


def _task_losses(run: Path) -> list[float]:
    """Each epoch's mean training loss of each task (unweighted), epoch by epoch."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[f"train/loss_{t}"] for r in records for t in ("sst", "qqp", "sts")]


def test_clipping_erases_fixed_weights_when_each_step_has_one_task(tiny_config, tmp_path,
                                                                  caplog):
    # Every step clipped (a clip far below any gradient norm): a step on one task moves
    # the model the same way whatever that task's weight, so two weightings train the
    # same model; with every task in each step the weights shape the step.
    def run(name: str, schedule: str, weights: dict) -> Path:
        config = tiny_config(train={"schedule": schedule}, optim={"max_grad_norm": 1e-3},
                             loss={"method": "weighted", "weights": weights})
        train(config, run_dir=tmp_path / name, device="cpu", progress=False)
        return tmp_path / name

    even, skewed = {"sst": 1.0, "qqp": 1.0, "sts": 1.0}, {"sst": 10.0, "qqp": 0.1, "sts": 3.0}
    with caplog.at_level("WARNING", logger="mtbert"):
        one_task = [run(f"rr-{i}", "round_robin_batch", w) for i, w in enumerate((even, skewed))]
    assert "a weight changes only steps whose gradient norm stays under the clip" in caplog.text
    assert _task_losses(one_task[0]) == pytest.approx(_task_losses(one_task[1]), rel=1e-5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtbert"):
        every_task = [run(f"tb-{i}", "triple_batch", w) for i, w in enumerate((even, skewed))]
    assert "a weight changes only" not in caplog.text
    assert _task_losses(every_task[0]) != pytest.approx(_task_losses(every_task[1]), rel=1e-3)


@pytest.mark.parametrize("clip, clipped", [(1e-6, 1.0), (1e6, 0.0), (0.0, None)])
def test_the_share_of_clipped_steps_is_logged_per_epoch(tiny_config, tmp_path, clip, clipped):
    train(tiny_config(optim={"max_grad_norm": clip}), run_dir=tmp_path / "r", device="cpu",
          progress=False)
    records = [json.loads(line)
               for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/clipped") for r in records] == [clipped, clipped]


def _clipped_keys(run: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in json.loads(line).items() if k.startswith("train/clipped/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_share_of_clipped_steps_is_logged_per_task(tiny_config, tmp_path):
    def run(name: str, clip: float, **train_keys) -> Path:
        config = tiny_config(optim={"max_grad_norm": clip}, train=train_keys)
        train(config, run_dir=tmp_path / name, device="cpu", progress=False)
        return tmp_path / name

    tasks = ("sst", "qqp", "sts")
    assert _clipped_keys(run("all", 1e-6, schedule="proportional", batches_per_step=2)) == \
        [{f"train/clipped/{t}": 1.0 for t in tasks}] * 2
    assert _clipped_keys(run("off", 0.0)) == [{}, {}]
    # Round robin, one task a step, two steps of each per epoch: the pooled share is the
    # tasks' mean.
    records = [json.loads(line) for line in
               (run("some", 1.0) / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        shares = [record[f"train/clipped/{t}"] for t in tasks]
        assert all(share in (0.0, 0.5, 1.0) for share in shares)
        assert record["train/clipped"] == pytest.approx(sum(shares) / 3, abs=1e-6)
    assert any(0 < record["train/clipped"] < 1 for record in records)
    # One task per epoch: the others have no step, and no key.
    assert _clipped_keys(run("epochs", 1e-6, schedule="round_robin_epoch")) == \
        [{"train/clipped/sst": 1.0}, {"train/clipped/qqp": 1.0}]


# The loop state as the code before LoopState saved it: a dict of these keys, and no
# CUDA random states in the payload.
OLD_STATE_KEYS = ("epoch", "step", "best", "history", "bad_evals", "train_time",
                  "train_examples", "finished", "grad_cos")
OLD_PAYLOAD_KEYS = ("model", "combiner", "optimizer", "scheduler", "samplers", "rng")


def _rewrite_in_the_old_format(run_dir):
    saved = torch.load(run_dir / RESUME_FILE, weights_only=True)
    old = {key: saved[key] for key in OLD_PAYLOAD_KEYS}
    old["state"] = {key: saved["state"][key] for key in OLD_STATE_KEYS}
    assert set(old["state"]) == set(saved["state"])  # the loop state kept its keys
    torch.save(old, run_dir / RESUME_FILE)


def test_a_resume_state_of_the_old_format_resumes_to_the_uninterrupted_result(tiny_config,
                                                                             tmp_path):
    full, resumed = train_killed_and_resumed(tiny_config(train={"epochs": 3}), tmp_path,
                                             before_resume=_rewrite_in_the_old_format)
    assert resumed["best"] == full["best"]
    assert (resumed["steps"], resumed["epochs_completed"]) == (18, 3)
    assert timeless_metrics(tmp_path / "killed") == timeless_metrics(tmp_path / "full")


def test_resume_restores_the_cpu_random_state(tiny_config, tmp_path):
    # Dropout 0.1: every training step draws from the CPU generator.
    states, saved = rng_states_across_a_resume(tiny_config(), tmp_path, "cpu",
                                               torch.get_rng_state)
    assert torch.equal(saved["rng"], states["full", 0])
    assert saved["cuda_rng"] == []  # CUDA never started in a CPU run
    assert not torch.equal(states["full", 0], states["full", 1])  # epoch 2 drew
    assert torch.equal(states["resumed", 1], states["full", 1])


class _Touch:
    """Unpickling it creates a file: what an unsafe loader would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _garbage(path):
    path.write_bytes(b"\x80\x04garbage, not a checkpoint\xff" * 8)


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _arbitrary_object(path):
    torch.save({"model": _Touch(path.parent / "pwned")}, path)


def _other_keys(path):
    torch.save({"weights": torch.zeros(2)}, path)


REFUSED = ("the safe loader refused it: it holds something other than tensors and plain "
           "values, or is no PyTorch file")


@pytest.mark.parametrize("damage, reason", [
    (_garbage, REFUSED),
    (_truncated, "not a complete PyTorch file: truncated or damaged"),
    (_arbitrary_object, REFUSED),
    (_other_keys, "no model, combiner, optimizer, scheduler, samplers, rng, state"),
])
def test_a_resume_state_mtbert_did_not_write_is_a_one_line_error(tiny_config, tmp_path,
                                                                 damage, reason):
    config = tiny_config(train={"epochs": 1})
    train(config, run_dir=tmp_path / "run", device="cpu", progress=False)
    path = tmp_path / "run" / RESUME_FILE
    damage(path)
    with pytest.raises(ResumeStateError) as caught:
        train(config, run_dir=tmp_path / "run", device="cpu", progress=False, resume=True)
    assert str(caught.value) == f"{path}: not a resume state written by mtbert ({reason})"
    assert caught.value.exit_code == 2
    assert not (tmp_path / "run" / "pwned").exists()


def test_cli_resume_from_a_truncated_state_exits_2_with_one_line(tiny_config, tmp_path):
    train(tiny_config(train={"epochs": 1}), run_dir=tmp_path / "run", device="cpu",
          progress=False)
    _truncated(tmp_path / "run" / RESUME_FILE)
    result = CliRunner().invoke(app, ["--quiet", "train", "--resume", str(tmp_path / "run"),
                                      "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtbert: error: ")
    assert lines[0].endswith("not a resume state written by mtbert (not a complete PyTorch "
                             "file: truncated or damaged)")


class _KilledBetweenWrites(Exception):
    pass


@pytest.mark.parametrize("point", ["before the resume state", "before the metrics line"])
def test_a_kill_between_an_epochs_writes_never_holds_an_epoch_twice(tiny_config, tmp_path,
                                                                   monkeypatch, point):
    """Checkpoint, then announce: killed after epoch 1's model directory (before its
    resume state), or after its resume state (before its metrics line), the resumed run
    ends as the uninterrupted one with each epoch's line once."""
    import mtbert.train as training

    config = tiny_config(train={"epochs": 3})
    full = train(config, run_dir=tmp_path / "full", device="cpu", progress=False)
    target = {"before the resume state": "save_resume_state",
              "before the metrics line": "append_metrics"}[point]
    real, calls = getattr(training, target), []

    def killed_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2's: epoch 1 is whole on disk
            raise _KilledBetweenWrites
        return real(*args, **kwargs)

    monkeypatch.setattr(training, target, killed_at_the_second)
    with pytest.raises(_KilledBetweenWrites):
        train(config, run_dir=tmp_path / "killed", device="cpu", progress=False)
    monkeypatch.setattr(training, target, real)
    epochs_on_disk = [r["epoch"] for r in mtbert.rundir.read_metrics(tmp_path / "killed")]
    assert epochs_on_disk == [1]  # epoch 2's line never came before its checkpoint
    resumed = train(config, run_dir=tmp_path / "killed", device="cpu", progress=False,
                    resume=True)
    lines = mtbert.rundir.read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert resumed["best"] == full["best"]
