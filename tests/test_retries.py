"""Long studies that survive: a trial whose worker is killed, or a sweep that is stopped,
is queued again and its retry resumes from the last finished epoch; out of GPU memory is a
trial's FAIL with its reason, never the study's end. Real worker processes and real
signals; the trials are the stand-in trial program (tests/stub_trial.py), whose epochs
take EPOCH_S seconds and whose resumed run ends exactly as an uninterrupted one, except in
the one test that kills and resumes a real training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from conftest import POSTGRES_URL, STUB_TRIAL, postgres_unreachable, use_stub_trials, wait_for
from mtbert.studies.job import RETRY_HISTORY
from mtbert.studies.retention import prune_checkpoints

# One configuration (the seed is the only "parameter"), 3 epochs, an objective reported
# every epoch to a pruner that never prunes: the retry must continue the one curve.
SPEC = """name: survive
space:
  train.seed: {type: categorical, choices: [0]}
objective: overall/arithmetic
pruner: {name: median, n_startup_trials: 1000}
"""
PG = POSTGRES_URL
EPOCH_S = 0.7  # a stand-in epoch: long enough to stop a trial between two


@pytest.fixture
def stub(monkeypatch):
    use_stub_trials(monkeypatch, epoch_s=EPOCH_S)


def _worker(spec: Path, storage: str, study: str, out: Path, encoder: Path, data: Path,
            *extra: str, steps: int = 60, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "mtbert", "-q", "sweep", str(spec), "--study", study,
            "--storage", storage, "--out", str(out), "--data-dir", str(data), "--device", "cpu",
            "--wandb-mode", "disabled", "--heartbeat", "1", "--grace", "2",
            "--set", f"model.encoder={encoder}", "--set", "model.max_length=32",
            "--set", "data.max_train_examples=0", "--set", "data.max_eval_examples=0",
            "--set", "train.epochs=3", "--set", f"train.steps_per_epoch={steps}",
            "--set", "train.batch_size=8", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**(env or os.environ), "OMP_NUM_THREADS": "1"})


def _epochs_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    yield PG


@pytest.mark.slow
def test_a_killed_workers_trial_resumes_in_another_worker_and_ends_as_uninterrupted(
        storage, stub, tiny_encoder, task_dir, tmp_path):
    _killed_worker_resumed(storage, tiny_encoder, task_dir, tmp_path)


@pytest.mark.slow
def test_a_killed_workers_real_training_resumes_and_ends_as_uninterrupted(tiny_encoder,
                                                                         task_dir, tmp_path):
    _killed_worker_resumed(f"sqlite:///{tmp_path / 'shared.db'}", tiny_encoder, task_dir,
                           tmp_path)


def _killed_worker_resumed(storage, tiny_encoder, task_dir, tmp_path):
    """SIGKILL a worker after its trial's first epoch; another worker's retry resumes it
    and ends with the metrics of the same trial run without interruption."""
    spec = tmp_path / "survive.yaml"
    spec.write_text(SPEC)
    study = f"survive-{uuid.uuid4().hex[:8]}"
    shared = tmp_path / "runs"  # one file system for both workers, as on one machine
    try:
        doomed = _worker(spec, storage, study, shared, tiny_encoder, task_dir, "--trials", "1")
        first = shared / study / "trial-0000"
        wait_for(lambda: _epochs_done(first) >= 1 and (first / "resume.pt").exists()
                 or doomed.poll() is not None, timeout=180, what="the first epoch")
        assert doomed.poll() is None, doomed.communicate()[1]
        doomed.send_signal(signal.SIGKILL)  # the trial process follows (parent-death signal)
        doomed.wait(timeout=30)
        killed_after = _epochs_done(first)
        assert 1 <= killed_after < 3
        time.sleep(2.5)  # let the heartbeat go stale: past --grace, as a real preemption
        later = _worker(spec, storage, study, shared, tiny_encoder, task_dir, "--trials", "1")
        _, err = later.communicate(timeout=300)
        assert later.returncode == 0, err
        trials = optuna.load_study(study_name=study, storage=_driver(storage)).trials
    finally:
        _delete(storage, study)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.system_attrs[RETRY_HISTORY] == [0]
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    assert retry.user_attrs["run_dir"].endswith("trial-0001")
    assert sorted(retry.intermediate_values) == [1, 2, 3]  # one curve, not a restart
    summary = json.loads((shared / study / "trial-0001" / "summary.json").read_text())
    assert summary["epochs_completed"] == 3

    # The same configuration trained without interruption gives the same model.
    clean = tmp_path / "clean"
    whole = _worker(spec, f"sqlite:///{clean / 'mtbert.db'}", "clean", clean, tiny_encoder,
                    task_dir, "--trials", "1")
    assert whole.wait(timeout=300) == 0
    expected = json.loads((clean / "clean" / "trial-0000" / "summary.json").read_text())
    assert summary["best"]["metrics"] == pytest.approx(expected["best"]["metrics"], abs=1e-6)
    assert retry.values == pytest.approx(
        [expected["best"]["metrics"]["overall/arithmetic"]], abs=1e-6)


def _driver(storage: str) -> str:
    from mtbert.studies.storage import with_driver
    return with_driver(storage)


def _delete(storage: str, study: str) -> None:
    if study in optuna.study.get_all_study_names(_driver(storage)):
        optuna.delete_study(study_name=study, storage=_driver(storage))


@pytest.mark.slow
def test_a_stopped_sweep_queues_its_trial_and_the_same_command_resumes_it(stub, tiny_encoder,
                                                                          task_dir, tmp_path):
    spec = tmp_path / "survive.yaml"
    spec.write_text(SPEC)
    storage = f"sqlite:///{tmp_path / 'mtbert.db'}"
    out = tmp_path / "runs"
    worker = _worker(spec, storage, "survive", out, tiny_encoder, task_dir, "--trials", "1")
    first = out / "survive" / "trial-0000"
    wait_for(lambda: _epochs_done(first) >= 1 and (first / "resume.pt").exists()
             or worker.poll() is not None, timeout=180, what="the first epoch")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 130, err
    trials = optuna.load_study(study_name="survive", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["fail_reason"] == "interrupted"
    assert (first / "resume.pt").exists()  # kept for the retry

    again = _worker(spec, storage, "survive", out, tiny_encoder, task_dir, "--trials", "1")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    trials = optuna.load_study(study_name="survive", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["retry_of"] == 0
    assert trials[1].user_attrs["resumed_from_epoch"] >= 1
    assert trials[1].user_attrs.get("fail_reason") is None
    summary = json.loads((out / "survive" / "trial-0001" / "summary.json").read_text())
    assert summary["epochs_completed"] == 3


@pytest.mark.slow
def test_a_stop_after_the_training_finished_is_told_complete_and_not_retried(
        monkeypatch, tiny_encoder, task_dir, tmp_path):
    use_stub_trials(monkeypatch, finish_s=30)  # the trial process ends its run slowly
    spec = tmp_path / "survive.yaml"
    spec.write_text(SPEC)
    storage = f"sqlite:///{tmp_path / 'mtbert.db'}"
    out = tmp_path / "runs"
    worker = _worker(spec, storage, "survive", out, tiny_encoder, task_dir, "--trials", "2",
                     "--max-retries", "1", steps=2)
    first = out / "survive" / "trial-0000"
    wait_for(lambda: (first / "summary.json").exists() or worker.poll() is not None,
             timeout=120, what="the first trial's summary.json")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 130, err
    (trial,) = optuna.load_study(study_name="survive", storage=storage).trials
    assert trial.state.name == "COMPLETE" and "fail_reason" not in trial.user_attrs
    summary = json.loads((first / "summary.json").read_text())
    assert trial.value == summary["best"]["metrics"]["overall/arithmetic"]
    assert trial.user_attrs["overall/arithmetic"] == trial.value
    assert not (first / "resume.pt").exists()  # nothing left to resume


def _finished(number: int, run_dir: Path, state=optuna.trial.TrialState.FAIL, **system):
    run_dir.mkdir(parents=True)
    (run_dir / "model").mkdir()
    (run_dir / "resume.pt").write_bytes(b"state")
    return optuna.trial.create_trial(
        state=state, value=0.5 if state == optuna.trial.TrialState.COMPLETE else None,
        user_attrs={"run_dir": str(run_dir), "checkpoint": str(run_dir / "model")},
        system_attrs=system)


def test_keep_top_never_removes_what_a_queued_retry_resumes_from(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'm.db'}", direction="maximize")
    study.add_trial(_finished(0, tmp_path / "trial-0000"))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING,
        system_attrs={"failed_trial": 0, RETRY_HISTORY: [0]}))
    assert prune_checkpoints(study, keep_top=0, multi_objective=False) == 0
    assert (tmp_path / "trial-0000" / "resume.pt").exists()
    assert (tmp_path / "trial-0000" / "model").exists()
    # Once the retry has run, the dead trial's files go like any other's.
    other = optuna.create_study(storage=f"sqlite:///{tmp_path / 'n.db'}", direction="maximize")
    other.add_trial(_finished(0, tmp_path / "b" / "trial-0000"))
    assert prune_checkpoints(other, keep_top=0, multi_objective=False) == 1
    assert not (tmp_path / "b" / "trial-0000" / "resume.pt").exists()


@pytest.mark.parametrize("where", ["setup", "step"])
def test_out_of_memory_anywhere_is_a_training_error_with_its_reason(where, tiny_config,
                                                                    tmp_path, monkeypatch):
    from mtbert.errors import TrainingError
    from mtbert.heads import MultitaskModel
    from mtbert.train import train

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MultitaskModel, "to" if where == "setup" else "forward", out_of_memory)
    with pytest.raises(TrainingError, match="out of GPU memory"):
        train(tiny_config(), run_dir=tmp_path / "run", device="cpu", progress=False)


# The message train() gives for torch.cuda.OutOfMemoryError in a step.
OUT_OF_MEMORY = ("out of GPU memory at step 0; lower train.batch_size or model.max_length "
                 "(or run fewer trials per GPU)")


@pytest.mark.slow
def test_a_trial_out_of_memory_fails_with_the_reason_and_the_study_goes_on(
        tiny_encoder, task_dir, tmp_path, monkeypatch):
    # The first trial's training raises what train() raises on CUDA's OutOfMemoryError
    # (test_out_of_memory_anywhere_is_a_training_error_with_its_reason).
    use_stub_trials(monkeypatch, fail={"trial-0000": OUT_OF_MEMORY})
    spec = tmp_path / "survive.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    storage = f"sqlite:///{out / 'mtbert.db'}"
    worker = _worker(spec, storage, "survive", out, tiny_encoder, task_dir, "--trials", "2",
                     steps=2)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    trials = optuna.load_study(study_name="survive", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "out of GPU memory" in trials[0].user_attrs["fail_reason"]
    result = json.loads((out / "survive" / "trial-0000" / "trial.json").read_text())
    assert "out of GPU memory" in result["reason"]


def _trial_process(run_dir: Path) -> int | None:
    """The pid of the trial process training in `run_dir`, from /proc."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in argv and (b"mtbert.studies.trial" in argv
                                               or str(STUB_TRIAL).encode() in argv):
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the trial process in /proc")
@pytest.mark.slow
def test_a_trial_process_killed_from_outside_is_queued_and_resumed_by_the_same_worker(
        stub, tiny_encoder, task_dir, tmp_path):
    """The OOM killer, or a scheduler signalling every process of a job: the worker lives
    on, records the trial as killed and runs its retry, which resumes."""
    spec = tmp_path / "survive.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    storage = f"sqlite:///{out / 'mtbert.db'}"
    worker = _worker(spec, storage, "survive", out, tiny_encoder, task_dir, "--trials", "2")
    first = (out / "survive" / "trial-0000").resolve()
    wait_for(lambda: _epochs_done(first) >= 1 and (first / "resume.pt").exists()
             and _trial_process(first) or worker.poll() is not None, timeout=180,
             what="the first epoch")
    os.kill(_trial_process(first), signal.SIGKILL)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    trials = optuna.load_study(study_name="survive", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"] == "killed by signal 9"
    assert trials[1].user_attrs["retry_of"] == 0
    assert trials[1].user_attrs["resumed_from_epoch"] >= 1


def _cut_last_line(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[:-8])  # the last line cut off mid-record


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage, resumed", [
    (lambda run: _cut_last_line(run / "metrics.jsonl"), True),
    (lambda run: _truncate(run / "resume.pt"), False),
    (lambda run: _truncate(run / "config.yaml"), False),
], ids=["metrics-line-cut", "resume-truncated", "config-truncated"])
def test_a_damaged_dead_run_never_loses_its_retry(stub, tiny_encoder, task_dir, tmp_path,
                                                  damage, resumed):
    """A worker killed after its trial's first epoch, its run then damaged: the next
    worker's retry completes, resuming where the run is readable, else from the start
    with a word why."""
    spec = tmp_path / "survive.yaml"
    spec.write_text(SPEC)
    storage, out = f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "runs"
    doomed = _worker(spec, storage, "s", out, tiny_encoder, task_dir, "--trials", "1")
    first = out / "s" / "trial-0000"
    wait_for(lambda: _epochs_done(first) >= 1 or doomed.poll() is not None, timeout=180,
             what="the first epoch")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    damage(first)
    time.sleep(2.5)  # past --grace
    later = _worker(spec, storage, "s", out, tiny_encoder, task_dir, "--trials", "1")
    _, err = later.communicate(timeout=300)
    assert later.returncode == 0, err
    assert "Traceback" not in err
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], err
    assert (trials[1].user_attrs["resumed_from_epoch"] >= 1) == resumed
    if not resumed:
        assert "trial 1 retries trial 0 from the start" in err
