"""Distributed sweeps: several workers (real processes) on one study in the local
PostgreSQL; their trials are the stand-in trial program (tests/stub_trial.py).

Skipped, with the connection error, only where nothing accepts connections on
127.0.0.1:5432 (or $MTBERT_TEST_POSTGRES's host and port); a missing driver, a refused
login or a missing database fails.
"""

import os
import signal
import subprocess
import sys
import uuid

import optuna
import pytest
import sqlalchemy

from conftest import POSTGRES_URL, postgres_unreachable, use_stub_trials, wait_for

URL = POSTGRES_URL


_DOWN = postgres_unreachable()
pytestmark = [pytest.mark.skipif(_DOWN is not None, reason=str(_DOWN)), pytest.mark.slow]


@pytest.fixture
def study_name():
    name = f"pytest-{uuid.uuid4().hex[:8]}"
    yield name
    from mtbert.studies.storage import with_driver
    try:
        optuna.delete_study(study_name=name, storage=with_driver(URL))
    except KeyError:
        pass


def _worker(tiny_encoder, task_dir, out, study, *extra):
    # One seed a configuration (the shipped spec races 3) unless `extra` says otherwise.
    cmd = [sys.executable, "-m", "mtbert", "-q", "sweep", "lr-decay", "--seeds", "1",
           "--storage", URL, "--study", study, "--out", str(out), "--data-dir", str(task_dir),
           "--wandb-mode", "disabled", "--device", "cpu",
           "--set", f"model.encoder={tiny_encoder}", "--set", f"data.cache_dir={out}/cache",
           "--set", "data.max_train_examples=0", "--set", "data.max_eval_examples=0",
           "--set", "train.batch_size=8", "--set", "model.max_length=32", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _study(name):
    from mtbert.studies.storage import with_driver
    return optuna.load_study(study_name=name, storage=with_driver(URL))


def test_two_workers_share_one_study(tiny_encoder, task_dir, tmp_path, study_name,
                                    stub_trials):
    workers = [_worker(tiny_encoder, task_dir, tmp_path / f"w{i}", study_name, "--trials", "2",
                       "--set", "train.steps_per_epoch=3") for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    trials = _study(study_name).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def _heartbeat_age(study_name, number) -> float | None:
    """Seconds since trial `number` last recorded its heartbeat, on the database's clock as
    Optuna's stale-trial check reads it; None before its first heartbeat."""
    from mtbert.studies.storage import with_driver
    query = sqlalchemy.text(
        "select extract(epoch from localtimestamp - h.heartbeat) from trial_heartbeats h "
        "join trials t on t.trial_id = h.trial_id join studies s on s.study_id = t.study_id "
        "where s.study_name = :study and t.number = :number")
    engine = sqlalchemy.create_engine(with_driver(URL))
    try:
        with engine.connect() as conn:
            age = conn.execute(query, {"study": study_name, "number": number}).scalar()
    finally:
        engine.dispose()
    return None if age is None else float(age)


def test_a_killed_worker_leaves_no_running_trial(tiny_encoder, task_dir, tmp_path, study_name,
                                                monkeypatch):
    # The doomed worker's trial takes 2000 steps of 0.05 s: it runs until the worker is
    # killed (and dies with it); the later worker's retry takes 3 steps.
    use_stub_trials(monkeypatch, step_s=0.05)
    doomed = _worker(tiny_encoder, task_dir, tmp_path / "doomed", study_name, "--trials", "1",
                     "--heartbeat", "1", "--grace", "3",
                     "--set", "train.steps_per_epoch=2000", "--set", "train.epochs=1")

    def running():
        try:
            return [t for t in _study(study_name).trials if t.state.name == "RUNNING"]
        except KeyError:  # the study is not created yet
            return []

    killed = wait_for(running, timeout=120, what="the doomed worker to start a trial")[0]
    # Optuna never counts a trial without a heartbeat as stale: kill after the first one,
    # and once the trial holds its parameters (its retry must take them over).
    wait_for(lambda: _heartbeat_age(study_name, killed.number) is not None
             and _study(study_name).trials[killed.number].params, timeout=60,
             what=f"trial {killed.number}'s first heartbeat and its parameters")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    assert _study(study_name).trials[killed.number].state.name == "RUNNING"
    # Past the grace period (--grace 3): the next worker finds the trial stale.
    wait_for(lambda: _heartbeat_age(study_name, killed.number) > 3.5, timeout=60,
             what=f"trial {killed.number}'s heartbeat to be older than the grace period")

    later = _worker(tiny_encoder, task_dir, tmp_path / "later", study_name, "--trials", "1",
                    "--heartbeat", "1", "--grace", "3", "--set", "train.steps_per_epoch=3")
    _, err = later.communicate(timeout=300)
    assert later.returncode == 0, err
    trials = _study(study_name).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert trials[killed.number].state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert retry[0].params == trials[killed.number].params  # read after it was killed
