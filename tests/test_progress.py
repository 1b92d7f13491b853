"""What a sweep shows while it runs: the trial process's progress file (written at most
every few seconds, after each evaluation at once, never failing the trial), the lines
made of it, the live block at the bottom of a terminal, and the display that reads the
running trials' files, all without a process. The sweeps themselves, plain and under a
pseudo-terminal, are in tests/test_sweep_progress.py."""

from __future__ import annotations

import io
import logging
import os
import optuna
import pytest

from mtbert.live import LiveBlock, duration, fit, is_live, logging_above
from mtbert.studies.budget import BUDGET_HOURS, GPU_SHARE, WALL_S
from mtbert.studies.job import PROGRESS_FILE, RACED_OUT, STUDY_OBJECTIVES, TrialProgress
from mtbert.studies.progress import (LIVE, PLAIN, SweepDisplay, evaluation_line,
                                     read_progress, running_line, study_line)
from mtbert.studies.trial import ProgressReport

OBJECTIVES = ["overall/geometric"]
METRICS = {"sst/acc": 0.4, "qqp/acc": 0.7, "sts/pearson": 0.5, "overall/arithmetic": 0.6,
           "overall/geometric": 0.5192, "train/loss": 0.8125, "loss_weight/sst": 1.0}


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _written(run_dir) -> TrialProgress:
    return TrialProgress.read(run_dir)


# ---------------------------------------------------------------- the trial's side

