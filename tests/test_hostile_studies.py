"""Hostile but realistic commands against studies, run directories and secrets: each is
one line and an exit code, nothing outside the intended directory changes, and no
password reaches a file or a terminal."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from conftest import POSTGRES_URL, postgres_unreachable, wait_for
from mtbert.cli import app
from mtbert.config import save_config
from mtbert.studies.storage import mask_url

runner = CliRunner()
SECRET = "S3cretPW"


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mtbert: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://u:{SECRET}@h/db", "postgresql://u:***@h/db"),
    (f"postgresql://u@h/db?password={SECRET}", "postgresql://u@h/db?password=***"),
    (f"postgresql://:{SECRET}@h/db", "postgresql://:***@h/db"),
    (f"postgresql+psycopg2://u:{SECRET}@h:5/db?sslmode=require&sslpassword={SECRET}",
     "postgresql+psycopg2://u:***@h:5/db?sslmode=require&sslpassword=***"),
    (f"could not connect: host=h password={SECRET} user=u", "could not connect: host=h "
                                                           "password=*** user=u"),
    ("sqlite:///runs/mtbert.db", "sqlite:///runs/mtbert.db"),
])
def test_every_credential_form_is_masked(url, shown):
    assert mask_url(url) == shown


@pytest.mark.parametrize("name", ["..", "/srv/other-project", "a/b", ".hidden", "-x", "", "é"])
def test_sweep_refuses_a_study_name_that_is_no_safe_directory_name(name, tmp_path):
    result = runner.invoke(app, ["sweep", "default", "--study", name, "--out",
                                 str(tmp_path / "out"), "--trials", "1"])
    line = _one_line_error(result, 2)
    assert "bad study name" in line and "letters, digits" in line
    assert not (tmp_path / "out" / "mtbert.db").exists()


def _study_with_a_trial(storage: str, name: str, run_dir: Path) -> None:
    study = optuna.create_study(study_name=name, storage=storage)
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"run_dir": str(run_dir)}))


@pytest.mark.parametrize("unsafe", ["absolute", "dotdot"])
def test_deleting_a_study_never_removes_anything_outside_out(unsafe, tmp_path):
    """A study made by any writer of a shared storage, named like a path: deleting it with
    --runs removes its record and nothing of the file system outside --out."""
    out = tmp_path / "sandbox" / "parent" / "out"
    out.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "job.json").write_text("{}")  # looks like a run directory
    (victim / "precious.txt").write_text("keep me")
    (out.parent / "sibling.txt").write_text("keep me too")
    name = str(victim) if unsafe == "absolute" else ".."
    storage = f"sqlite:///{out / 'mtbert.db'}"
    _study_with_a_trial(storage, name, victim)
    result = runner.invoke(app, ["studies", "--out", str(out), "--delete", name, "--runs",
                                 "--yes"])
    assert result.exit_code == 0, result.output
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (out.parent / "sibling.txt").read_text() == "keep me too"
    assert (out / "mtbert.db").exists()
    assert "outside" in result.stderr and "not a safe directory name" in result.stderr
    assert optuna.study.get_all_study_names(storage) == []


def test_deleting_with_runs_removes_the_study_directory_inside_out(tmp_path):
    out = tmp_path / "out"
    run_dir = out / "lw" / "trial-0000"
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text("{}")
    _study_with_a_trial(f"sqlite:///{out / 'mtbert.db'}", "lw", run_dir)
    result = runner.invoke(app, ["studies", "--out", str(out), "--delete", "lw", "--runs",
                                 "--yes"])
    assert result.exit_code == 0, result.output
    assert not (out / "lw").exists() and (out / "mtbert.db").exists()


def test_delete_without_an_answer_on_stdin_says_so_and_exits_1(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _study_with_a_trial(f"sqlite:///{out / 'mtbert.db'}", "lw", out / "x")
    result = runner.invoke(app, ["studies", "--out", str(out), "--delete", "lw"], input="")
    assert "no answer on stdin; nothing deleted" in _one_line_error(result, 1)
    assert optuna.study.get_all_study_names(f"sqlite:///{out / 'mtbert.db'}") == ["lw"]


@pytest.mark.parametrize("args, message", [
    (["sweep", "default", "--timeout", "-5"], "'--timeout': Input should be greater than or "
                                             "equal to 0"),
    (["sweep", "default", "--trials", "0"], "'--trials': Input should be greater than or "
                                            "equal to 1"),
    (["best", "--top", "0"], "'--top': Input should be greater than or equal to 1"),
    (["studies", "--storage", "postgresql://u:" + SECRET + "@127.0.0.1:abc/db"],
     "its port is not a number"),
    (["best", "--storage", "nonsense"], "bad storage URL nonsense"),
])
def test_bad_limits_and_urls_are_one_line_exit_2(args, message, tmp_path):
    """Through the real entry point: usage errors are one line there too."""
    result = subprocess.run([sys.executable, "-m", "mtbert", *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mtbert: error:")
    assert message in result.stderr and SECRET not in result.stderr


@pytest.fixture
def config_file(tiny_config, tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    save_config(tiny_config(train={"epochs": 1, "steps_per_epoch": 2}), path)
    return path


def test_train_refuses_an_out_that_holds_a_run_unless_overwrite(config_file, tmp_path):
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", str(config_file), "--out", str(out), "--device", "cpu"])
    assert first.exit_code == 0, first.output
    summary = (out / "summary.json").read_text()
    again = runner.invoke(app, ["train", str(config_file), "--out", str(out), "--device", "cpu",
                                "--set", "train.seed=5"])
    line = _one_line_error(again, 2)
    assert "holds a run already" in line and "--overwrite" in line and "--resume" in line
    assert (out / "summary.json").read_text() == summary  # nothing touched
    replaced = runner.invoke(app, ["train", str(config_file), "--out", str(out), "--device",
                                   "cpu", "--set", "train.seed=5", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert "seed: 5" in (out / "config.yaml").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # not two runs mixed


@pytest.mark.slow
def test_a_second_process_on_the_same_out_is_refused_while_the_first_runs(config_file,
                                                                          tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mtbert.runtime import run_dir_lock\n"
         f"with run_dir_lock({str(out)!r}):\n    print('held', flush=True)\n"
         "    sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["train", str(config_file), "--out", str(out), "--device",
                                     "cpu"])
        line = _one_line_error(result, 2)
        assert f"in use by another mtbert process (pid {holder.pid})" in line
        assert not (out / "config.yaml").exists()
    finally:
        holder.communicate("\n", timeout=30)
    assert runner.invoke(app, ["train", str(config_file), "--out", str(out), "--device",
                               "cpu"]).exit_code == 0


def test_predict_refuses_to_write_over_its_input(tmp_path):
    data = tmp_path / "sst.csv"
    data.write_text("\tid\tsentence\n0\ta\tgood film\n")
    result = runner.invoke(app, ["predict", str(tmp_path), "--task", "sst", "--input",
                                 str(data), "--output", str(data)])
    assert "is the input file" in _one_line_error(result, 2)
    assert data.read_text() == "\tid\tsentence\n0\ta\tgood film\n"


def test_report_refuses_a_to_directory_that_holds_files_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _study_with_a_trial(f"sqlite:///{out / 'mtbert.db'}", "lw", out / "x")
    to = tmp_path / "elsewhere"
    to.mkdir()
    (to / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["report", "--out", str(out), "--to", str(to)])
    assert "pass --overwrite" in _one_line_error(result, 2)
    assert sorted(p.name for p in to.iterdir()) == ["notes.txt"]
    result = runner.invoke(app, ["report", "--out", str(out), "--to", str(to), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (to / "index.html").exists() and (to / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sigterm_ends_train_with_130_and_resume_finishes_the_run(tiny_config, tmp_path):
    """A real signal to a real process: a scheduler's stop keeps the finished epochs."""
    config = tmp_path / "slow.yaml"
    save_config(tiny_config(train={"epochs": 4, "steps_per_epoch": 40}), config)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mtbert", "--quiet", "train", str(config),
                             "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1
             and (out / "resume.pt").exists() or proc.poll() is not None, timeout=120,
             what="the first epoch")
    assert proc.poll() is None, "the training ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "mtbert: interrupted"
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 4
    resumed = subprocess.run([sys.executable, "-m", "mtbert", "--quiet", "train", "--resume",
                              str(out), "--device", "cpu"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 4
    assert len(metrics.read_text().splitlines()) == 4


PG = POSTGRES_URL


def _files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.slow  # a real trial process: its W&B run and its model (exported) are read too
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_no_password_of_the_storage_url_reaches_any_file_or_terminal(form, tiny_encoder,
                                                                     task_dir, tmp_path,
                                                                     monkeypatch):
    """Sweep, export, report --wandb (offline): every file they and W&B write is read.
    The server trusts local connections, so the password is accepted and ignored."""
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    url = (f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test" if form == "userinfo" else
           f"postgresql://postgres@127.0.0.1:5432/test?password={SECRET}")
    study = f"pw-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setattr(sys, "argv", ["mtbert", "report", "--storage", url])
    common = ["--storage", url, "--study", study, "--out", str(tmp_path / "out")]
    try:
        outputs = [runner.invoke(app, [
            "sweep", "default", *common, "--trials", "1", "--wandb-mode", "offline",
            "--set", f"model.encoder={tiny_encoder}", "--set", "model.max_length=32",
            "--data-dir", str(task_dir), "--set", "train.epochs=1",
            "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=8"])]
        outputs.append(runner.invoke(app, ["best", *common[:4], "--export",
                                           str(tmp_path / "model")]))
        outputs.append(runner.invoke(app, ["report", *common[:4], "--to",
                                           str(tmp_path / "report"), "--wandb",
                                           "--wandb-mode", "offline"]))
    finally:
        from mtbert.studies.storage import with_driver
        if study in optuna.study.get_all_study_names(with_driver(PG)):
            optuna.delete_study(study_name=study, storage=with_driver(PG))
    for result in outputs:
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output
    assert "***" in (tmp_path / "model" / "README.md").read_text()
    assert "***" in (tmp_path / "report" / "index.html").read_text()
    # W&B recorded the command line of the report run, masked.
    masked = mask_url(url).encode()
    assert any(masked in p.read_bytes() for p in (tmp_path / "wandb").rglob("*.wandb"))
    assert _files_holding(tmp_path, SECRET) == []


def test_a_failing_connection_never_prints_the_password(tmp_path):
    url = f"postgresql://:{SECRET}@127.0.0.1:1/test"  # no server on port 1; empty user
    result = runner.invoke(app, ["studies", "--storage", url])
    assert result.exit_code == 1, result.output
    assert "cannot reach the study storage postgresql://:***@127.0.0.1:1/test" in result.stderr
    assert SECRET not in result.output


def _signal_then_rerun(command: list[str], ready, tmp_path) -> subprocess.CompletedProcess:
    """Start `mtbert COMMAND`, SIGTERM it once `ready()`, expect 130 and one line, then run
    the same command again (the resume command where it differs) to the end."""
    proc = subprocess.Popen([sys.executable, "-m", "mtbert", "--quiet", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ready() or proc.poll() is not None, timeout=120, what="the first save")
    assert proc.poll() is None, "the command ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "mtbert: interrupted"
    return proc


@pytest.mark.slow
def test_sigterm_ends_compare_with_130_and_the_same_command_finishes(tiny_config, tmp_path):
    config = tmp_path / "slow.yaml"
    save_config(tiny_config(train={"epochs": 4, "steps_per_epoch": 40}), config)
    out = tmp_path / "cmp"
    command = ["compare", str(config), "--seeds", "1", "--out", str(out), "--device", "cpu"]
    metrics = out / "slow" / "seed0" / "metrics.jsonl"
    _signal_then_rerun(command, lambda: metrics.exists() and metrics.read_text().count("\n")
                       >= 1 and (metrics.parent / "resume.pt").exists(), tmp_path)
    stopped_at = len(metrics.read_text().splitlines())
    again = subprocess.run([sys.executable, "-m", "mtbert", "--quiet", *command],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert 1 <= stopped_at < 4 and len(metrics.read_text().splitlines()) == 4
    assert (out / "compare.json").exists()


@pytest.mark.slow
def test_sigterm_ends_pretrain_with_130_and_resume_finishes(tiny_config, tmp_path):
    config = tmp_path / "pre.yaml"
    save_config(tiny_config(), config)
    out = tmp_path / "pre"
    command = ["pretrain", str(config), "--out", str(out), "--steps", "600", "--save-every",
               "5", "--batch-size", "8", "--device", "cpu"]
    _signal_then_rerun(command, lambda: (out / "pretrain_state.pt").exists(), tmp_path)
    assert not (out / "model.safetensors").exists()
    again = subprocess.run([sys.executable, "-m", "mtbert", "--quiet", *command, "--resume"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "model.safetensors").exists()


def test_a_full_disk_is_one_line_naming_the_path_and_exit_1(tmp_path, tiny_config):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    from mtbert.train import train

    train(tiny_config(train={"epochs": 1, "steps_per_epoch": 1}), run_dir=tmp_path / "run",
          device="cpu", progress=False)
    data = tmp_path / "sst.csv"
    data.write_text("\tid\tsentence\n0\ta\tgood film\n1\tb\tbad plot\n")
    result = runner.invoke(app, ["predict", str(tmp_path / "run" / "model"), "--task", "sst",
                                 "--input", str(data), "--output", "/dev/full"])
    line = _one_line_error(result, 1)
    assert "No space left on device" in line and "/dev/full" in line


@pytest.fixture
def study_with_a_checkpoint(tiny_config, tmp_path) -> Path:
    """A study whose one trial has a real checkpoint, as a sweep leaves it."""
    from mtbert.train import train

    out = tmp_path / "out"
    run_dir = out / "lw" / "trial-0000"
    train(tiny_config(train={"epochs": 1, "steps_per_epoch": 1}), run_dir=run_dir,
          device="cpu", progress=False)
    study = optuna.create_study(study_name="lw", storage=f"sqlite:///{out / 'mtbert.db'}",
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
        "run_dir": str(run_dir), "checkpoint": str(run_dir / "model")}))
    return out


def test_a_truncated_checkpoint_is_refused_before_anything_is_exported(study_with_a_checkpoint,
                                                                       tmp_path):
    weights = study_with_a_checkpoint / "lw" / "trial-0000" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    dest = tmp_path / "exports" / "best"
    result = runner.invoke(app, ["best", "--out", str(study_with_a_checkpoint), "--export",
                                 str(dest)])
    assert "trial 0's checkpoint" in _one_line_error(result, 2)
    assert not (tmp_path / "exports").exists() or list((tmp_path / "exports").iterdir()) == []


def test_a_failed_hf_export_leaves_nothing_and_the_rerun_works(study_with_a_checkpoint,
                                                               tmp_path, monkeypatch):
    import errno

    import mtbert.studies.export as export_module

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "exports"))

    dest = tmp_path / "exports" / "best"
    args = ["best", "--out", str(study_with_a_checkpoint), "--export", str(dest), "--hf"]
    with monkeypatch.context() as patch:
        patch.setattr(export_module, "export_hf_encoder", disk_full)
        result = runner.invoke(app, args)
    assert "No space left on device" in _one_line_error(result, 1)
    assert list((tmp_path / "exports").iterdir()) == []  # no half export, no temporary
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (dest / "model.safetensors").exists() and (dest / "encoder" / "config.json").exists()
