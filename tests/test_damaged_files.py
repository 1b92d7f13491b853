"""Damaged run files, a full disk, a study on a read-only file system and a locale that
cannot encode what mtbert prints: missing data with a warning naming the file, or one
line and exit 1; nothing half-written left; never a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.rundir import read_metrics, read_summary

from conftest import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder):
    """A study whose two finished trials have real run directories, as a sweep leaves
    them (built once; each test works on a copy)."""
    from conftest import write_task_files
    from mtbert.config import build_config
    from mtbert.studies.job import TrialResult
    from mtbert.train import train

    root = tmp_path_factory.mktemp("study")
    data = write_task_files(root / "data")
    config = build_config({
        "model": {"encoder": str(tiny_encoder), "max_length": 32},
        "data": {"dir": str(data), "cache_dir": str(root / "cache")},
        "train": {"epochs": 2, "steps_per_epoch": 1, "batch_size": 8, "eval_batch_size": 16}})
    out = root / "out"
    out.mkdir()
    study = optuna.create_study(study_name="lw", storage=f"sqlite:///{out / 'mtbert.db'}",
                                direction="maximize")
    for n in range(2):
        run_dir = out / "lw" / f"trial-{n:04d}"
        metrics = train(config, run_dir=run_dir, device="cpu", progress=False)["best"]["metrics"]
        TrialResult().write(run_dir)
        study.add_trial(optuna.trial.create_trial(
            value=0.5 + n / 10, params={"x": 0.1 * (n + 1)},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            user_attrs={**metrics, "run_dir": str(run_dir), "checkpoint": str(run_dir / "model")}))
    failed = out / "lw" / "trial-0002"
    failed.mkdir()
    TrialResult(reason="TrainingError: NaN loss at lr \u00d7 10").write(failed)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"run_dir": str(failed)}))
    return out


@pytest.fixture
def study_out(trained, tmp_path) -> Path:
    """A copy of the trained study, its run directories rewritten to the copy's."""
    import sqlite3

    out = tmp_path / "out"
    shutil.copytree(trained, out)
    with sqlite3.connect(out / "mtbert.db") as con:
        con.execute("UPDATE trial_user_attributes SET value_json = replace(value_json, ?, ?)",
                    (str(trained), str(out)))
    return out


# ------------------------------------------------------------------ damaged run files

@pytest.mark.parametrize("bad", ["[1, 2]", "42", '"text"', "null", '{"epoch": [1], "step": {}}',
                                 '{"epoch": "x", "step": 1, "sst/acc": "abc"}',
                                 '{"epoch": 1, "step": 2, "sst/acc": true}', '{"sst/acc": 0.5',
                                 "\udcff\udcfe not utf-8"])
def test_a_damaged_metrics_line_is_skipped_with_a_warning_naming_the_file(tmp_path, caplog, bad):
    path = tmp_path / "metrics.jsonl"
    good = {"step": 2, "epoch": 1, "sst/acc": 0.25}
    path.write_bytes((json.dumps(good) + "\n" + bad + "\n").encode("utf-8", "surrogateescape"))
    assert read_metrics(tmp_path) == [good]
    assert f"{path}: skipped 1 damaged line (no evaluation record)" in caplog.text