def test_the_report_writes_at_start_then_at_most_every_interval_and_at_each_evaluation(
        tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    clock = Clock()
    report = ProgressReport(tmp_path, every=2.0, clock=clock)
    first = _written(tmp_path)
    assert (first.started, first.gpu, first.epoch, first.step) == (1000.0, "3", 0, 0)

    clock.now = 1010.0  # loading took 10 s: the rate starts at the first step call
    report.step(epoch=0, epochs=2, step=0, steps=20, loss=None)
    assert _written(tmp_path).epochs == 2  # more than 2 s since the start's write
    clock.now = 1011.0
    report.step(epoch=0, epochs=2, step=4, steps=20, loss=0.9)
    assert _written(tmp_path).step == 0  # 1 s after the last write: not rewritten
    clock.now = 1012.0
    report.step(epoch=0, epochs=2, step=8, steps=20, loss=None)  # no reading: loss kept
    p = _written(tmp_path)
    assert (p.epoch, p.step, p.loss, p.updated) == (1, 8, 0.9, 1012.0)
    assert p.eta_s == 3.0  # 8 steps in 2 s: 12 steps left take 3 s

    clock.now = 1013.0
    report.step(epoch=0, epochs=2, step=10, steps=20, loss=0.8)
    report.evaluated(0, 10, METRICS)  # at once, 1 s after the last write
    p = _written(tmp_path)
    assert p.step == 10 and p.eta_s == 3.0
    assert p.evaluations == [{"epoch": 1, "step": 10, "elapsed_s": 13.0, "eta_s": 3.0,
                              **{k: v for k, v in METRICS.items() if k != "loss_weight/sst"}}]


def test_a_progress_file_that_cannot_be_written_is_logged_once_and_fails_nothing(
        tmp_path, caplog):
    gone = tmp_path / "gone"
    with caplog.at_level(logging.WARNING, logger="mtbert"):
        report = ProgressReport(gone, every=0.0)
        report.step(epoch=0, epochs=1, step=1, steps=2, loss=0.5)
        report.evaluated(0, 2, METRICS)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "progress file is not written" in warnings[0]
    assert str(gone / PROGRESS_FILE) in warnings[0]


def test_a_progress_file_reads_back_and_anything_else_reads_as_none(tmp_path):
    progress = TrialProgress(started=5.0, gpu="1", epoch=2, epochs=3, step=7, steps=9,
                             loss=0.25, eta_s=4.0, updated=6.0,
                             evaluations=[{"epoch": 1, "step": 3}])
    progress.write(tmp_path)
    assert TrialProgress.read(tmp_path) == progress
    assert not (tmp_path / (PROGRESS_FILE + ".tmp")).exists()
    for text in ("", "{not json", "[1, 2]", '{"epoch": 1}'):  # no `started`: not ours
        (tmp_path / PROGRESS_FILE).write_text(text)
        assert TrialProgress.read(tmp_path) is None
    assert TrialProgress.read(tmp_path / "nowhere") is None


def test_a_progress_file_older_than_the_trial_is_an_earlier_runs(tmp_path):
    TrialProgress(started=100.0, epoch=1).write(tmp_path)
    assert read_progress(tmp_path, since=100.5).started == 100.0  # the clock's slack
    assert read_progress(tmp_path, since=200.0) is None


# ---------------------------------------------------------------- lines

def test_durations():
    assert [duration(s) for s in (-3, 0, 41.9, 60, 151, 3599, 3600, 3720, 90000)] == [
        "0s", "0s", "41s", "1m00s", "2m31s", "59m59s", "1h00m", "1h02m", "25h00m"]


def test_a_running_trial_line_before_its_process_wrote_and_while_it_trains():
    assert running_line(6, None, now=103.0, since=100.0, device="cpu",
                        objectives=OBJECTIVES) == "trial 6  starting  3s"
    loading = TrialProgress(started=101.0)
    assert running_line(6, loading, now=103.0, since=100.0, device="cpu",
                        objectives=OBJECTIVES) == "trial 6  starting  2s"
    training = TrialProgress(started=100.0, gpu="1", epoch=2, epochs=3, step=140, steps=300,
                             loss=0.81234, eta_s=130.0, updated=140.0,
                             evaluations=[{"epoch": 1, "step": 100, **METRICS}])
    assert running_line(4, training, now=151.0, since=99.0, device="cuda",
                        objectives=OBJECTIVES) == (
        "trial 4  gpu 1  epoch 2/3  step 140/300  51s, ~1m59s left  loss 0.8123  "
        "dev overall/geometric 0.5192 (epoch 1)")


def test_an_evaluation_line_has_the_numbers_of_that_evaluation():
    progress = TrialProgress(started=0.0, epoch=2, epochs=3, step=140, steps=300,
                             loss=0.5, eta_s=10.0)
    evaluation = {"epoch": 1, "step": 100, "elapsed_s": 41.2, "eta_s": 82.0, **METRICS}
    assert evaluation_line(4, progress, evaluation, device="cpu",
                           objectives=["overall/geometric", "sst/acc"]) == (
        "trial 4  cpu  epoch 1/3  step 100/300  41s, ~1m22s left  loss 0.8125  "
        "dev overall/geometric 0.5192  sst/acc 0.4000")


# ---------------------------------------------------------------- the terminal block

@pytest.mark.parametrize("columns, lines, shown", [
    (120, 30, ["trial 0  cpu  epoch 1/2", "trial 1  cpu  epoch 1/2", "trial 2  cpu  epoch 1/2",
               "study demo: 1/3 trials done"]),
    (16, 30, ["trial 0  cpu...", "trial 1  cpu...", "trial 2  cpu...", "study demo: ..."]),
    (120, 3, ["... 3 more", "study demo: 1/3 trials done"]),
    (120, 4, ["trial 0  cpu  epoch 1/2", "... 2 more", "study demo: 1/3 trials done"]),
    (3, 1, ["st"]),  # one row: the study line alone, in what columns there are
])
def test_the_block_fits_any_terminal(columns, lines, shown):
    block = [f"trial {i}  cpu  epoch 1/2" for i in range(3)] + ["study demo: 1/3 trials done"]
    assert fit(block, os.terminal_size((columns, lines))) == shown


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_block_is_redrawn_in_place_and_log_lines_go_above_it(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream = FakeTerminal()
    assert is_live(stream) and not is_live(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not is_live(stream)
    logger = logging.getLogger("mtbert.test-live")
    logger.propagate = False
    logger.handlers[:] = [logging.StreamHandler(stream)]
    block = LiveBlock(stream)
    with logging_above(block, logger):
        block.update(["trial 0  starting  0s", "study s"])
        block.update(["trial 0  cpu  epoch 1/1", "study s"])
        logger.warning("trial 0 COMPLETE")
        block.update(["study s: 1 trials done"])
        block.close()
    assert stream.getvalue() == (
        "trial 0  starting  0s\nstudy s\n"
        "\x1b[2A\r\x1b[Jtrial 0  cpu  epoch 1/1\nstudy s\n"
        "\x1b[2A\r\x1b[Jtrial 0 COMPLETE\ntrial 0  cpu  epoch 1/1\nstudy s\n"
        "\x1b[2A\r\x1b[Jstudy s: 1 trials done\n"
        "\x1b[1A\r\x1b[J")
    assert [type(h) for h in logger.handlers] == [logging.StreamHandler]  # as they were


# ---------------------------------------------------------------- the study line

def _finished(study, value, state="COMPLETE", hours=0.0, **attrs):
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState[state], value=value if state == "COMPLETE" else None,
        params={}, distributions={},
        user_attrs={WALL_S: hours * 3600, GPU_SHARE: 0.5, **attrs}))


def test_the_study_line_counts_the_study_and_names_its_best_and_its_hours():
    study = optuna.create_study(study_name="lw1", direction="maximize")
    study.set_user_attr(STUDY_OBJECTIVES, OBJECTIVES)
    _finished(study, 0.41, hours=1.0)
    _finished(study, 0.45, hours=1.0, **{RACED_OUT: True})
    _finished(study, None, "PRUNED", hours=0.5)
    _finished(study, None, "FAIL")
    study.enqueue_trial({})
    assert study_line(study, done=3, asked=5) == (
        "study lw1: 3/5 trials done; 2 complete, 1 pruned, 1 failed, 1 raced out, 1 queued; "
        "best overall/geometric 0.4500 (trial 1)")
    study.set_user_attr(BUDGET_HOURS, 4.0)
    assert study_line(study, done=3, asked=None).endswith(
        "(trial 1); 1.2500 of 4.0000 h")  # wall hours x GPU share 1/2


def test_the_study_line_of_a_multi_objective_study_counts_its_front_and_running_trials():
    study = optuna.create_study(study_name="mo", directions=["maximize", "maximize"])
    for values in ([0.5, 0.2], [0.2, 0.5], [0.1, 0.1]):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                                  values=values))
    study.ask()
    assert study_line(study, done=1, asked=4) == (
        "study mo: 1/4 trials done; 3 complete, 0 pruned, 0 failed, 1 running; "
        "2 on the Pareto front")


