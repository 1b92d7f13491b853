"""Optuna studies over multitask strategies, one concept per module.

- `spec`: a sweep spec (YAML): base run config, search space, objectives, sampler,
  pruner; checked against the config schema before any trial runs.
- `samplers`: Optuna samplers and pruners by the names a spec gives them (no torch, so
  that a trial process builds its pruner without the training stack).
- `storage`: the study storage (SQLite or PostgreSQL URL, driver, credentials masked,
  safe study names) and opening the study a command names.
- `job`: the contract between a worker and its trial processes (`TrialJob`,
  `TrialResult`) and the attribute names both write into the study.
- `runner`: the worker: trial processes, retries that resume, signals, reseeding.
- `racing`: racing configurations over seeds (`--seeds`): one trial per seed run,
  the pooled-variance test, the sampler's view of configurations by their mean.
- `flat`: the noise-aware stop (`--stop-after-flat`), stored in the study.
- `slots`: which GPU each running trial gets (`--gpus`, `--trials-per-gpu`).
- `trial`: the trial process's entry point (`python -m mtbert.studies.trial RUN_DIR`).
- `retention`: which checkpoints a study keeps, and what deleting a study may remove.
- `budget`: what a study costs (`hours`: wall time × device share over its trials),
  its budget and a stop asked for, which every worker reads from the storage.
- `constraints`: a spec's bounds on metrics (`"sst/acc >= baseline - 0.01"`), resolved
  against a `mtbert compare` baseline, stored in the study, judged per trial.
- `warmstart`: an earlier study's best configurations queued as a sweep's first trials.
- `results`: ranking (feasible results only), configurations over seeds, and the choice
  of `mtbert best`.
- `export`: a chosen trial's model as a self-contained model directory.
- `report`: figures and an offline HTML report of a study, and its W&B run.

Dependencies point one way: runner -> flat, warmstart and retention -> results ->
racing, constraints, budget and job (report uses results and budget too; the trial
process uses racing); every module may use storage and spec (which uses constraints);
nothing here is imported by the training stack.
"""
