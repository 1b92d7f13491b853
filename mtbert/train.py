"""The one training loop: every schedule and loss method plugs into it.

`train` reads as a torchtune recipe, setup -> resume -> epochs -> summary:

- `setup` builds a run's parts (data, model, loss combiner, task samplers and
  schedule, optimizer, LR schedule) into a `TrainingSetup`, in a fixed order
  from `train.seed`;
- `start_or_resume` restores a killed run's resume.pt into them and returns
  the `LoopState` to continue from (a fresh one for a new run);
- an epoch is optimizer steps of one or more batches chosen by the task
  schedule, each task's loss from `MultitaskModel.task_loss`; then
  `evaluate_and_checkpoint` scores dev, appends to metrics.jsonl, saves the
  best model directory by `train.select_metric` and the epoch's resume state;
- `write_summary` writes summary.json.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mtbert.balancing import LossCombiner, make_loss_combiner, task_gradients
from mtbert.config import RunConfig, cache_dir, data_dir, save_config
from mtbert.contrastive import ContrastiveLoss, make_contrastive
from mtbert.data import (Batch, EncodedSet, TaskSampler, make_task_sampler, read_examples,
                         sample_indices, tokenize_cached)
from mtbert.encoder import load_pretrained
from mtbert.errors import ConfigError, DataError, ResumeStateError, TrainingError
from mtbert.evaluate import evaluate
from mtbert.fastpath import configure_packing
from mtbert.heads import MultitaskModel, TaskLoss
from mtbert.modeldir import save_model_dir
from mtbert.optim import apply_freezing, linear_schedule, make_optimizer
from mtbert.rundir import (GRAD_CONFLICT_FILE, METRICS_FILE, RESUME_FILE, RUN_FILES,
                           append_metrics, atomic_write_jsonl, save_summary)
from mtbert.runtime import atomic_torch_save, environment, resolve_device, run_dir_lock
from mtbert.schedules import Schedule, epoch_batches, make_schedule, optimizer_steps, step_size
from mtbert.tasks import get_task
from mtbert.tokenize import Tokenizer

log = logging.getLogger("mtbert")

EvalCallback = Callable[[int, int, dict[str, float]], None]
# on_step(epoch=, epochs=, step=, steps=, loss=) where each epoch starts and after every
# optimizer step: the epoch being trained (0-based) of `epochs`, the optimizer steps
# taken of `steps` (all epochs), and the training loss where the loop reads it anyway
# (every train.log_every steps; else None), so that showing progress adds no host-device
# sync. A sweep trial rewrites its progress file from it (studies.trial).
StepCallback = Callable[..., None]



@dataclass
class TaskData:
    train: dict[str, EncodedSet]
    dev: dict[str, EncodedSet]
    provenance: dict[str, dict]


def load_task_data(config: RunConfig, tokenizer: Tokenizer) -> TaskData:
    """Train and dev sets of every task: read, capped by seeded samples, tokenized once."""
    root, cache = data_dir(config), cache_dir(config)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; run `mtbert data download "
                        f"--data-dir {root}` or pass --data-dir")
    splits = {"train": config.data.max_train_examples, "dev": config.data.max_eval_examples}
    sets: dict[str, dict[str, EncodedSet]] = {"train": {}, "dev": {}}
    provenance = {}
    siamese = config.model.pair_encoding == "siamese"
    for name in config.data.tasks:
        task = get_task(name, score_head=config.model.sts_head)
        for split, cap in splits.items():
            examples = read_examples(root / config.data.files[name][split], task)
            keep = sample_indices(len(examples.ids), cap, seed=config.train.seed,
                                  key=f"{name}/{split}")
            columns = tokenize_cached(examples, tokenizer, cache)
            sets[split][name] = EncodedSet(examples, columns, tokenizer, indices=keep,
                                           max_length=config.model.max_length, siamese=siamese)
            provenance[f"{name}/{split}"] = {**examples.stats.to_json(), "used": len(keep)}
            if len(keep) == 0:
                raise DataError(f"{examples.stats.file} has no valid rows for {name}/{split}")
    return TaskData(sets["train"], sets["dev"], provenance)


@dataclass
class TrainingSetup:
    """Everything a run trains with, built once by `setup`."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    tokenizer: Tokenizer
    data: TaskData
    model: MultitaskModel
    combiner: LossCombiner
    samplers: dict[str, TaskSampler]
    schedule: Schedule
    per_step: int  # batches per optimizer step
    total_steps: int  # optimizer steps of all epochs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    probes: dict[str, Batch]  # gradient-conflict probe batches; empty when not logged
    auxiliary: dict[str, ContrastiveLoss]  # task -> its auxiliary loss (loss.contrastive_tasks)
    env: dict[str, str | None]  # versions and hardware, for summary.json and the model card