# ---------------------------------------------------------------- the display

def _display(mode, **kw):
    return SweepDisplay(mode=mode, objectives=OBJECTIVES, asked=2, device="cpu",
                        every=3600, **kw)


def _eval(epoch, step, value):
    return {"epoch": epoch, "step": step, "elapsed_s": 2.0 * epoch, "eta_s": 2.0 * (2 - epoch),
            "overall/geometric": value, "train/loss": 1 / (epoch + 1)}


def test_the_plain_display_prints_each_evaluation_once_and_the_last_before_the_trial_ends(
        tmp_path, caplog):
    display = _display(PLAIN)
    run_dir = tmp_path / "trial-0000"
    run_dir.mkdir()
    progress = TrialProgress(started=display.clock(), epoch=1, epochs=2, step=3, steps=6)
    with caplog.at_level(logging.INFO, logger="mtbert"):
        with display.running(0, run_dir):
            display.refresh()  # nothing written yet: nothing to print
            progress.evaluations.append(_eval(1, 3, 0.41))
            progress.write(run_dir)
            display.refresh()
            display.refresh()  # printed once
            progress.evaluations.append(_eval(2, 6, 0.43))
            progress.write(run_dir)  # ends before the next refresh
        logging.getLogger("mtbert").info("trial 0 COMPLETE")
    assert [r.getMessage() for r in caplog.records] == [
        "trial 0  cpu  epoch 1/2  step 3/6  2s, ~2s left  loss 0.5000  "
        "dev overall/geometric 0.4100",
        "trial 0  cpu  epoch 2/2  step 6/6  4s, ~0s left  loss 0.3333  "
        "dev overall/geometric 0.4300",
        "trial 0 COMPLETE"]


def test_the_live_frame_shows_each_running_trial_then_the_study(tmp_path):
    clock = Clock(500.0)
    display = _display(LIVE, clock=clock, stream=FakeTerminal())
    display._study = "study s: 0/2 trials done"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with display.running(1, tmp_path / "b"), display.running(0, tmp_path / "a"):
        TrialProgress(started=501.0, epoch=1, epochs=2, step=2, steps=6, loss=0.7,
                      eta_s=8.0, updated=502.0).write(tmp_path / "a")
        clock.now = 504.0
        assert display.frame() == [
            "trial 0  cpu  epoch 1/2  step 2/6  3s, ~6s left  loss 0.7000",
            "trial 1  starting  4s",
            "study s: 0/2 trials done"]
    assert display.frame() == ["study s: 0/2 trials done"]


def test_an_off_display_reads_nothing(tmp_path):
    display = _display(None)
    assert SweepDisplay.choose(False, FakeTerminal()) is None
    assert SweepDisplay.choose(True, io.StringIO()) == PLAIN
    with display.shown(study=None), display.running(0, tmp_path / "nowhere"):
        display.started(None)
        display.ended(None)
    assert display.done == 0
