"""The worker loop (`mtbert.studies.worker`) against workers of the release before it: during
an upgrade, old and new workers share one study, and a new worker resumes the trials an
old one queued (an old worker cannot read a newer run's config keys). The old worker is the package as it was at OLD_COMMIT, taken from this
repository's history and run as a real process; the trials train the tiny model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from conftest import wait_for
from mtbert.cli import app
from mtbert.studies.job import RETRY_HISTORY

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "24176fa"  # the last main whose worker patched Optuna's queue (studies/runner.py)
SPEC = """name: upgrade
space:
  train.seed: {type: categorical, choices: [0]}
objective: overall/arithmetic
pruner: {name: median, n_startup_trials: 1000}
"""


def _old_package(dest: Path) -> Path:
    """The `mtbert` package of OLD_COMMIT, extracted under `dest`; skips where this
    checkout has no history (a shallow clone, a source archive)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "mtbert"],
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no commit {OLD_COMMIT} in this checkout's history: {err}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _worker(tree: Path, spec: Path, out: Path, encoder: Path, data: Path) -> subprocess.Popen:
    """`mtbert sweep --trials 1` of the package in `tree`, its trials on the tiny model."""
    args = [sys.executable, "-m", "mtbert", "-q", "sweep", str(spec), "--trials", "1",
            "--out", str(out), "--data-dir", str(data), "--device", "cpu",
            "--wandb-mode", "disabled", "--set", f"model.encoder={encoder}",
            "--set", "model.max_length=32", "--set", "data.max_train_examples=0",
            "--set", "data.max_eval_examples=0", "--set", "train.epochs=3",
            "--set", "train.steps_per_epoch=60", "--set", "train.batch_size=8"]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    env.pop("MTBERT_TRIAL_PROGRAM", None)
    return subprocess.Popen(args, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _epochs(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _stopped_after_an_epoch(worker: subprocess.Popen, run_dir: Path) -> None:
    wait_for(lambda: _epochs(run_dir) >= 1 and (run_dir / "resume.pt").exists()
             or worker.poll() is not None, timeout=180, what=f"an epoch in {run_dir}")
    assert worker.poll() is None, worker.communicate()[1]
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 130, err


def _finished(worker: subprocess.Popen) -> None:
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err


@pytest.mark.slow
def test_new_workers_resume_the_retries_old_workers_queued(tiny_encoder, task_dir, tmp_path):
    old = _old_package(tmp_path / "old")
    new = ROOT
    spec = tmp_path / "upgrade.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    runs = out / "upgrade"
    # An old worker is stopped in its trial's 2nd epoch: it queues the trial again.
    _stopped_after_an_epoch(_worker(old, spec, out, tiny_encoder, task_dir),
                            runs / "trial-0000")
    # A new worker takes that queued retry first and resumes it.
    _finished(_worker(new, spec, out, tiny_encoder, task_dir))
    # A new worker is stopped in turn. Its run's config.yaml holds keys the old release
    # does not know (train.batches_per_step, loss.dwa_window): an old worker cannot resume
    # it, so a new one does.
    _stopped_after_an_epoch(_worker(new, spec, out, tiny_encoder, task_dir),
                            runs / "trial-0002")
    assert "batches_per_step" in (runs / "trial-0002" / "config.yaml").read_text()
    _finished(_worker(new, spec, out, tiny_encoder, task_dir))

    trials = optuna.load_study(study_name="upgrade",
                               storage=f"sqlite:///{out / 'mtbert.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    for stopped, retry in ((trials[0], trials[1]), (trials[2], trials[3])):
        assert stopped.user_attrs["fail_reason"] == "interrupted"
        assert retry.user_attrs["retry_of"] == stopped.number
        assert retry.system_attrs[RETRY_HISTORY] == [stopped.number]
        assert retry.user_attrs["resumed_from_epoch"] >= 1
        assert sorted(retry.intermediate_values) == [1, 2, 3]  # one curve, not a restart
    # Both retries are the one configuration resumed: the same model either way.
    assert trials[1].values == pytest.approx(trials[3].values, abs=1e-6)
    # This release ranks the study (the old worker's trial among it) and exports a model.
    ranked = CliRunner().invoke(app, ["best", "--out", str(out), "--top", "2", "--json"])
    assert ranked.exit_code == 0, ranked.output
    assert {n for group in json.loads(ranked.stdout) for n in group["trials"]} == {1, 3}
    exported = CliRunner().invoke(app, ["best", "--out", str(out), "--trial", "3", "--export",
                                        str(tmp_path / "model")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert "trial: 3" in (tmp_path / "model" / "README.md").read_text()