@dataclass
class LoopState:
    """Where the loop stands after an epoch; resume.pt holds it as plain values."""

    epoch: int = -1  # the last finished epoch, 0-based
    step: int = 0  # optimizer steps taken
    best: dict | None = None  # {"step", "epoch", "metrics"} of the best evaluation so far
    history: list[dict] = field(default_factory=list)  # metrics.jsonl's records
    bad_evals: int = 0  # evaluations since the best one
    train_time: float = 0.0  # seconds spent in training epochs, across resumes
    train_examples: int = 0
    finished: bool = False  # stopped early by train.patience
    grad_cos: list[dict] = field(default_factory=list)  # grad_conflict.jsonl's records

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: object) -> LoopState:
        """The state `to_dict` gave; a ValueError names the keys missing or unknown."""
        if not isinstance(saved, dict):
            raise ValueError(f"its loop state is a {type(saved).__name__}, not a dict")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in saved]
        unknown = [str(k) for k in saved if k not in names]
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + \
            ([f"has unknown keys {', '.join(unknown)}"] if unknown else [])
        if problems:
            raise ValueError(f"its loop state {' and '.join(problems)}")
        return cls(**saved)




def train(config: RunConfig, *, run_dir: Path, device: str = "auto", resume: bool = False,
          progress: bool = True, on_eval: EvalCallback | None = None,
          on_step: StepCallback | None = None, existing: str = "reuse") -> dict:
    """Train one multitask run into `run_dir`; returns summary.json's content.

    `on_eval(epoch, step, metrics)` is called after every evaluation with the
    metric keys and `train/loss` (a sweep reports to Optuna there and may raise
    to prune); `on_step` after every optimizer step (`StepCallback`). With `resume`,
    training continues from the last finished epoch
    saved in `run_dir`. A run directory that already holds a run is reused (a
    sweep or comparison manages its own), refused (`existing="refuse"`, what
    `mtbert train --out` does) or cleared first (`"replace"`). One process at a
    time trains in a directory.
    """
    with run_dir_lock(run_dir):
        if not resume:
            claim_run_dir(Path(run_dir), existing)
        try:
            return _train(config, run_dir=Path(run_dir), device=device, resume=resume,
                          progress=progress, on_eval=on_eval, on_step=on_step)
        except torch.cuda.OutOfMemoryError:
            # Anywhere: moving the model, building the optimizer, a step, an evaluation.
            raise TrainingError("out of GPU memory; lower train.batch_size or "
                                "model.max_length (or run fewer trials per GPU)") from None


