"""The worker loop, shaped like Optuna's own (`optuna/study/_optimize.py`) on its public
API: `Worker.optimize` runs trials, one thread per slot; `_run_trials` takes one trial at
a time while the count, the time and the study allow; `_run_trial` runs it and tells its
ending (the objective's value, pruned, failed), then the end-of-trial rule.

Which trial a worker takes next is one policy (`NextTrial`): the oldest queued trial
it may run (a retry, a seed run, a queued configuration), or a new one the sampler
draws. Plain sweeps, raced sweeps and reseeds are settings of that one policy, not
loops of their own. A queued trial is claimed through the storage
(`set_trial_state_values` answers False when another worker took it first), so
that a queued trial runs once whichever worker, old or new, takes it.

The worker keeps each running trial's heartbeat (so that a worker that dies leaves
a trial that the next worker marks FAIL and queues again) and fails stale trials
before each trial, as `Study.optimize` does. Its storage calls ride out an outage
(`studies.outage`); the heartbeat thread outlives one, and a trial whose heartbeat
could not be recorded for the grace period is stopped, since another worker may by
then have failed it and queued its retry: no trial runs twice at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from mtbert.studies.optuna_api import (grid_left, refresh_trials, retrying_storage,
                                       shared_storage, trial_id)
from mtbert.studies.outage import Outage, StorageOutage
from mtbert.studies.racing import is_new_configuration

log = logging.getLogger("mtbert")


class TrialFailed(Exception):
    """A trial's training failed; the worker records it as FAIL and the study goes on."""


@dataclass
class NextTrial:
    """Which trial a worker runs next.

    Queued trials first, oldest first; with `configurations` set (a raced worker), a
    queued trial that starts a configuration is taken, and a new one drawn, only while
    fewer than that many were started by this worker: seed runs and retries are always
    taken. With `sample` False (a reseed), or once a grid sampler has started every
    point, nothing new is drawn. None: nothing to run now."""

    configurations: int | None = None
    sample: bool = True
    started: int = 0  # configurations this worker started (raced)
    grid_done: bool = False  # the study's grid sampler has no point left (said once)

    def __post_init__(self):
        self._lock = threading.Lock()

    def __call__(self, study, storage, study_id: int):
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        with self._lock:
            full = self.configurations is not None and self.started >= self.configurations
            for t in storage.get_all_trials(study_id, deepcopy=False,
                                            states=(TrialState.WAITING,)):
                new = is_new_configuration(t)
                if new and full:
                    continue
                try:  # another worker may take it first: then it is not WAITING here
                    if not storage.set_trial_state_values(trial_id(t), state=TrialState.RUNNING):
                        continue
                except UpdateFinishedTrialError:
                    continue
                self.started += new
                refresh_trials(study)
                return optuna.trial.Trial(study, trial_id(t))
            if full or not self.sample or self._grid_done(study):
                return None
            self.started += 1
            refresh_trials(study)
            return optuna.trial.Trial(study, storage.create_new_trial(study_id))


    def _grid_done(self, study) -> bool:
        """Whether the study's grid sampler (if it has one) has no point left to start."""
        sampler = getattr(study.sampler, "inner", study.sampler)  # a raced study's wrapper
        if not hasattr(sampler, "search_space") or grid_left(study, sampler) > 0:
            return False
        if not self.grid_done:
            log.info("the grid of study %s is done: every point has started",
                     study.study_name)
            self.grid_done = True
        return True


