"""Running a study: creating or joining it, then trials in this worker until the count,
the time, a stop or the budget ends them; `best --reseed`.

Every worker runs the same `mtbert sweep` command against the same storage, Optuna's
storage the only coordinator. The loop is `studies.worker` (which trial next, the
heartbeat, telling how a trial ended); each trial is a process (`studies.process`).
A worker that dies leaves a trial whose heartbeat stops, which the next worker to
start a trial marks FAIL and queues again (resumed from its last epoch). With
`trials_per_gpu` K > 1 one worker runs K trials at once. Ctrl-C or SIGTERM ends every
running trial process, records it as FAIL ("interrupted") and exits. Before its first
trial and after every trial a worker reads the study's stop request and budget from
the storage (`budget`); either ends the loop once the running trials finish.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError
from mtbert.runtime import device_label
from mtbert.studies.budget import check_budget, set_budget, stop_reason
from mtbert.studies.constraints import (constraints_func, describe_all, resolve_constraints,
                                        store_constraints, study_constraints)
from mtbert.studies.job import (RESEED_OF, RUNS_FOLDER, SEED, STUDY_OBJECTIVES, STUDY_SIZE,
                                STUDY_SPEC, STUDY_SPEC_NAME, STUDY_UID, WORKERS_STARTED,
                                trial_dir)
from mtbert.studies.flat import check_flat, check_flat_stop, set_flat_rule
from mtbert.studies.options import SweepOptions
from mtbert.studies.outage import Outage
from mtbert.studies.folders import identify
from mtbert.studies.process import TrialRunner
from mtbert.studies.progress import SweepDisplay
from mtbert.studies.grid import grid_values
from mtbert.studies.racing import mean_sampler
from mtbert.studies.configurations import SeedGroup, reseed_seeds, seed_groups
from mtbert.studies.results import (complete_trials, describe_trial, feasible_trials,
                                    new_finished, ranked)
from mtbert.studies.retention import prune_checkpoints
from mtbert.studies.samplers import make_pruner, make_sampler, worker_seed
from mtbert.studies.sizes import NO_STUDY, NoStudy, SizeChoice, check_sizes, choose_size
from mtbert.studies.spec import SweepSpec, load_spec, read_spec, stored_spec, trial_config
from mtbert.studies.storage import (check_study_name, enqueue_once, mask_url, select_study,
                                    setup_lock, storage_errors, with_driver)
from mtbert.studies.warmstart import warm_start
from mtbert.studies.worker import NextTrial, Worker
log = logging.getLogger("mtbert")


def study_sampler(spec: SweepSpec, constraints: list | None = None, worker: int = 0):
    """The spec's sampler (told the study's constraints); in a raced study it learns from
    configurations' means. The study's `worker`-th worker (from 0) draws with the spec's
    sampler seed + `worker` (`worker_seed`)."""
    options = spec.sampler
    if worker_seed(options, worker) is not None:
        options = {**options, "seed": worker_seed(options, worker)}
    sampler = make_sampler(options, constraints_func(constraints) if constraints else None,
                           grid=grid_values(spec.space))
    return mean_sampler(sampler) if spec.seeds > 1 else sampler


def join_study(study, url: str, out: Path) -> int:
    """This worker's number among every worker that ran the study so far (0: the first),
    counted in the study (`workers_started`) under the setup lock.

    Workers whose samplers share one seed draw the same random configurations: the
    first trials of every worker (TPE's and GP's random start, `random` throughout) would
    be one configuration run once per worker, and a sweep run again would repeat the
    first run's. Worker k draws with seed + k instead; a study run by one worker once
    draws as before."""
    with setup_lock(url, f"joining study {study.study_name}"):
        worker = study.user_attrs.get(WORKERS_STARTED, 0)
        study.set_user_attr(WORKERS_STARTED, worker + 1)
        if STUDY_UID not in study.user_attrs:
            identify(study, out)
    return worker


def create_study(spec: SweepSpec, options: SweepOptions):
    """Create the sweep's study, or load it to add trials; returns it and its number of
    trials before this sweep and the numbers of those that had finished (whatever is
    queued, by the spec's enqueue or as a retry, is this sweep's to run)."""
    import optuna

    name = check_study_name(options.study or spec.name)
    constraints = resolve_constraints(spec.constraints, options.baseline, spec.base_values)
    storage = options.open_storage()
    directions = spec.directions
    try:
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                    sampler=study_sampler(spec, constraints),
                                    pruner=make_pruner(spec.pruner), directions=directions)
    except ValueError as err:  # e.g. the existing study has other directions
        raise ConfigError(f"study '{name}': {err}") from None
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"study '{name}' exists with other directions; use --study NEW_NAME")
    trials = study.get_trials(deepcopy=False)
    before = (len(trials), {t.number for t in trials if t.state.is_finished()})
    if STUDY_SPEC_NAME not in study.user_attrs:
        study.set_user_attr(STUDY_SPEC_NAME, spec.name)
        study.set_user_attr(STUDY_OBJECTIVES, spec.objectives)
    stored = study.user_attrs.get(STUDY_SPEC)
    if stored is None:
        study.set_user_attr(STUDY_SPEC, spec.to_dict())
        if spec.size is not None:
            study.set_user_attr(STUDY_SIZE, spec.size)
    elif spec.size is not None and study.user_attrs.get(STUDY_SIZE, spec.size) != spec.size:
        # Two workers that chose their sizes before either made the study. (A spec without
        # sizes, such as one printed at the study's size, runs as written, as --set does.)
        raise ConfigError(f"study '{name}' was made with size {study.user_attrs[STUDY_SIZE]}, "
                          f"this sweep runs {spec.size}; pass --size "
                          f"{study.user_attrs[STUDY_SIZE]}, or use --study NEW_NAME")
    elif stored.get("seeds", 1) != spec.seeds:
        raise ConfigError(f"study '{name}' races each configuration over "
                          f"{stored.get('seeds', 1)} seed(s), this sweep over {spec.seeds}; "
                          f"pass --seeds {stored.get('seeds', 1)}, or use --study NEW_NAME")
    store_constraints(study, constraints)
    if constraints:
        log.info("constraints: %s", describe_all(constraints))
    if options.warm_start:  # the earlier study's best run first, before the spec's enqueue
        warm_start(study, spec, source=options.warm_start,
                   url=options.warm_storage or options.url, top=options.warm_top,
                   own_url=options.url)
    for params in spec.enqueue:  # known configurations run first, and once per study
        enqueue_once(study, options.url, params)
    worker = join_study(study, options.url, options.out)
    if worker_seed(spec.sampler, worker) is not None:
        study.sampler = study_sampler(spec, constraints, worker)
        log.info("worker %d of study %s: sampler seed %d (the spec's + %d, so that workers "
                 "draw different configurations)", worker, name,
                 worker_seed(spec.sampler, worker), worker)
    return study, before


def stored_size(options: SweepOptions, name: str) -> str | None | NoStudy:
    """The size stored in study `name` of the sweep's storage; None: the study has none;
    NO_STUDY: there is no such study yet (a SQLite file that does not exist is not made)."""
    url = options.url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return NO_STUDY
    with storage_errors(url):
        storage = options.open_storage()
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            return NO_STUDY
        return storage.get_study_user_attrs(study_id).get(STUDY_SIZE)


def sized_spec(spec: str, overrides: list[str], requested: str, *, on_cuda,
               options: SweepOptions | None = None) -> tuple[SweepSpec, SizeChoice]:
    """`spec` (a shipped name or a path) at its size for `--size requested`, `overrides`
    (`--set`) on its base, and the size chosen. The size is the one stored in the study
    that `options` join, where it exists (asked once the spec is checked, so that a bad
    spec touches no storage), else `requested` (`auto`: by `on_cuda()`, whether the trials
    train on CUDA). Without `options` (`--print`, `--check`) there is no study to ask."""
    raw, _, where = read_spec(spec)
    sizes = list(check_sizes(raw.get("sizes"), lambda message: ConfigError(f"{where}: "
                                                                           f"{message}")))
    choose = functools.partial(choose_size, requested, sizes, where=where, on_cuda=on_cuda)
    chosen = choose()
    resolved = load_spec(spec, overrides, size=chosen.name)
    if options is not None and sizes:  # a spec without sizes has one base: nothing to ask
        name = check_study_name(options.study or resolved.name)
        joined = choose(study=name, stored=stored_size(options, name))
        if joined.name != chosen.name:
            resolved = load_spec(spec, overrides, size=joined.name)
        chosen = joined
    return resolved, chosen


@dataclass
class SweepRun:
    """What `run_sweep` did: the study, which trials had finished before, and why it started
    no more trials than it did (a stop asked for, the budget spent; None: it ran them)."""

    study: Any
    before: set[int]  # the numbers of the trials that had finished before
    stopped: str | None = None
    ran: bool = True  # False: stopped before its first trial

    @property
    def failed(self) -> bool:
        """It ran trials and none of them finished (COMPLETE or PRUNED)."""
        return self.ran and not new_finished(self.study, self.before)


def run_sweep(spec: SweepSpec, options: SweepOptions, *,
              size: SizeChoice | None = None) -> SweepRun:
    """Create or resume the study, store `options.budget_hours` in it, and run
    `options.trials` more trials (or until the timeout, a stop or the budget); `size`, the
    spec's size and why (`sized_spec`), is said as the trials start."""
    import optuna

    if options.budget_hours is not None:
        check_budget(options.budget_hours)
    check_flat(options.stop_after_flat, options.min_delta)
    if options.stop_after_flat is not None and spec.multi_objective:
        raise ConfigError("--stop-after-flat compares one objective; this spec has "
                          f"{len(spec.objectives)}")
    # mtbert prints one line per trial itself; Optuna's would add tracebacks of failures.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    options.out.mkdir(parents=True, exist_ok=True)
    with storage_errors(options.url):
        study, (count, before) = create_study(spec, options)
        if options.budget_hours is not None:
            set_budget(study, options.budget_hours)
        if options.stop_after_flat is not None:
            set_flat_rule(study, options.stop_after_flat, options.min_delta)
        optuna.storages.fail_stale_trials(study)
        stopped = stop_reason(study)
    if stopped:
        return SweepRun(study, before, stopped, ran=False)
    if size is not None:
        log.info("%s", size.line(spec.name))
    log.info("study %s in %s: %d trials so far; running %s", study.study_name,
             mask_url(options.url), count,
             f"{options.trials} more" if options.trials is not None else
             "until the timeout" if options.timeout is not None else "until the grid is done")
    if spec.seeds > 1 and options.trials is not None:
        stopped = race_configurations(study, spec, options)
    else:
        stopped = optimize(study, spec, options, n_trials=options.trials,
                           timeout=options.timeout)
    with storage_errors(options.url):
        constraints = study_constraints(study)
        done = complete_trials(study) if constraints else []
        feasible = feasible_trials(study, constraints) if done else []
    if done and not feasible:  # the sweep ran; `mtbert best` has nothing to rank
        log.warning("none of the %d complete trials of study %s meets its constraints (%s)",
                    len(done), study.study_name, describe_all(constraints))
    return SweepRun(study, before, stopped)