def claim_run_dir(run_dir: Path, existing: str) -> None:
    """Refuse or clear a directory that holds another run's files (see `train`)."""
    if existing not in ("reuse", "refuse", "replace"):
        raise ValueError(f"existing={existing!r}; valid: reuse, refuse, replace")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found or existing == "reuse":
        return
    if existing == "refuse":
        raise ConfigError(f"{run_dir} holds a run already ({', '.join(found)}); continue it "
                          f"with --resume {run_dir}, replace it with --overwrite, or pick "
                          "another --out")
    for name in found:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def _train(config: RunConfig, *, run_dir: Path, device: str, resume: bool, progress: bool,
           on_eval: EvalCallback | None, on_step: StepCallback | None) -> dict:
    started = time.perf_counter()
    s = setup(config, Path(run_dir), resolve_device(device))
    state = start_or_resume(s, resume=resume)
    t = config.train
    log.info("training %s on %s: %s, %s, %d optimizer steps in %d epochs",
             ", ".join(config.data.tasks), s.device, t.schedule, config.loss.method,
             s.total_steps, t.epochs)
    try:
        for epoch in range(state.epoch + 1, t.epochs):
            if state.finished:
                break
            tick = None if on_step is None else functools.partial(
                on_step, epoch=epoch, epochs=t.epochs, steps=s.total_steps)
            result = _run_epoch(s, state, epoch, progress=progress, on_step=tick)
            record = evaluate_and_checkpoint(s, state, epoch, result)
            if on_eval is not None:
                on_eval(epoch, state.step, {k: v for k, v in record.items()
                                            if k not in ("step", "epoch")})
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at step {state.step}; lower "
                            "train.batch_size or model.max_length (or run fewer trials per "
                            "GPU)") from None
    return write_summary(s, state, wall_time=time.perf_counter() - started)


