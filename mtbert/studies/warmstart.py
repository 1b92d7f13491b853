"""Warm starts: an earlier study's best configurations as the first trials of a new one.

`mtbert sweep SPEC --warm-start STUDY [--warm-storage URL] [--warm-top K]` queues the K
best COMPLETE, feasible configurations of STUDY (what won on minilm-l6 is a good first
guess for bert-base) before the spec's own `enqueue:`, so that the sampler starts from
them instead of from random draws. "Best" is what `mtbert best` ranks: configurations by
their mean over seeds, infeasible ones (the earlier study's constraints) left out.

Each configuration is checked against the new space as an `enqueue:` item is
(`enqueue.check_configuration`): a parameter the new space lacks is dropped, with a note
(the new spec's base or its sampler sets it); a configuration whose values do not fit
(outside a range, not a choice, a condition that fails) is skipped and named. Values
are queued in the new parameter's type and with Optuna's `skip_if_exists`, which finds
a configuration the study holds (queued, running or finished): running the command
again queues nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mtbert.errors import ConfigError
from mtbert.formatting import format_params
from mtbert.studies.configurations import seed_groups
from mtbert.studies.enqueue import check_configuration
from mtbert.studies.options import WARM_TOP
from mtbert.studies.spec import SweepSpec
from mtbert.studies.storage import (enqueue_once, open_storage, select_study,
                                    storage_errors)

log = logging.getLogger("mtbert")



@dataclass
class WarmStart:
    """What a warm start did, by the earlier study's trial numbers."""

    source: str
    queued: list[int] = field(default_factory=list)
    present: list[int] = field(default_factory=list)  # the study holds them already
    skipped: dict[int, str] = field(default_factory=dict)  # why each did not fit
    dropped: dict[int, list[str]] = field(default_factory=dict)  # keys outside the space


def best_configurations(source, top: int) -> list[tuple[int, dict]]:
    """The `top` best distinct feasible configurations of `source` as (trial number,
    params), by their mean over seeds of its (first) objective."""
    configurations: list[tuple[int, dict]] = []
    for group in seed_groups(source):
        if group.params not in [params for _, params in configurations]:
            configurations.append((group.number, dict(group.params)))
        if len(configurations) == top:
            break
    return configurations


def warm_start(study, spec: SweepSpec, *, source: str, url: str, top: int = WARM_TOP,
               own_url: str | None = None) -> WarmStart:
    """Queue the `top` best configurations of study `source` (in the storage at `url`)
    that fit `spec`'s space as trials of `study` (whose storage is at `own_url`)."""
    import optuna

    if top < 1:
        raise ConfigError(f"--warm-top must be at least 1, got {top}")
    if source == study.study_name and url == own_url:
        raise ConfigError(f"--warm-start {source} is the sweep's own study; name an earlier "
                          "one (in another storage: --warm-storage URL)")
    rdb = open_storage(url, must_exist=True)
    with storage_errors(url):
        name = select_study(rdb, source)
        configurations = best_configurations(optuna.load_study(study_name=name, storage=rdb),
                                             top)
    done = WarmStart(name)
    if not configurations:
        log.warning("warm start: study %s has no COMPLETE feasible trial; nothing queued",
                    name)
        return done

    def fail(message: str) -> ConfigError:
        return ConfigError(message)

    for number, params in configurations:
        outside = sorted(k for k in params if k not in spec.space)
        if outside:
            done.dropped[number] = outside
            log.info("warm start: trial %d of study %s: %s dropped, not in the space of %s",
                     number, name, ", ".join(outside), spec.name)
        kept = {k: v for k, v in params.items() if k in spec.space}
        try:
            if not kept:
                raise ConfigError("none of its parameters is in the space")
            checked = check_configuration(kept, spec.space, spec.base_values, fail)
        except ConfigError as err:
            done.skipped[number] = str(err)
            log.warning("warm start: trial %d of study %s skipped, it does not fit the space "
                        "of %s: %s", number, name, spec.name, err)
            continue
        queued = enqueue_once(study, own_url or url, checked)
        (done.queued if queued else done.present).append(number)
        log.info("warm start: trial %d of study %s %s  [%s]", number, name,
                 "queued" if queued else "already in the study", format_params(checked))
    log.info("warm start from study %s: %d of its %d best configurations queued, %d in the "
             "study already, %d skipped", name, len(done.queued), len(configurations),
             len(done.present), len(done.skipped))
    return done