def test_report_draws_the_curves_of_a_run_whose_metrics_hold_damaged_lines(study_out):
    metrics = study_out / "lw" / "trial-0001" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '[1]\n{"epoch": [1], "step": {}, "sst/acc": "y"}\n')
    result = runner.invoke(app, ["report", "--out", str(study_out)])
    assert result.exit_code == 0, result.output
    assert f"{metrics}: skipped 2 damaged lines" in result.stderr
    assert (study_out / "lw" / "report" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("damage", ["truncated", "a list", "no best", "text metrics"])
def test_a_damaged_summary_is_missing_data_and_the_export_goes_on(study_out, tmp_path, damage):
    summary = study_out / "lw" / "trial-0001" / "summary.json"
    text = summary.read_text()
    summary.write_text({"truncated": text[:50], "a list": "[1, 2]",
                        "no best": json.dumps({"best": None}),
                        "text metrics": json.dumps({"best": {"metrics": {"sst/acc": "x"}}}),
                        }[damage])
    assert read_summary(summary.parent) is None
    dest = tmp_path / "export"
    result = runner.invoke(app, ["best", "--out", str(study_out), "--export", str(dest)])
    assert result.exit_code == 0, result.output
    assert f"{summary} is damaged" in result.stderr
    assert (dest / "model.safetensors").exists() and (dest / "README.md").stat().st_size > 0


@pytest.mark.parametrize("content", ["[1]", '{"reason": 5', "\x00\x01", ""])
def test_a_damaged_trial_json_leaves_the_failure_note_out_with_a_warning(study_out, content):
    result_file = study_out / "lw" / "trial-0002" / "trial.json"
    result_file.write_text(content)
    result = runner.invoke(app, ["report", "--out", str(study_out)])
    assert result.exit_code == 0, result.output
    assert f"{result_file} is damaged" in result.stderr
    assert "NaN loss" not in (study_out / "lw" / "report" / "index.html").read_text()


@pytest.mark.parametrize("content", ["[1]", "{", '{"study": 1, "bogus": 2}', ""])
def test_a_damaged_job_json_is_one_line_naming_it(tmp_path, content):
    from mtbert.errors import ConfigError
    from mtbert.studies.job import TrialJob

    (tmp_path / "job.json").write_text(content)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'job.json'} is damaged"):
        TrialJob.read(tmp_path)


# ------------------------------------------------------------------ a full disk

def _no_temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]


def test_a_full_disk_while_resume_pt_is_saved_names_it_and_leaves_no_tmp(tmp_path, monkeypatch):
    """torch reports a failed write as RuntimeError("unexpected pos ..."); the OSError of
    the file object it wrote through is the one said."""
    import builtins

    from mtbert.runtime import atomic_torch_save

    real_open = builtins.open

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Full(handle) if str(file).endswith(".tmp") and "w" in mode else handle

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError) as caught:
        atomic_torch_save({"x": list(range(1000))}, tmp_path / "resume.pt")
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "resume.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_best_export_is_exit_1_one_line_and_the_rerun_works(study_out, tmp_path,
                                                                          monkeypatch):
    """copytree reports every file it could not copy as a list; one line names the export."""
    import mtbert.studies.export as export_module

    real = shutil.copytree

    def full(src, dst, *args, **kwargs):
        raise shutil.Error([(str(Path(src) / name), str(Path(dst) / name),
                             "[Errno 28] No space left on device")
                            for name in ("model.safetensors", "vocab.txt")])

    dest = tmp_path / "exports" / "best"
    args = ["best", "--out", str(study_out), "--export", str(dest)]
    with monkeypatch.context() as patch:
        patch.setattr(export_module.shutil, "copytree", full)
        result = runner.invoke(app, args)
    line = one_line_error(result, 1)
    assert line == f"mtbert: error: No space left on device: {dest}"
    assert list((tmp_path / "exports").iterdir()) == []
    assert shutil.copytree is real
    assert runner.invoke(app, args).exit_code == 0
    assert (dest / "model.safetensors").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, for a real full disk; skipped where this process may not mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip() or made.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_kb: int) -> Path:
    filler = mount / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(mount).free - leave_kb * 1024))
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("leave_kb, names", [(1, ".lock"), (40, "model.tmp"),
                                             (150, "resume.pt")])
