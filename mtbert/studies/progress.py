"""What a sweep worker shows while its trials run: each running trial (number, GPU or
device, epoch and step of the total, elapsed and an estimate of the rest, its latest dev
metric and training loss) and the study (trials done of those asked, states, the best
so far, hours against the budget).

A trial process tells its progress through its run directory, not the storage: it
rewrites RUN_DIR/progress.json (`job.TrialProgress`) every few seconds, and this module
reads it. The study line reads the storage once per trial start and end, as the end-of-
trial rule already does, never per step.

In a terminal (`live.is_live`) the running trials and the study line are a block at
the bottom of stderr, redrawn every REFRESH_S seconds, and every log line, a finished
trial's result among them, scrolls above it. Elsewhere (a log file, Slurm, Kubernetes)
the same lines are plain log lines: one per trial per evaluation, and the study line
when a trial ends. Off (`--quiet`, or a library call), it shows nothing and reads
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mtbert.live import LiveBlock, duration, is_live, logging_above, position_line
from mtbert.studies.job import RACED_OUT, TrialProgress

log = logging.getLogger("mtbert")

REFRESH_S = 2.0  # how often the display reads the running trials' progress files
LIVE, PLAIN = "live", "plain"


def read_progress(run_dir: Path, since: float) -> TrialProgress | None:
    """A running trial's progress, None before its process wrote any. A file older than
    `since` (when its worker started the trial) is an earlier run's left in the directory
    (a study deleted without --runs and made again): none yet either."""
    progress = TrialProgress.read(run_dir)
    return progress if progress is not None and progress.started >= since - 1 else None


def _where(progress: TrialProgress, device: str) -> str:
    return f"gpu {progress.gpu}" if progress.gpu else device


def dev_metrics(values: dict, objectives: list[str]) -> str:
    """The objectives' values in an evaluation: `overall/geometric 0.4312`."""
    return "  ".join(f"{key} {values[key]:.4f}" for key in objectives if key in values)


def running_line(number: int, progress: TrialProgress | None, *, now: float, since: float,
                 device: str, objectives: list[str]) -> str:
    """A running trial, as the live display shows it."""
    if progress is None or progress.epoch == 0:  # no process yet, or it is still loading
        started = since if progress is None else progress.started
        return f"trial {number}  starting  {duration(now - started)}"
    last = progress.evaluations[-1] if progress.evaluations else None
    return position_line(
        f"trial {number}", _where(progress, device), epoch=progress.epoch,
        epochs=progress.epochs, step=progress.step, steps=progress.steps,
        elapsed_s=now - progress.started, loss=progress.loss,
        eta_s=None if progress.eta_s is None else progress.eta_s - (now - progress.updated),
        dev=f"{dev_metrics(last, objectives)} (epoch {last['epoch']})" if last else "")


def evaluation_line(number: int, progress: TrialProgress, evaluation: dict, *, device: str,
                    objectives: list[str]) -> str:
    """One evaluation of a trial, as the plain display prints it."""
    return position_line(
        f"trial {number}", _where(progress, device), epoch=evaluation["epoch"],
        epochs=progress.epochs, step=evaluation["step"], steps=progress.steps,
        elapsed_s=evaluation["elapsed_s"], eta_s=evaluation.get("eta_s"),
        loss=evaluation.get("train/loss"), dev=dev_metrics(evaluation, objectives))


def study_line(study, *, done: int, asked: int | None) -> str:
    """The study as this worker sees it: this worker's trials done of those asked (None:
    as many as come), then the study's, every worker's: trials by state, the best value
    so far, the hours against the budget when it has one."""
    from mtbert.studies.budget import BUDGET_HOURS, format_hours, trial_hours
    from mtbert.studies.results import best_trial, pareto_front, study_objectives

    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    counts = [f"{states.count('COMPLETE')} complete", f"{states.count('PRUNED')} pruned",
              f"{states.count('FAIL')} failed"]
    raced = sum(bool(t.user_attrs.get(RACED_OUT)) for t in trials)
    counts += [f"{n} {what}" for n, what in ((raced, "raced out"),
                                             (states.count("RUNNING"), "running"),
                                             (states.count("WAITING"), "queued")) if n]
    parts = [f"study {study.study_name}: {done}{'' if asked is None else f'/{asked}'} "
             "trials done", ", ".join(counts)]
    if len(study.directions) > 1:
        front = pareto_front(study)
        if front:
            parts.append(f"{len(front)} on the Pareto front")
    else:
        best = best_trial(study)
        if best is not None:
            parts.append(f"best {study_objectives(study)[0]} {best.values[0]:.4f} "
                         f"(trial {best.number})")
    budget = study.user_attrs.get(BUDGET_HOURS)
    if budget is not None:
        spent = sum(trial_hours(t) for t in trials)
        parts.append(f"{format_hours(spent)} of {format_hours(budget)} h")
    return "; ".join(parts)