def race_configurations(study, spec: SweepSpec, options: SweepOptions) -> str | None:
    """A raced study: start `options.trials` new configurations and run the seed runs the
    race queues (theirs and any other queued trial of the study) until none is left.
    Queued trials run first, so this worker never starts more configurations than
    asked (`NextTrial.configurations`)."""
    return optimize(study, spec, options, n_trials=None, timeout=options.timeout,
                    next_trial=NextTrial(configurations=options.trials))


def optimize(study, spec: SweepSpec, options: SweepOptions, *, n_trials: int | None,
             timeout: float | None, next_trial: NextTrial | None = None) -> str | None:
    """Run trials of `study` in this worker: each in its own process, with the checkpoint
    pruning after each and Ctrl-C / SIGTERM ending the running trials. Returns why it
    started no more (a stop asked for, the budget spent: checked before the first trial
    and after every trial, running trials finish), or None."""
    with storage_errors(options.url):
        stopped = stop_reason(study)
    if stopped:
        return stopped
    from mtbert.tracking import online_or_offline

    options.wandb_mode = online_or_offline(options.wandb_mode)
    runner = TrialRunner(spec, options, study.study_name,
                         folder=study.user_attrs.get(RUNS_FOLDER, study.study_name),
                         uid=study.user_attrs.get(STUDY_UID))
    prune_lock = threading.Lock()
    display = SweepDisplay(mode=SweepDisplay.choose(options.progress),
                           objectives=spec.objectives, asked=n_trials,
                           device=device_label(options.device))

    def on_trial_end(study, trial) -> str | None:
        log.info("%s", describe_trial(trial, spec.objectives))
        with prune_lock:  # several trial threads with trials_per_gpu > 1
            removed = prune_checkpoints(study, keep_top=options.keep_top,
                                        multi_objective=spec.multi_objective)
            check_flat_stop(study)  # stores a stop when the study went flat
            reason = stop_reason(study)
        if removed:
            log.info("removed %d checkpoints outside the top %d", removed, options.keep_top)
        display.ended(study)
        return reason  # this worker's other running trials finish; none starts

    worker = Worker(study, options.open_storage(), objective=Shown(runner, display),
                    slots=runner.slots.total, next_trial=next_trial or NextTrial(),
                    on_trial_end=on_trial_end, grace=options.grace,
                    outage=Outage(options.url, options.storage_outage))
    with storage_errors(options.url), display.shown(study):
        stopped = worker.optimize(n_trials=n_trials, timeout=timeout, on_signal=runner.stop)
    if runner.stopping:
        raise KeyboardInterrupt
    return stopped