def setup(config: RunConfig, run_dir: Path, device: torch.device) -> TrainingSetup:
    """The run directory with config.yaml, and a run's parts on `device`.

    The parts are built in a fixed order after seeding with `train.seed`, so
    that a run and its resumed twin draw the same initial head weights.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.train.seed)
    encoder, encoder_dir = load_pretrained(config.model.encoder)
    tokenizer = Tokenizer(encoder_dir)
    data = load_task_data(config, tokenizer)
    tasks, t = config.data.tasks, config.train
    model = MultitaskModel(encoder, [data.train[n].task for n in tasks], config.model).to(device)
    combiner = make_loss_combiner(config.loss, tasks, seed=t.seed).to(device)
    configure_packing(model, [*data.train.values(), *data.dev.values()], t)
    samplers = {name: make_task_sampler(data.train[name], t.batch_size, seed=t.seed,
                                        bucket_by_length=t.bucket_by_length) for name in tasks}
    schedule = make_schedule(t, {n: samplers[n].batches_per_pass for n in tasks},
                             {n: len(data.train[n]) for n in tasks},
                             every_task_per_step=combiner.per_step)
    _warn_about_the_schedule(config, schedule, combiner, data)
    per_step = step_size(schedule, t.grad_accum)
    total_steps = sum(optimizer_steps(epoch_batches(schedule, e, t.steps_per_epoch, t.grad_accum),
                                      per_step) for e in range(t.epochs))
    apply_freezing(model, config.optim, 0)  # checks the layers named before anything runs
    optimizer = _make_optimizer(model, combiner, config, device)
    scheduler = linear_schedule(optimizer, warmup=config.optim.warmup, total_steps=total_steps)
    return TrainingSetup(
        config=config, run_dir=run_dir, device=device, tokenizer=tokenizer, data=data,
        model=model, combiner=combiner, samplers=samplers, schedule=schedule,
        per_step=per_step, total_steps=total_steps, optimizer=optimizer, scheduler=scheduler,
        probes=_probe_batches(data, t) if t.log_grad_conflict_every else {},
        auxiliary=_auxiliary_losses(config), env=environment(device))


def _warn_about_the_schedule(config: RunConfig, schedule: Schedule, combiner: LossCombiner,
                             data: TaskData) -> None:
    """Combinations that run but do not do what their names promise."""
    tasks, t = config.data.tasks, config.train
    sizes = {len(data.train[n]) for n in tasks}
    if schedule.by_size and len(tasks) > 1 and len(sizes) == 1:
        log.warning("every task has %d training examples (data.max_train_examples), so %s "
                    "samples them uniformly; lift the cap to sample by dataset size",
                    sizes.pop(), t.schedule)
    if combiner.per_step and schedule.batches_per_step == 1 and len(tasks) > 1:
        log.warning("loss.method %s compares the tasks of each step, but %s gives most steps "
                    "a single task; use train.schedule triple_batch or round_robin_batch, or "
                    "train.batches_per_step %d with a sampled schedule",
                    config.loss.method, t.schedule, len(tasks))
    clip = config.optim.max_grad_norm
    if combiner.scales_task_losses and step_size(schedule, t.grad_accum) == 1 \
            and clip > 0 and len(tasks) > 1:
        # A step's gradient is one task's, times its weight; clipping divides it by its
        # norm whenever that is above the clip, weight and all (train/clipped: how often).
        log.warning("loss.method %s weights each task's loss, but %s gives every optimizer "
                    "step a single task and optim.max_grad_norm %g clips its gradient back "
                    "to norm %g: a weight changes only steps whose gradient norm stays under "
                    "the clip (train/clipped: the share of steps clipped); use train.schedule "
                    "triple_batch, train.grad_accum %d (or train.batches_per_step %d with a "
                    "sampled schedule) or optim.max_grad_norm 0",
                    config.loss.method, t.schedule, clip, clip, len(tasks), len(tasks))


def _make_optimizer(model: MultitaskModel, combiner: LossCombiner, config: RunConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model, lr=config.train.lr, config=config.optim, device=device)
    loss_params = list(combiner.parameters())  # methods with learned weights
    if loss_params:
        optimizer.add_param_group({"params": loss_params, "lr": config.loss.weight_lr,
                                   "weight_decay": 0.0, "names": ["loss"]})
    return optimizer


def _auxiliary_losses(config: RunConfig) -> dict[str, ContrastiveLoss]:
    """The auxiliary contrastive loss of each task in loss.contrastive_tasks, in task order."""
    contrastive = make_contrastive(config.loss)
    if contrastive is None:
        return {}
    return {name: contrastive for name in config.data.tasks
            if name in config.loss.contrastive_tasks}


def _probe_batches(data: TaskData, t) -> dict[str, Batch]:
    """One fixed training batch per task for the gradient-conflict readings."""
    probes = {}
    for name, dataset in data.train.items():
        order = np.random.default_rng([t.seed, 0xC05]).permutation(len(dataset))
        probes[name] = dataset.batch(order[:t.batch_size])
    return probes


def start_or_resume(s: TrainingSetup, *, resume: bool) -> LoopState:
    """A fresh loop state, or with `resume` the one saved in the run directory, its model,
    optimizer, samplers and random states restored into `s`."""
    path = s.run_dir / RESUME_FILE
    state = LoopState()
    if resume and path.exists():
        state = _restore(s, read_resume_file(path))
        log.info("resuming %s after epoch %d of %d", s.run_dir, state.epoch + 1,
                 s.config.train.epochs)
    elif resume:
        log.warning("%s has no resume state yet; starting the run from the beginning", s.run_dir)
    # The killed run may have logged an evaluation after its last saved state.
    atomic_write_jsonl(s.run_dir / METRICS_FILE, state.history)
    return state


def save_resume_state(s: TrainingSetup, state: LoopState) -> None:
    """resume.pt: tensors and plain values only, so that `torch.load(weights_only=True)`
    reads it back."""
    payload = {"model": s.model.state_dict(), "combiner": s.combiner.state_dict(),
               "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
               "samplers": {n: sampler.state() for n, sampler in s.samplers.items()},
               "rng": torch.get_rng_state(),
               # Asked only once CUDA is in use: asking starts CUDA (seconds and GPU
               # memory), which a CPU run on a GPU machine need not pay.
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
               "state": state.to_dict()}
    atomic_torch_save(payload, s.run_dir / RESUME_FILE)


_PAYLOAD_KEYS = ("model", "combiner", "optimizer", "scheduler", "samplers", "rng", "state")


def read_resume_file(path: Path) -> dict:
    """The content of a resume.pt, read by the safe loader, its loop state a `LoopState`.

    Anything else (not a PyTorch file, truncated, holding objects other than
    tensors and plain values, other keys) is a one-line `ResumeStateError`.
    """
    def refused(reason: str) -> ResumeStateError:
        return ResumeStateError(f"{path}: not a resume state written by mtbert ({reason})")

    try:
        with warnings.catch_warnings():
            # The safe loader warns before it refuses a pickle of another protocol.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise refused("the safe loader refused it: it holds something other than tensors "
                      "and plain values, or is no PyTorch file") from None
    except (RuntimeError, EOFError, ValueError):
        raise refused("not a complete PyTorch file: truncated or damaged") from None
    if not isinstance(payload, dict):
        raise refused(f"it holds a {type(payload).__name__}, not a dict")
    missing = [k for k in _PAYLOAD_KEYS if k not in payload]
    if missing:
        raise refused(f"no {', '.join(missing)}")
    try:
        payload["state"] = LoopState.from_dict(payload["state"])
    except ValueError as err:
        raise refused(str(err)) from None
    return payload


def epochs_finished(run_dir: Path) -> int:
    """How many epochs the resume state in `run_dir` holds (0 without one), read without
    loading its tensors (memory-mapped), so that a sweep worker can tell cheaply."""
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        return 0
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(payload["state"]["epoch"]) + 1
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, TypeError,
            OSError):  # OSError: a truncated file that cannot be memory-mapped
        return 0


def _restore(s: TrainingSetup, saved: dict) -> LoopState:
    s.model.load_state_dict(saved["model"])
    s.combiner.load_state_dict(saved["combiner"])
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    for name, sampler_state in saved["samplers"].items():
        s.samplers[name].restore(sampler_state)
    torch.set_rng_state(saved["rng"])
    # Resume states written before the CUDA random states were saved have none.
    _restore_cuda_rng(saved.get("cuda_rng", []))
    return saved["state"]


def _restore_cuda_rng(states: list[torch.Tensor]) -> None:
    if not states:
        return
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(states) == devices:
        torch.cuda.set_rng_state_all(states)
    else:
        log.warning("the resume state holds the random states of %d CUDA devices, this "
                    "machine has %d: dropout on the GPU draws differently from the killed run",
                    len(states), devices)


def _run_epoch(s: TrainingSetup, state: LoopState, epoch: int, *, progress: bool,
               on_step: Callable[..., None] | None = None) -> EpochResult:
    """Epoch `epoch` (0-based) of training, counted into `state`."""
    config, t = s.config, s.config.train
    trainable = apply_freezing(s.model, config.optim, epoch)
    if config.optim.unfreeze_after and epoch == config.optim.unfreeze_after:
        log.info("epoch %d: unfreezing, %d trainable parameters", epoch + 1, trainable)
    plan = s.schedule.plan(epoch, t.steps_per_epoch * s.per_step or None)
    tic = time.perf_counter()
    result = _train_epoch(s, state, plan, desc=f"epoch {epoch + 1}/{t.epochs}",
                          progress=progress, on_step=on_step)
    result.seconds = time.perf_counter() - tic
    state.train_time += result.seconds
    state.train_examples += result.seen
    s.combiner.end_epoch(result.task_losses)
    if s.probes:
        atomic_write_jsonl(s.run_dir / GRAD_CONFLICT_FILE, state.grad_cos)
    return result


def evaluate_and_checkpoint(s: TrainingSetup, state: LoopState, epoch: int,
                            result: EpochResult) -> dict:
    """Dev metrics of the epoch just trained: the model directory if they are the best,
    the epoch's resume state, then its line in metrics.jsonl. Returns the record."""
    t = s.config.train
    tic = time.perf_counter()
    metrics = evaluate(s.model, s.data.dev, batch_size=t.eval_batch_size, device=s.device)
    record = {"step": state.step, "epoch": epoch + 1, **metrics,
              "train/loss": result.loss, **result.extra(s.combiner),
              "time/eval_s": round(time.perf_counter() - tic, 3)}
    state.history.append(record)
    # Checkpoint, then announce: the model and the resume state are on disk before the
    # epoch's metrics line and log line say it finished, so that a run killed in between
    # is resumed after this epoch, and never holds it twice (the resume rewrites
    # metrics.jsonl from the saved history).
    _keep_the_best(s, state, epoch, metrics)
    state.epoch = epoch
    save_resume_state(s, state)
    append_metrics(s.run_dir, record)
    log.info("epoch %d/%d: %s", epoch + 1, t.epochs,
             "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return record


def _keep_the_best(s: TrainingSetup, state: LoopState, epoch: int,
                   metrics: dict[str, float]) -> None:
    """Saves the model directory on a new best `train.select_metric`; counts toward
    `train.patience` otherwise."""
    select, patience = s.config.train.select_metric, s.config.train.patience
    if state.best is None or metrics[select] > state.best["metrics"][select]:
        state.best = {"step": state.step, "epoch": epoch + 1, "metrics": metrics}
        state.bad_evals = 0
        save_model_dir(s.run_dir / "model", model=s.model, config=s.config,
                       tokenizer=s.tokenizer, metrics=metrics,
                       card={"source": {"run": str(s.run_dir.resolve()),
                                        "epoch": epoch + 1, "step": state.step},
                             "data": s.data.provenance, "env": s.env})
    else:
        state.bad_evals += 1
    if patience and state.bad_evals >= patience:
        log.info("no improvement of %s for %d evaluations: stopping early", select, patience)
        state.finished = True


def write_summary(s: TrainingSetup, state: LoopState, *, wall_time: float) -> dict:
    """summary.json of the run (every epoch, across resumes); returns its content."""
    summary = {
        "selection_metric": s.config.train.select_metric,
        "best": state.best,
        "wall_time_s": round(wall_time, 2),
        "train_time_s": round(state.train_time, 2),
        "examples_per_s": round(state.train_examples / max(state.train_time, 1e-9), 2),
        "steps": state.step,
        "epochs_completed": state.epoch + 1,
        "stopped_early": state.finished,
        "env": s.env,
        "data": s.data.provenance,
    }
    save_summary(s.run_dir, summary)
    return summary


@dataclass
class EpochResult:
    loss: float  # mean combined training loss
    seen: int  # training examples
    task_losses: dict[str, float]  # mean loss of each task's batches, auxiliary loss included
    grad_cos: dict[str, float]  # mean of the epoch's gradient-conflict readings
    contrastive: dict[str, float]  # mean unweighted auxiliary loss of each task's batches
    clipped: float | None = None  # share of the epoch's steps whose gradient was clipped
    # Each task's share of the epoch's steps holding a batch of it that were clipped.
    task_clipped: dict[str, float] = field(default_factory=dict)
    task_seen: dict[str, int] = field(default_factory=dict)  # training examples per task
    seconds: float = 0.0  # wall seconds of the epoch's training

    def extra(self, combiner: LossCombiner) -> dict[str, float]:
        """Per-task losses, loss weights, the share of clipped steps (pooled and per task)
        and gradient cosines for metrics.jsonl and W&B."""
        out = {f"train/loss_{t}": v for t, v in self.task_losses.items()}
        out.update({f"train/contrastive_{t}": v for t, v in self.contrastive.items()})
        out.update({f"loss_weight/{t}": round(w, 6) for t, w in combiner.task_weights().items()})
        if self.clipped is not None:
            out["train/clipped"] = round(self.clipped, 6)
        out.update({f"train/clipped/{t}": round(v, 6) for t, v in self.task_clipped.items()})
        out.update({f"train/examples/{t}": n for t, n in self.task_seen.items()})
        out["time/train_s"] = round(self.seconds, 3)
        out.update(self.grad_cos)
        return out


class _EpochSums:
    """Each task's summed batch losses of an epoch, kept on the device so that they are
    read (a host-device sync) once, at the end."""

    def __init__(self, tasks: list[str], auxiliary: list[str], device: torch.device):
        self.task = {name: torch.zeros((), device=device) for name in tasks}
        self.auxiliary = {name: torch.zeros((), device=device) for name in auxiliary}
        self.batches = dict.fromkeys(tasks, 0)
        self.seen = 0  # training examples
        self.task_seen = dict.fromkeys(tasks, 0)
        self.clipped = torch.zeros((), device=device)  # steps whose gradient was clipped
        self.steps = 0
        # The same per task, over the steps that held a batch of it.
        self.task_clipped = {name: torch.zeros((), device=device) for name in tasks}
        self.task_steps = dict.fromkeys(tasks, 0)

    def add(self, task: str, loss: TaskLoss, examples: int) -> None:
        if loss.auxiliary is not None:
            self.auxiliary[task] += loss.auxiliary.detach()
        self.task[task] += loss.total.detach()
        self.batches[task] += 1
        self.seen += examples
        self.task_seen[task] += examples

    def means(self) -> tuple[dict[str, float], dict[str, float]]:
        """Each task's mean loss, and mean auxiliary loss, over its batches."""
        task = {name: self.task[name].item() / n for name, n in self.batches.items() if n}
        aux = {name: self.auxiliary[name].item() / self.batches[name] for name in self.auxiliary
               if self.batches[name]}
        return task, aux

    def add_clipped(self, tasks: set[str], clipped: torch.Tensor) -> None:
        """Counts a clipped step (`clipped`: 1 or 0, on the device) that held `tasks`."""
        self.clipped += clipped  # read once, at the end of the epoch
        self.steps += 1
        for task in tasks:
            self.task_clipped[task] += clipped
            self.task_steps[task] += 1

    def clipped_share(self) -> float | None:
        """The share of the epoch's steps whose gradient norm was clipped (None: none
        was, clipping is off)."""
        return self.clipped.item() / self.steps if self.steps else None

    def task_clipped_shares(self) -> dict[str, float]:
        """Each task's share of the epoch's clipped steps among those holding a batch of
        it; a task in no step (or clipping off) has none."""
        counted = [name for name, n in self.task_steps.items() if n]
        if not counted:
            return {}
        clipped = torch.stack([self.task_clipped[name] for name in counted]).tolist()
        return {name: c / self.task_steps[name] for name, c in zip(counted, clipped)}


def _train_epoch(s: TrainingSetup, state: LoopState, plan: list[str], *, desc: str,
                 progress: bool, on_step: Callable[..., None] | None = None) -> EpochResult:
    """One epoch of optimizer steps, each `s.per_step` consecutive batches of `plan`;
    `on_step(step=, loss=)` after each (`StepCallback`, its epoch bound)."""
    t = s.config.train
    s.model.train()
    n_steps = optimizer_steps(len(plan), s.per_step)
    sums = _EpochSums(list(s.data.train), list(s.auxiliary), s.device)
    running = torch.zeros((), device=s.device)
    window_start, window_seen = time.perf_counter(), 0
    total_loss, readings = 0.0, 0
    conflicts: list[dict[str, float]] = []
    bar = tqdm(total=n_steps, desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, leave=False)
    if on_step is not None:  # where the epoch starts: loading, or the last evaluation, ended
        on_step(step=state.step, loss=None)
    for i in range(n_steps):
        for loss in _train_step(s, plan[i * s.per_step:(i + 1) * s.per_step], sums):
            running += loss
        state.step += 1
        bar.update(1)
        value = None
        if s.probes and state.step % t.log_grad_conflict_every == 0:
            conflicts.append(gradient_conflict(s.model, s.probes, s.device))
            state.grad_cos.append({"step": state.step, **conflicts[-1]})
        # The loss is read (a host-device sync) only every log_every steps.
        if (i + 1) % t.log_every == 0 or i + 1 == n_steps:
            steps_in_window = (i % t.log_every) + 1
            value = running.item() / steps_in_window
            if not math.isfinite(value):
                raise TrainingError(f"the training loss became {value} at step {state.step}; "
                                    "lower train.lr or check the data")
            total_loss += value * steps_in_window
            readings += steps_in_window
            rate = (sums.seen - window_seen) / max(time.perf_counter() - window_start, 1e-9)
            bar.set_postfix(loss=f"{value:.4f}", ex_s=f"{rate:.0f}")
            running.zero_()
            window_start, window_seen = time.perf_counter(), sums.seen
        if on_step is not None:
            on_step(step=state.step, loss=value)
    bar.close()
    grad_cos = {key: sum(r[key] for r in conflicts) / len(conflicts)
                for key in (conflicts[0] if conflicts else {})}
    task_losses, aux_losses = sums.means()
    return EpochResult(total_loss / max(readings, 1), sums.seen, task_losses, grad_cos,
                       aux_losses, sums.clipped_share(), sums.task_clipped_shares(),
                       task_seen=sums.task_seen)


def _train_step(s: TrainingSetup, group: list[str], sums: _EpochSums) -> list[torch.Tensor]:
    """One optimizer step over the batches of `group`; returns the combined losses it
    backpropagated (detached), one per batch or, for per-step methods, one.

    Each batch's loss is `MultitaskModel.task_loss`, with the task's auxiliary
    contrastive loss if it has one. The step's loss is the sum over the
    `batches_per_step` batches of one round (one task for most schedules,
    every task for triple_batch, train.batches_per_step drawn tasks for the
    sampled schedules) and the mean over the rounds accumulated
    (train.grad_accum); a task drawn twice in a step has its losses summed.
    """
    model, combiner = s.model, s.combiner
    scale = s.schedule.batches_per_step / len(group)
    weight = s.config.loss.contrastive_weight
    s.optimizer.zero_grad(set_to_none=True)
    backpropagated: list[torch.Tensor] = []
    step_losses: dict[str, torch.Tensor] = {}
    for task in group:
        batch = s.data.train[task].batch(s.samplers[task].next()).to(s.device)
        loss = model.task_loss(batch, s.auxiliary.get(task), weight=weight)
        sums.add(task, loss, len(batch))
        if combiner.per_step:
            step_losses[task] = step_losses[task] + loss.total if task in step_losses \
                else loss.total
        else:
            backpropagated.append(combiner.backward({task: loss.total}, model, scale))
    if combiner.per_step:
        backpropagated.append(combiner.backward(step_losses, model, scale))
    max_norm = s.config.optim.max_grad_norm
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        sums.add_clipped(set(group), norm > max_norm)
    s.optimizer.step()
    combiner.after_step()
    s.scheduler.step()
    return backpropagated


def gradient_conflict(model, probes: dict[str, Batch], device: torch.device) -> dict[str, float]:
    """Cosine similarity of each pair of task gradients on the shared encoder.

    Computed on fixed probe batches in eval mode (no dropout, no random draws),
    so readings at different steps compare the same examples and training is
    left exactly as it was. Negative = the tasks pull the encoder apart.
    """
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    if not shared or len(probes) < 2:
        return {}
    was_training = model.training
    model.eval()
    losses = {name: model.task_loss(batch.to(device)).total for name, batch in probes.items()}
    grads = torch.nn.functional.normalize(task_gradients(losses, shared), dim=1)  # (K, P)
    cos = (grads @ grads.T).tolist()  # one sync for all pairs
    model.train(was_training)
    names = list(probes)
    return {f"grad_cos/{names[i]}-{names[j]}": round(cos[i][j], 6)
            for i in range(len(names)) for j in range(i + 1, len(names))}