@contextmanager
def heartbeat(storage, trial: int, *, grace: float | None = None,
              on_lost: Callable[[], None] | None = None):
    """Record the heartbeat of trial id `trial` every interval the storage was opened
    with, as `Study.optimize` does, so that a worker that dies leaves a stale trial.
    A beat that fails is tried again at the next interval; once none went through for
    `grace` seconds, `on_lost()` is called (once)."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        last, lost = time.monotonic(), False
        while True:
            try:
                storage.record_heartbeat(trial)
                last = time.monotonic()
            except Exception as err:  # an outage: the next beat tries again
                log.debug("heartbeat of trial id %d not recorded: %s", trial, err)
                if not lost and grace and on_lost and time.monotonic() - last > grace:
                    lost = True
                    on_lost()
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Worker:
    """Runs trials of `study` (its sampler and pruner) through `storage` (an RDBStorage
    on its database) with `objective(trial)` in `slots` threads; after each,
    `on_trial_end(study, frozen_trial)` may return why no new trial should start."""

    def __init__(self, study, storage, *, objective: Callable, slots: int,
                 next_trial: NextTrial, on_trial_end: Callable | None = None,
                 outage: Outage | None = None, grace: float | None = None):
        import optuna

        self.plain = shared_storage(storage)  # the heartbeat's: it retries on its own
        self.storage = retrying_storage(self.plain, outage.call) if outage else self.plain
        self.grace = grace
        self.study = optuna.load_study(study_name=study.study_name, storage=self.storage,
                                       sampler=study.sampler, pruner=study.pruner)
        self.objective = objective
        self.study_id = self.storage.get_study_id_from_name(study.study_name)
        self.slots, self.next_trial, self.on_trial_end = slots, next_trial, on_trial_end
        self.stopped: str | None = None
        self._lock = threading.Condition()
        self._running = 0
        self._left: int | None = None
        self._deadline: float | None = None

    def optimize(self, *, n_trials: int | None = None, timeout: float | None = None,
                 on_signal: Callable[[], None] | None = None) -> str | None:
        """Run up to `n_trials` trials (None: until the policy has none) for up to
        `timeout` seconds; returns why it stopped early, or None. SIGINT and SIGTERM call
        `on_signal` (end the running trial processes); with one slot the trial's thread
        is this one, and KeyboardInterrupt ends it here."""
        self._left = n_trials
        self._deadline = None if timeout is None else time.monotonic() + timeout

        def stop(signum, frame):
            if on_signal is not None:
                on_signal()
            if self.slots == 1:
                raise KeyboardInterrupt
            # Several trials: each thread records its trial as FAIL and re-raises
            # KeyboardInterrupt, which reaches this thread through its future.

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.slots == 1:
                self._run_trials()
            else:
                with ThreadPoolExecutor(self.slots) as pool:
                    futures = [pool.submit(self._run_trials) for _ in range(self.slots)]
                    for future in futures:
                        future.exception()  # wait for every thread before raising
                    for future in futures:
                        future.result()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.stopped

    def _take(self):
        """The next trial for this thread, or None when this worker is done."""
        import optuna

        with self._lock:
            while True:
                if self.stopped or self._left == 0 or (
                        self._deadline is not None and time.monotonic() >= self._deadline):
                    return None
                optuna.storages.fail_stale_trials(self.study)
                trial = self.next_trial(self.study, self.storage, self.study_id)
                if trial is not None:
                    self._left = None if self._left is None else self._left - 1
                    self._running += 1
                    return trial
                if not self._running:
                    return None
                # A trial of this worker still runs and may queue a seed run: wait for it.
                self._lock.wait()

    def _run_trials(self) -> None:
        while (trial := self._take()) is not None:
            ended = False
            try:
                self._run_trial(trial)
                ended = True
            finally:
                with self._lock:
                    self._running -= 1
                    if not ended:  # interrupted, or a bug: no thread takes another trial
                        self.stopped = self.stopped or "interrupted"
                    self._lock.notify_all()

    def _run_trial(self, trial) -> None:
        """Run the objective on `trial` and tell the study how it ended (Optuna's
        `_run_trial`): its value, PRUNED, or FAIL; a TrialFailed ends only the trial,
        anything else (KeyboardInterrupt, a bug) ends the worker after the FAIL is told. A
        stop (KeyboardInterrupt) after the trial's result was there (the objective's
        `finished(trial)` gives its values) is told COMPLETE, then ends the worker."""
        import optuna
        from optuna.trial import TrialState

        values, state, error = None, TrialState.COMPLETE, None
        lost = getattr(self.objective, "lost_heartbeat", None)
        with heartbeat(self.plain, trial_id(trial), grace=self.grace,
                       on_lost=lost and (lambda: lost(trial))):
            try:
                values = self.objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except TrialFailed:
                state = TrialState.FAIL
            except StorageOutage:
                # Told nothing: the trial stays RUNNING, its run directory as it is, and
                # the next worker fails it through its heartbeat and resumes it.
                raise
            except (Exception, KeyboardInterrupt) as err:
                state, error = TrialState.FAIL, err
                finished = getattr(self.objective, "finished", None)
                if isinstance(err, KeyboardInterrupt) and finished is not None:
                    # Stopped once its training had finished: its result stands (COMPLETE,
                    # then this worker stops), rather than a retry that trains nothing.
                    values = finished(trial)
                    state = TrialState.FAIL if values is None else TrialState.COMPLETE
        frozen, told = self._tell(trial, values if state == TrialState.COMPLETE else None,
                                  state)
        ended = getattr(self.objective, "ended", None)
        if ended is not None:
            ended(trial, told)
        if error is not None:
            raise error
        reason = self.on_trial_end(self.study, frozen) if self.on_trial_end and told else None
        if reason:
            with self._lock:
                self.stopped = self.stopped or reason

    def _tell(self, trial, values, state):
        """Tell the study how `trial` ended; returns its record and whether it was told.
        A trial found finished already was failed by another worker while this one's
        heartbeat could not reach the storage (that worker queued its retry), or was told
        by a first try whose answer the outage swallowed."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            return self.study.tell(trial, values, state=state), True
        except (UpdateFinishedTrialError, ValueError):
            stored = self.storage.get_trial(trial_id(trial))
            if not stored.state.is_finished():
                raise
            if stored.state == state:
                return stored, True
            log.warning("trial %d was %s by another worker while this worker could not reach "
                        "the storage; its result stays in its run directory for the retry",
                        trial.number, stored.state.name)
            return stored, False