def test_train_on_a_real_full_disk_names_the_file_and_resumes_once_space_is_back(
        small_disk, tiny_config, leave_kb, names):
    from mtbert.config import save_config

    config = small_disk.parent / "config.yaml"
    save_config(tiny_config(train={"epochs": 2, "steps_per_epoch": 1}), config)
    run_dir = small_disk / "run"
    filler = _fill(small_disk, leave_kb)
    command = [sys.executable, "-m", "mtbert", "-q", "train", str(config), "--out",
               str(run_dir), "--device", "cpu"]
    full = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr
    assert full.stderr.strip().splitlines()[-1] == \
        f"mtbert: error: No space left on device: {run_dir / names}"
    assert "Traceback" not in full.stderr and _no_temporaries(small_disk) == []
    filler.unlink()
    again = command[:5] + ["--resume", str(run_dir), "--device", "cpu"] \
        if (run_dir / "config.yaml").exists() else command
    done = subprocess.run(again, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(read_metrics(run_dir)) == 2 and (run_dir / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["report", "export"])
def test_report_and_export_on_a_real_full_disk_are_exit_1_and_leave_nothing(small_disk,
                                                                             study_out,
                                                                             command):
    out = small_disk / "out"
    shutil.copytree(study_out, out, ignore=shutil.ignore_patterns("resume.pt"))
    import sqlite3
    with sqlite3.connect(out / "mtbert.db") as con:
        con.execute("UPDATE trial_user_attributes SET value_json = replace(value_json, ?, ?)",
                    (str(study_out), str(out)))
    dest = small_disk / ("exp" if command == "export" else "rep")
    args = ["best", "--out", str(out), "--export", str(dest)] if command == "export" else \
        ["report", "--out", str(out), "--to", str(dest)]
    filler = _fill(small_disk, 20)
    line = one_line_error(runner.invoke(app, args), 1)
    assert line.startswith(f"mtbert: error: No space left on device: {dest}")
    assert _no_temporaries(small_disk) == []
    assert not (dest / "index.html").exists() or (dest / "index.html").stat().st_size > 0
    filler.unlink()
    again = runner.invoke(app, [*args, "--overwrite"] if command == "report" else args)
    assert again.exit_code == 0, again.output


# ------------------------------------------------------------------ read-only studies

@pytest.mark.slow
def test_a_study_on_a_read_only_file_system_is_read_and_exported(study_out, tmp_path):
    """best, studies, report --to and best --export read a study through a read-only bind
    mount; no lock file is made there; writers say why they cannot."""
    ro = tmp_path / "ro"
    ro.mkdir()
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(study_out), str(ro)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {made.stderr.strip()}")
    try:
        before = sorted(p.name for p in ro.iterdir())
        best = runner.invoke(app, ["best", "--out", str(ro)])
        assert best.exit_code == 0 and "best trial 1" in best.output, best.output
        listed = runner.invoke(app, ["studies", "--out", str(ro), "--json"])
        assert listed.exit_code == 0 and json.loads(listed.output)[0]["name"] == "lw"
        report = runner.invoke(app, ["report", "--out", str(ro), "--to", str(tmp_path / "r")])
        assert report.exit_code == 0, report.output
        assert (tmp_path / "r" / "index.html").stat().st_size > 0
        export = runner.invoke(app, ["best", "--out", str(ro), "--export", str(tmp_path / "e")])
        assert export.exit_code == 0, export.output
        assert (tmp_path / "e" / "model.safetensors").exists()
        stop = runner.invoke(app, ["studies", "--out", str(ro), "--stop", "lw"])
        assert "read-only file system" in one_line_error(stop, 1).lower()
        assert sorted(p.name for p in ro.iterdir()) == before  # no mtbert.db.lock
    finally:
        # -l: the in-process commands may still hold the study's SQLite file open
        subprocess.run(["umount", "-l", str(ro)], check=False)


# ------------------------------------------------------------------ locale

@pytest.mark.slow
def test_report_and_best_under_the_c_locale_write_utf8_and_never_crash(study_out, tmp_path):
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": ""}
    folder = tmp_path / "r\u00e9sultats"
    for args in (["report", "--out", str(study_out), "--to", str(folder)],
                 ["best", "--out", str(study_out)],
                 ["best", "--out", str(tmp_path / "caf\u00e9")]):
        done = subprocess.run([sys.executable, "-m", "mtbert", *args],
                              capture_output=True, env=env, timeout=300)
        stderr = done.stderr.decode("utf-8", "replace")
        assert "Traceback" not in stderr and "UnicodeEncodeError" not in stderr, stderr
        assert done.returncode == (2 if "caf" in args[-1] else 0), stderr
    html = (folder / "index.html").read_bytes().decode("utf-8")
    assert "NaN loss at lr \u00d7 10" in html and "mtbert study lw" in html
