"""Distributed sweeps: several workers on one study in the local PostgreSQL.

Skipped, with the reason, where no PostgreSQL server answers on 127.0.0.1:5432.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

URL = os.environ.get("MTBERT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _server_up() -> str | None:
    try:
        import sqlalchemy as sa

        from mtbert.studies.storage import with_driver
        with sa.create_engine(with_driver(URL)).connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as err:  # noqa: BLE001 - any failure means: skip
        return f"no PostgreSQL at {URL} ({type(err).__name__})"
    return None


pytestmark = pytest.mark.skipif(_server_up() is not None, reason=str(_server_up()))


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
    cmd = [sys.executable, "-m", "mtbert", "-q", "sweep", "lr-decay", "--storage", URL,
           "--study", study, "--out", str(out), "--data-dir", str(task_dir),
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


def test_two_workers_share_one_study(tiny_encoder, task_dir, tmp_path, study_name):
    workers = [_worker(tiny_encoder, task_dir, tmp_path / f"w{i}", study_name, "--trials", "2",
                       "--set", "train.steps_per_epoch=3") for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    trials = _study(study_name).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def test_a_killed_worker_leaves_no_running_trial(tiny_encoder, task_dir, tmp_path, study_name):
    doomed = _worker(tiny_encoder, task_dir, tmp_path / "doomed", study_name, "--trials", "1",
                     "--heartbeat", "1", "--grace", "3",
                     "--set", "train.steps_per_epoch=2000", "--set", "train.epochs=1")
    deadline = time.time() + 120
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.5)
        try:
            running = [t for t in _study(study_name).trials if t.state.name == "RUNNING"]
        except KeyError:  # the study is not created yet
            continue
    assert running, "the doomed worker never started a trial"
    time.sleep(2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    killed = running[0]
    assert _study(study_name).trials[killed.number].state.name == "RUNNING"
    time.sleep(4)  # past the grace period

    later = _worker(tiny_encoder, task_dir, tmp_path / "later", study_name, "--trials", "1",
                    "--heartbeat", "1", "--grace", "3", "--set", "train.steps_per_epoch=3")
    _, err = later.communicate(timeout=300)
    assert later.returncode == 0, err
    trials = _study(study_name).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert trials[killed.number].state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert retry[0].params == killed.params
