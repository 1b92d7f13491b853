"""What `mtbert sweep` shows while it runs, from the outside: plain lines where stderr is
no terminal (the stand-in trial program, then one real tiny trial: which lines, in which
order, with which numbers), and the live block under a pseudo-terminal (a running trial
whose step moves, then its result above the block). The parts are tested without
processes in tests/test_progress.py."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies.job import TRIAL_PROGRAM_ENV
from conftest import STUB_TRIAL
from stub_trial import STUB_ENV, stub_metrics

pytestmark = pytest.mark.slow
SPEC = ("name: s\nspace:\n  train.lr: {type: categorical, choices: [1.0e-5, 2.0e-5, 3.0e-5]}\n"
        "pruner: {name: none}\n")


def _stub_env(**settings) -> dict[str, str]:
    return {**os.environ, TRIAL_PROGRAM_ENV: str(STUB_TRIAL), STUB_ENV: json.dumps(settings),
            "OMP_NUM_THREADS": "1"}


def _sweep(spec, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mtbert", "sweep", str(spec), "--out", str(out),
            "--device", "cpu", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=10",
            *extra]


def _trials(out):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{out}/mtbert.db").trials


def test_not_a_terminal_one_plain_line_per_evaluation_then_the_result_then_the_study(
        tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    done = subprocess.run(
        _sweep(spec, out, "--trials", "3", "--trials-per-gpu", "2", "--budget-hours", "1"),
        env=_stub_env(step_s=0.02, fail={"trial-0001": "out of patience"}),
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", done.stderr)  # no control character
    lines = [line.removeprefix("mtbert: ") for line in done.stderr.splitlines()]
    trials = {t.number: t for t in _trials(out)}
    assert [trials[n].state.name for n in range(3)] == ["COMPLETE", "FAIL", "COMPLETE"]

    for number in (0, 2):  # each trial: its evaluations in order, its result, a study line
        t = trials[number]
        shown = [i for i, line in enumerate(lines) if line.startswith(f"trial {number} ")]
        assert len(shown) == 3, done.stderr
        for epoch, i in zip((1, 2), shown):
            value = stub_metrics(t.params, t.user_attrs["seed"], epoch - 1, {})
            assert re.fullmatch(
                rf"trial {number}  cpu  epoch {epoch}/2  step {10 * epoch}/20  \d+s, ~\d+s "
                rf"left  loss {1 / (epoch + 1):.4f}  dev overall/geometric "
                rf"{value['overall/geometric']:.4f}", lines[i]), lines[i]
        assert re.match(rf"trial {number} COMPLETE in \d+s", lines[shown[2]])
        after = [line for line in lines[shown[2] + 1:] if line.startswith(("study s: ",
                                                                            f"trial {number}"))]
        assert after[0].startswith("study s: ")
    # The failed trial evaluated nothing: its result line alone, then the study's.
    failed = [line for line in lines if line.startswith("trial 1 ")]
    assert len(failed) == 1 and failed[0].startswith("trial 1 FAIL") \
        and "out of patience" in failed[0]

    studies = [line for line in lines if re.match(r"study s: \d/3 trials done", line)]
    assert [line.split(";")[0] for line in studies] == [
        "study s: 1/3 trials done", "study s: 2/3 trials done", "study s: 3/3 trials done"]
    best = max((trials[0], trials[2]), key=lambda t: t.value)
    assert re.fullmatch(rf"study s: 3/3 trials done; 2 complete, 0 pruned, 1 failed; best "
                        rf"overall/geometric {best.value:.4f} \(trial {best.number}\); "
                        r"0\.\d{4} of 1\.0000 h", studies[-1])


def test_a_real_trials_plain_lines_carry_its_evaluations_numbers(tiny_encoder, task_dir,
                                                                tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, [
        "sweep", str(spec), "--trials", "1", "--out", str(out), "--data-dir", str(task_dir),
        "--wandb-mode", "disabled", "--device", "cpu", "--set", f"model.encoder={tiny_encoder}",
        "--set", f"data.cache_dir={out}/cache", "--set", "train.steps_per_epoch=3",
        "--set", "train.epochs=2", "--set", "train.batch_size=8",
        "--set", "model.max_length=32"])
    assert result.exit_code == 0, result.output
    run = out / "s" / "trial-0000"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [line.removeprefix("mtbert: ") for line in result.stderr.splitlines()]
    shown = [line for line in lines
             if line.startswith("trial 0 ") or re.match(r"study s: \d+/\d+ trials done", line)]
    assert len(shown) == 4, result.stderr
    for line, record in zip(shown, records):
        assert re.fullmatch(
            rf"trial 0  cpu  epoch {record['epoch']}/2  step {record['step']}/6  \d+s"
            rf"(, ~\d+s left)?  loss {record['train/loss']:.4f}  "
            rf"dev overall/geometric {record['overall/geometric']:.4f}", line), line
    assert shown[2].startswith("trial 0 COMPLETE in ")
    assert shown[3].startswith("study s: 1/1 trials done; 1 complete, 0 pruned, 0 failed; "
                               "best overall/geometric ")
    progress = json.loads((run / "progress.json").read_text())
    assert (progress["epoch"], progress["epochs"], progress["step"], progress["steps"]) == \
        (2, 2, 6, 6)
    assert [e["overall/geometric"] for e in progress["evaluations"]] == \
        [r["overall/geometric"] for r in records]


def _run_in_a_terminal(command: list[str], env: dict[str, str], *, columns: int = 150,
                       timeout: float = 120) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal of `columns` x 40 as its stdin, stdout and
    stderr; its exit code and everything it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.execve(command[0], command, {**env, "TERM": "xterm"})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    written, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            written += chunk
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), written.decode().replace("\r\n", "\n")


def test_in_a_terminal_the_running_trial_is_redrawn_then_its_result_scrolls_above(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    # 40 steps of 0.25 s: the progress file (rewritten every 2 s) and the display
    # (redrawn every 2 s) meet at several steps.
    code, written = _run_in_a_terminal(
        _sweep(spec, out, "--trials", "1", "--set", "train.steps_per_epoch=20"),
        _stub_env(step_s=0.25))
    assert code == 0, written
    # What was written after each erase of the block (cursor up N rows, erase below).
    frames = re.split(r"\x1b\[\d+A\r\x1b\[J", written)
    running = [i for i, f in enumerate(frames) if re.search(r"^trial 0  cpu  epoch", f, re.M)]
    steps = {int(m) for f in frames for m in re.findall(r"^trial 0  cpu  epoch \d/2  step "
                                                         r"(\d+)/40", f, re.M)}
    assert len(steps) >= 2, written  # the step moved between redraws
    assert re.search(r"^trial 0  starting  \d+s$", "".join(frames[:running[0]]), re.M)
    result = next(i for i, f in enumerate(frames) if "mtbert: trial 0 COMPLETE" in f)
    assert result > max(running)
    # The block stands below every line printed, the study line last in it ...
    block = frames[running[-1]].splitlines()
    assert block[-2].startswith("trial 0  cpu  epoch") and block[-1].startswith("study s: 0/1")
    # ... and once the sweep ends it goes; its study line stays, then the sweep's table.
    assert frames[-1].startswith("mtbert: study s: 1/1 trials done; 1 complete")
    assert "overall/geometric" in frames[-1].splitlines()[-2]


def test_two_workers_each_show_their_own_trials_and_the_studys_totals(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"
    args = _sweep(spec, out, "--trials", "2", "--storage", f"sqlite:///{tmp_path}/shared.db")
    workers = [subprocess.Popen(args, env=_stub_env(step_s=0.05), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [w.communicate(timeout=180)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errs
    mine = []
    for err in errs:
        evaluated = set(map(int, re.findall(r"^mtbert: trial (\d+)  cpu  epoch", err, re.M)))
        ended = set(map(int, re.findall(r"^mtbert: trial (\d+) COMPLETE", err, re.M)))
        assert evaluated == ended and len(ended) == 2, err
        mine.append(ended)
        assert re.findall(r"^mtbert: study s: (\d)/2 trials done", err, re.M) == ["1", "2"]
    assert mine[0] | mine[1] == {0, 1, 2, 3}
    # The worker that ended last counts the other's trials too.
    complete = [int(n) for err in errs for n in re.findall(r"trials done; (\d) complete", err)]
    assert max(complete) == 4


def _trial_process(run_dir) -> int | None:
    """The pid of the stand-in trial process of `run_dir`, from /proc."""
    for entry in os.scandir("/proc"):
        try:
            with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in argv and str(STUB_TRIAL).encode() in argv:
            return int(entry.name)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the trial process in /proc")
def test_a_killed_trials_retry_shows_the_epochs_it_trains_after_the_ones_it_took_over(
        tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nspace:\n  train.seed: {type: categorical, choices: [0]}\n"
                    "pruner: {name: none}\n")
    out = tmp_path / "runs"
    worker = subprocess.Popen(_sweep(spec, out, "--trials", "2", "--set", "train.epochs=3"),
                              env=_stub_env(epoch_s=0.7), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    first = (out / "s" / "trial-0000").resolve()
    deadline = time.monotonic() + 120
    while not ((first / "resume.pt").exists() and _trial_process(first)):
        assert worker.poll() is None and time.monotonic() < deadline, "no first epoch"
        time.sleep(0.1)
    os.kill(_trial_process(first), 9)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    lines = [line.removeprefix("mtbert: ") for line in err.splitlines()]
    shown = [line for line in lines if re.match(r"trial \d+( |  cpu)|study s: \d/", line)]
    retry = _trials(out)[1]
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert retry.user_attrs["retry_of"] == 0 and resumed >= 1
    # The killed trial's evaluations, its FAIL; then its retry's, from the epoch it resumes.
    assert [re.match(r"trial \d+(  cpu  epoch \d/3| \w+)|study s: \d/2", line).group(0)
            for line in shown] == [
        *[f"trial 0  cpu  epoch {e}/3" for e in range(1, resumed + 1)],
        "trial 0 FAIL", "study s: 1/2", "trial 1 resumes",  # the worker's own log line
        *[f"trial 1  cpu  epoch {e}/3" for e in range(resumed + 1, 4)],
        "trial 1 COMPLETE", "study s: 2/2"], err
