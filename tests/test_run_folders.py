"""A sweep never writes over a run directory another study made: a new study of a
deleted study's name, one in another storage on the same --out, an emptied database.
Real sweeps with stand-in trials."""

import json
import subprocess
import sys

import optuna
import pytest

from conftest import use_stub_trials

pytestmark = pytest.mark.slow

SPEC = "space:\n  train.lr: {type: float, low: 1.0e-5, high: 1.0e-4}\n"


def _sweep(out, *extra):
    return subprocess.run([sys.executable, "-m", "mtbert", "sweep", str(out.parent / "s.yaml"),
                           "--trials", "1", "--out", str(out), "--wandb-mode", "disabled",
                           "--device", "cpu", *extra], capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("how", ["deleted", "other-storage", "emptied-db"])
def test_a_new_study_of_the_same_name_leaves_the_earlier_runs_in_place(tmp_path, monkeypatch,
                                                                       how):
    use_stub_trials(monkeypatch)
    (tmp_path / "s.yaml").write_text(SPEC)
    out = tmp_path / "runs"
    first = _sweep(out)
    assert first.returncode == 0, first.stderr
    earlier = out / "s" / "trial-0000"
    before = {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()}
    extra = []
    if how == "deleted":  # the study goes, its run directories stay
        deleted = subprocess.run([sys.executable, "-m", "mtbert", "studies", "--out", str(out),
                                  "--delete", "s", "--yes"], capture_output=True, text=True)
        assert deleted.returncode == 0, deleted.stderr
    elif how == "other-storage":
        extra = ["--storage", f"sqlite:///{tmp_path / 'other.db'}"]
    else:
        (out / "mtbert.db").write_bytes(b"")
    second = _sweep(out, *extra)
    assert second.returncode == 0, second.stderr
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == before
    url = extra[1] if extra else f"sqlite:///{out / 'mtbert.db'}"
    study = optuna.load_study(study_name="s", storage=url)
    folder = study.user_attrs["runs_folder"]
    assert folder == f"s-{study.user_attrs['study_uid'][:8]}"
    assert f"{out / 's'} holds the runs of another study named s" in second.stderr
    [trial] = study.trials
    assert trial.user_attrs["run_dir"] == str((out / folder / "trial-0000").resolve())
    job = json.loads((out / folder / "trial-0000" / "job.json").read_text())
    assert job["study_uid"] == study.user_attrs["study_uid"]


def test_a_worker_whose_out_holds_anothers_run_stops_with_one_line(tmp_path, monkeypatch):
    """The study's folder on this worker's --out holds another study's run where its next
    trial would go: left in place, the sweep stops (exit 2)."""
    use_stub_trials(monkeypatch)
    (tmp_path / "s.yaml").write_text(SPEC)
    out, url = tmp_path / "runs", f"sqlite:///{tmp_path / 'shared.db'}"
    assert _sweep(out, "--storage", url).returncode == 0
    other = tmp_path / "other-node"
    stranger = other / "s" / "trial-0001"
    stranger.mkdir(parents=True)
    (stranger / "config.yaml").write_text("train: {lr: 0.001}\n")
    result = _sweep(other, "--storage", url)
    assert result.returncode == 2, result.stderr
    assert f"{stranger} holds a run of another study named s" in result.stderr
    assert (stranger / "config.yaml").read_text() == "train: {lr: 0.001}\n"
    assert "Traceback" not in result.stderr
