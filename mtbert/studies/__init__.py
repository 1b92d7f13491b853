"""Optuna studies over multitask strategies, one concept per module.

- `spec`: a sweep spec (YAML): base run config, search space, objectives, sampler,
  pruner; checked against the config schema before any trial runs.
- `sizes`: a spec's sizes (`sizes:`, named overrides of its base; the shipped specs'
  `cpu` and `gpu`, the research protocol) and which one a sweep runs (`--size`,
  `auto` by the trials' device; a study keeps the size it was made with).
- `conditions`: a space entry's `when:` (a value, a list of values, alternatives).
- `inert`: `mtbert sweep SPEC --check`: the searched settings that cannot change the
  model in some reachable combination, and two names of one model.
- `enqueue`: known configurations queued first (a spec's `enqueue:`, `--enqueue`, a
  warm start), checked against the space.
- `samplers`: Optuna samplers and pruners by the names a spec gives them (no torch, so
  that a trial process builds its pruner without the training stack).
- `storage`: the study storage (SQLite or PostgreSQL URL, driver, credentials masked,
  safe study names) and opening the study a command names.
- `outage`: riding out a storage that goes away (retries with a limit, said on stderr)
  and the bounds on every connection (connect and statement timeouts, keepalives).
- `folders`: a study's identity and runs folder; a run directory is never written over.
- `optuna_api`: the few reaches past Optuna's public API, each with why.
- `job`: the contract between a worker and its trial processes (`TrialJob`,
  `TrialProgress`, `TrialResult`) and the attribute names both write into the study.
- `options`: a worker's options (`SweepOptions`), every default declared once.
- `runner`: creating or joining a study, a sweep, `best --reseed`.
- `worker`: the worker loop (Optuna's three levels on its public API) and the one
  policy for the next trial (`NextTrial`: queued first; racing, reseeds).
- `process`: a trial's process: its run directory, a retry's takeover, its result.
- `configurations`: a configuration and its seed runs (`config_of`, `SeedGroup`,
  `seed_groups`): the one home of the concept.
- `racing`: racing configurations over seeds (`--seeds`): the pooled-variance test,
  the sampler's view of configurations by their mean.
- `flat`: the noise-aware stop (`--stop-after-flat`), stored in the study.
- `slots`: which GPU each running trial gets (`--gpus`, `--trials-per-gpu`).
- `trial`: the trial process's entry point (`python -m mtbert.studies.trial RUN_DIR`)
  and its progress file (`ProgressReport`).
- `progress`: what a worker shows while its trials run (`SweepDisplay`): each running
  trial from its progress file, and the study line; a block redrawn in a terminal,
  plain lines elsewhere.
- `retention`: which checkpoints a study keeps, and what deleting a study may remove.
- `budget`: what a study costs (`hours`: wall time × device share over its trials),
  its budget and a stop asked for, which every worker reads from the storage.
- `constraints`: a spec's bounds on metrics (`"sst/acc >= baseline - 0.01"`), resolved
  against a `mtbert compare` baseline, stored in the study, judged per trial.
- `warmstart`: an earlier study's best configurations queued as a sweep's first trials.
- `results`: ranking (feasible results only) and the choice of `mtbert best`.
- `listing`: `mtbert studies`, one summary per study.
- `export`: a chosen trial's model as a self-contained model directory.
- `report` and `figures`: an offline HTML report of a study, its figures, its W&B run.

Dependencies point one way: runner -> worker, process, progress, flat, warmstart and
retention -> results -> configurations, racing, constraints, budget and job (report and listing
use results and budget too; the trial process uses racing); every module may use
storage, samplers, enqueue, conditions, sizes and spec (which uses constraints and
sizes); inert uses spec and reads the schedule and loss-method registries; optuna_api
is used by the worker, process and racing; nothing here is imported by the training
stack.
"""