@dataclass
class _Running:
    number: int
    run_dir: Path
    since: float  # time.time() when the worker started the trial
    printed: int = 0  # its evaluations printed so far (plain)


class SweepDisplay:
    """A worker's display: `shown(study)` around its trials, `running(number, run_dir)`
    around each trial's run, `ended(study)` after each trial's result line. `mode` is
    LIVE, PLAIN or None (shows nothing); `choose` picks it for a stream."""

    def __init__(self, *, mode: str | None, objectives: list[str], asked: int | None,
                 device: str, stream: TextIO | None = None, every: float = REFRESH_S,
                 clock=time.time):
        self.mode, self.objectives, self.asked, self.device = mode, objectives, asked, device
        self.stream = stream or sys.stderr
        self.every, self.clock = every, clock
        self.done = 0
        self._running: dict[int, _Running] = {}
        self._study = ""
        self._lock = threading.RLock()
        self._block: LiveBlock | None = None

    @staticmethod
    def choose(enabled: bool, stream: TextIO | None = None) -> str | None:
        """The display for `stream` (stderr): live in a terminal, plain lines elsewhere."""
        if not enabled:
            return None
        return LIVE if is_live(stream or sys.stderr) else PLAIN

    @contextlib.contextmanager
    def shown(self, study):
        """Show the display while the worker runs trials of `study`."""
        if self.mode is None:
            yield self
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._refresh_until, args=(stop,), daemon=True,
                                  name="sweep-display")
        with contextlib.ExitStack() as stack:
            if self.mode == LIVE:
                self._block = LiveBlock(self.stream)
                stack.callback(self._last_study_line)
                stack.enter_context(logging_above(self._block, log))
                self._study = study_line(study, done=self.done, asked=self.asked)
            thread.start()
            try:
                yield self
            finally:
                stop.set()
                thread.join()

    @contextlib.contextmanager
    def running(self, number: int, run_dir: Path):
        """Trial `number` runs in `run_dir` meanwhile. When it ends, the plain display
        prints the evaluations it has not printed yet, so that they come before its
        result."""
        if self.mode is None:
            yield
            return
        entry = _Running(number, Path(run_dir), self.clock())
        with self._lock:
            self._running[number] = entry
        self.refresh()
        try:
            yield
        finally:
            with self._lock:
                if self.mode == PLAIN:
                    self._print_evaluations(entry)
                del self._running[number]
            self.refresh()

    def started(self, study) -> None:
        """A trial of this worker started: the live study line counts it."""
        if self.mode == LIVE:
            self._set_study(study_line(study, done=self.done, asked=self.asked))

    def ended(self, study) -> None:
        """A trial of this worker ended (its result line is out): the study line, again
        in the live block, or printed once."""
        if self.mode is None:
            return
        with self._lock:
            self.done += 1
        line = study_line(study, done=self.done, asked=self.asked)
        if self.mode == PLAIN:
            log.info("%s", line)
        else:
            self._set_study(line)

    def _set_study(self, line: str) -> None:
        with self._lock:
            self._study = line
        self.refresh()

    def refresh(self) -> None:
        """Read the running trials' progress: redraw the block, or print what they
        evaluated since the last read."""
        with self._lock:
            if self.mode == PLAIN:
                for entry in sorted(self._running.values(), key=lambda e: e.number):
                    self._print_evaluations(entry)
            elif self._block is not None:
                self._block.update(self.frame())

    def frame(self) -> list[str]:
        """The live block's lines: each running trial, then the study."""
        now = self.clock()
        with self._lock:
            lines = [running_line(e.number, read_progress(e.run_dir, e.since), now=now,
                                  since=e.since, device=self.device,
                                  objectives=self.objectives)
                     for e in sorted(self._running.values(), key=lambda e: e.number)]
            return lines + [self._study] if self._study else lines

    def _print_evaluations(self, entry: _Running) -> None:
        progress = read_progress(entry.run_dir, entry.since)
        if progress is None:
            return
        for evaluation in progress.evaluations[entry.printed:]:
            log.info("%s", evaluation_line(entry.number, progress, evaluation,
                                           device=self.device, objectives=self.objectives))
        entry.printed = max(entry.printed, len(progress.evaluations))

    def _last_study_line(self) -> None:
        """The block goes; its study line stays on the screen, as a printed line."""
        self._block.close()
        if self._study:
            log.info("%s", self._study)

    def _refresh_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            self.refresh()