class Shown:
    """The trial runner, each trial on the sweep's display while it runs; the worker's
    other calls (a lost heartbeat, a trial told) go to the runner itself."""

    def __init__(self, runner: TrialRunner, display: SweepDisplay):
        self.runner, self.display = runner, display

    def __call__(self, trial):
        self.display.started(trial.study)
        with self.display.running(trial.number, trial_dir(self.runner.folder, trial.number)):
            return self.runner(trial)

    def __getattr__(self, name: str):
        return getattr(self.runner, name)


def reseed(study, spec: SweepSpec, options: SweepOptions, *, top: int, seeds: int,
           metric: str | None = None) -> list[SeedGroup]:
    """Re-run the `top` best original COMPLETE trials with `seeds` new seeds each, as new
    trials of the study (user attributes `reseed_of`, `seed`); returns their groups.

    A seed that completed, or is queued or running (here or in another worker), is not
    run again; a failed or interrupted one is queued anew. Any worker of the study runs
    queued reseeds exactly like this one (the objective reads the attributes).
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if spec.multi_objective and metric is None:
        raise ConfigError("a multi-objective study has no single ranking; reseed by one "
                          "metric with --metric")
    if spec.seeds > 1:  # a raced study: its best configurations by mean, none raced out
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        originals = [by_number[g.number] for g in seed_groups(study, metric)
                     if not g.raced_out][:top]
    else:
        originals = [t for t in ranked(study, metric) if RESEED_OF not in t.user_attrs][:top]
    if not originals:
        raise ConfigError(f"study {study.study_name} has no COMPLETE trial to reseed")
    # A reseed whose worker died is RUNNING until its heartbeat is stale: fail it (and
    # queue its retry) first, so that it does not count as running elsewhere.
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    queued = 0
    for original in originals:
        base_seed = trial_config(spec, original.params).train.seed
        for seed in reseed_seeds(base_seed, seeds, spec.seeds):
            states = {t.state for t in trials if t.user_attrs.get(RESEED_OF) == original.number
                      and t.user_attrs.get(SEED) == seed}
            if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
                continue
            study.enqueue_trial(original.params, user_attrs={RESEED_OF: original.number,
                                                             SEED: seed})
            queued += 1
    chosen = {t.number for t in originals}
    log.info("reseeding trials %s with %d seeds each: %d runs queued",
             ", ".join(map(str, sorted(chosen))), seeds, queued)

    # Queued trials only, oldest first: trials queued earlier by others run too (they
    # belong to the study), then these; nothing new is drawn.
    stopped = optimize(study, spec, options, n_trials=None, timeout=None,
                       next_trial=NextTrial(sample=False))
    if stopped:  # the queued reseeds stay queued for a later worker
        log.warning("%s", stopped)
    return [g for g in seed_groups(study, metric, feasible_only=False) if g.number in chosen]


def reseed_study(options: SweepOptions, *, top: int, seeds: int, metric: str | None,
                 overrides: list[str]) -> tuple[str, str, list[SeedGroup]]:
    """`mtbert best --reseed`: the study of `options`, swept with its stored spec (and
    `overrides` on its base), its `top` trials reseeded; returns its name, what the
    groups are ranked by, and the groups."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = options.open_storage(must_exist=True)
    with storage_errors(options.url):
        name = select_study(rdb, options.study)
        stored = optuna.load_study(study_name=name, storage=rdb)
        spec, constraints = stored_spec(stored, overrides), study_constraints(stored)
        study = optuna.load_study(study_name=name, storage=rdb,
                                  sampler=study_sampler(spec, constraints),
                                  pruner=make_pruner(spec.pruner))
        groups = reseed(study, spec, options, top=top, seeds=seeds, metric=metric)
    for g in groups:
        if len(g.trials) < seeds + spec.seeds:
            log.warning("trial %d: %d of %d seeds complete%s; run the command again to retry "
                        "the others", g.number, len(g.trials), seeds + spec.seeds,
                        f" ({g.pending} queued or running)" if g.pending else "")
    return name, metric or spec.objectives[0], groups


def interrupted_table(options: SweepOptions, spec_name: str) -> list[str]:
    """The table of an interrupted sweep's study, as far as it got (empty when there is
    none to show: the interruption is what gets reported)."""
    import optuna
    import sqlalchemy.exc

    from mtbert.studies.results import trials_table

    try:
        study = optuna.load_study(study_name=options.study or spec_name,
                                  storage=with_driver(options.url))
    except (KeyError, ValueError, sqlalchemy.exc.SQLAlchemyError) as err:
        log.debug("no table of the interrupted study: %s", mask_url(str(err)))
        return []
    return trials_table(study) if complete_trials(study) else []
