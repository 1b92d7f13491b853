"""The one training loop: every schedule and loss method plugs into it.

setup (data, model, optimizer) -> epochs of optimizer steps, each step one
or more batches chosen by the task schedule -> evaluation on dev after every
epoch -> the best model directory by `train.select_metric`, the resume state
of the last epoch, metrics.jsonl and summary.json in the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mtbert.balancing import LossCombiner, make_loss_combiner, task_gradients
from mtbert.config import RunConfig, cache_dir, data_dir, save_config
from mtbert.data import (Batch, EncodedSet, make_task_sampler, read_examples, sample_indices,
                         tokenize_cached)
from mtbert.encoder import load_pretrained
from mtbert.errors import DataError, TrainingError
from mtbert.evaluate import evaluate
from mtbert.modeldir import save_model_dir
from mtbert.fastpath import configure_packing
from mtbert.heads import MultitaskModel
from mtbert.contrastive import make_contrastive
from mtbert.optim import apply_freezing, linear_schedule, make_optimizer
from mtbert.runtime import (atomic_torch_save, atomic_write_jsonl, atomic_write_text, autocast,
                            environment, resolve_device)
from mtbert.schedules import epoch_batches, make_schedule, optimizer_steps, step_size
from mtbert.tasks import get_task
from mtbert.tokenize import Tokenizer

log = logging.getLogger("mtbert")

RESUME_FILE = "resume.pt"
GRAD_CONFLICT_FILE = "grad_conflict.jsonl"
EvalCallback = Callable[[int, int, dict[str, float]], None]


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


def train(config: RunConfig, *, run_dir: Path, device: str = "auto", resume: bool = False,
          progress: bool = True, on_eval: EvalCallback | None = None) -> dict:
    """Train one multitask run into `run_dir`; returns summary.json's content.

    `on_eval(epoch, step, metrics)` is called after every evaluation with the
    metric keys and `train/loss` (a sweep
    reports to Optuna there and may raise to prune). With `resume`, training
    continues from the last finished epoch saved in `run_dir`.
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.train.seed)

    encoder, encoder_dir = load_pretrained(config.model.encoder)
    tokenizer = Tokenizer(encoder_dir)
    data = load_task_data(config, tokenizer)
    tasks = config.data.tasks
    model = MultitaskModel(encoder, [data.train[t].task for t in tasks], config.model).to(dev)
    t = config.train
    combiner = make_loss_combiner(config.loss, tasks, seed=t.seed).to(dev)
    configure_packing(model, [*data.train.values(), *data.dev.values()], t)
    samplers = {name: make_task_sampler(data.train[name], t.batch_size, seed=t.seed,
                                        bucket_by_length=t.bucket_by_length) for name in tasks}
    schedule = make_schedule(t, {n: s.batches_per_pass for n, s in samplers.items()},
                             {n: len(data.train[n]) for n in tasks},
                             every_task_per_step=combiner.per_step)
    sizes = {len(data.train[n]) for n in tasks}
    if schedule.by_size and len(tasks) > 1 and len(sizes) == 1:
        log.warning("every task has %d training examples (data.max_train_examples), so %s "
                    "samples them uniformly; lift the cap to sample by dataset size",
                    sizes.pop(), t.schedule)
    if combiner.per_step and schedule.batches_per_step == 1 and len(tasks) > 1:
        log.warning("loss.method %s compares the tasks of each step, but %s gives most steps "
                    "a single task; use train.schedule triple_batch or round_robin_batch",
                    config.loss.method, t.schedule)
    per_step = step_size(schedule, t.grad_accum)
    epoch_steps = [optimizer_steps(epoch_batches(schedule, e, t.steps_per_epoch, t.grad_accum),
                                   per_step) for e in range(t.epochs)]
    apply_freezing(model, config.optim, 0)  # checks the layers named before anything runs
    optimizer = make_optimizer(model, lr=t.lr, config=config.optim, device=dev)
    loss_params = list(combiner.parameters())  # methods with learned weights
    if loss_params:
        optimizer.add_param_group({"params": loss_params, "lr": config.loss.weight_lr,
                                   "weight_decay": 0.0, "names": ["loss"]})
    scheduler = linear_schedule(optimizer, warmup=config.optim.warmup,
                                total_steps=sum(epoch_steps))
    probes = _probe_batches(data, t) if t.log_grad_conflict_every else {}

    state = {"epoch": -1, "step": 0, "best": None, "history": [], "bad_evals": 0,
             "train_time": 0.0, "train_examples": 0, "finished": False, "grad_cos": []}
    resume_path = run_dir / RESUME_FILE
    if resume and resume_path.exists():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        combiner.load_state_dict(saved["combiner"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for name, sampler_state in saved["samplers"].items():
            samplers[name].restore(sampler_state)
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        log.info("resuming %s after epoch %d of %d", run_dir, state["epoch"] + 1, t.epochs)
    elif resume:
        log.warning("%s has no resume state yet; starting the run from the beginning", run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    # The killed run may have logged an evaluation after its last saved state.
    atomic_write_jsonl(metrics_path, state["history"])

    env = environment(dev)
    log.info("training %s on %s: %s, %s, %d optimizer steps in %d epochs", ", ".join(tasks),
             dev, t.schedule, config.loss.method, sum(epoch_steps), t.epochs)
    select = t.select_metric
    try:
        for epoch in range(state["epoch"] + 1, t.epochs):
            if state["finished"]:
                break
            trainable = apply_freezing(model, config.optim, epoch)
            if config.optim.unfreeze_after and epoch == config.optim.unfreeze_after:
                log.info("epoch %d: unfreezing, %d trainable parameters", epoch + 1, trainable)
            plan = schedule.plan(epoch, t.steps_per_epoch * per_step or None)
            tic = time.perf_counter()
            result = _train_epoch(
                model, combiner, data, samplers, plan, per_step, schedule.batches_per_step,
                optimizer, scheduler, dev, config, state, probes,
                desc=f"epoch {epoch + 1}/{t.epochs}", progress=progress)
            state["train_time"] += time.perf_counter() - tic
            state["train_examples"] += result.seen
            combiner.end_epoch(result.task_losses)
            if probes:
                atomic_write_jsonl(run_dir / GRAD_CONFLICT_FILE, state["grad_cos"])
            metrics = evaluate(model, data.dev, batch_size=t.eval_batch_size, device=dev)
            record = {"step": state["step"], "epoch": epoch + 1, **metrics,
                      "train/loss": result.loss, **result.extra(combiner)}
            state["history"].append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d/%d: %s", epoch + 1, t.epochs,
                     "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            best = state["best"]
            if best is None or metrics[select] > best["metrics"][select]:
                state["best"] = {"step": state["step"], "epoch": epoch + 1, "metrics": metrics}
                state["bad_evals"] = 0
                save_model_dir(run_dir / "model", model=model, config=config,
                               tokenizer=tokenizer, metrics=metrics,
                               card={"source": {"run": str(run_dir.resolve()),
                                                "epoch": epoch + 1, "step": state["step"]},
                                     "data": data.provenance, "env": env})
            else:
                state["bad_evals"] += 1
            if t.patience and state["bad_evals"] >= t.patience:
                log.info("no improvement of %s for %d evaluations: stopping early",
                         select, t.patience)
                state["finished"] = True
            state["epoch"] = epoch
            _save_resume_state(resume_path, model, combiner, optimizer, scheduler, samplers,
                               state)
            if on_eval is not None:
                on_eval(epoch, state["step"], {k: v for k, v in record.items()
                                               if k not in ("step", "epoch")})
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at step {state['step']}; lower "
                            "train.batch_size or model.max_length") from None

    summary = {
        "selection_metric": select,
        "best": state["best"],
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(state["train_time"], 2),
        "examples_per_s": round(state["train_examples"] / max(state["train_time"], 1e-9), 2),
        "steps": state["step"],
        "epochs_completed": state["epoch"] + 1,
        "stopped_early": state["finished"],
        "env": env,
        "data": data.provenance,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


@dataclass
class EpochResult:
    loss: float  # mean combined training loss
    seen: int  # training examples
    task_losses: dict[str, float]  # mean loss of each task's batches, auxiliary loss included
    grad_cos: dict[str, float]  # mean of the epoch's gradient-conflict readings
    contrastive: dict[str, float]  # mean unweighted auxiliary loss of each task's batches

    def extra(self, combiner: LossCombiner) -> dict[str, float]:
        """Per-task losses, loss weights and gradient cosines for metrics.jsonl and W&B."""
        out = {f"train/loss_{t}": v for t, v in self.task_losses.items()}
        out.update({f"train/contrastive_{t}": v for t, v in self.contrastive.items()})
        out.update({f"loss_weight/{t}": round(w, 6) for t, w in combiner.task_weights().items()})
        out.update(self.grad_cos)
        return out


def _train_epoch(model, combiner: LossCombiner, data: TaskData, samplers, plan: list[str],
                 per_step: int, tasks_per_step: int, optimizer, scheduler, device: torch.device,
                 config: RunConfig, state: dict, probes: dict[str, Batch], *, desc: str,
                 progress: bool) -> EpochResult:
    """One epoch of optimizer steps, each `per_step` consecutive batches of `plan`.

    A step's loss is the sum over the `tasks_per_step` batches of one round
    (one task for most schedules, every task for triple_batch) and the mean
    over the rounds accumulated (train.grad_accum). With `loss.contrastive`, a
    pair task's loss is its head's loss plus `loss.contrastive_weight` times the
    auxiliary in-batch loss on the same forward pass's sentence embeddings.
    """
    t = config.train
    contrastive = make_contrastive(config.loss)
    aux_tasks = set(config.loss.contrastive_tasks) if contrastive else set()
    aux_sums = {name: torch.zeros((), device=device) for name in data.train if name in aux_tasks}
    model.train()
    n_steps = optimizer_steps(len(plan), per_step)
    running = torch.zeros((), device=device)
    task_sums = {name: torch.zeros((), device=device) for name in data.train}
    task_counts = dict.fromkeys(data.train, 0)
    window_start, window_examples = time.perf_counter(), 0
    total_loss, seen, readings = 0.0, 0, 0
    conflicts: list[dict[str, float]] = []
    bar = tqdm(total=n_steps, desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, leave=False)
    for i in range(n_steps):
        group = plan[i * per_step:(i + 1) * per_step]
        scale = tasks_per_step / len(group)
        optimizer.zero_grad(set_to_none=True)
        step_losses: dict[str, torch.Tensor] = {}
        for task in group:
            batch = data.train[task].batch(samplers[task].next()).to(device)
            spec = data.train[task].task
            with autocast(device):
                if task in aux_tasks:
                    u, v = model.sentence_pair(batch)  # 2 x (B, d)
                    output = model.pair_output(task, u, v)
                else:
                    output = model(batch)
            task_loss = spec.loss(output, batch.labels)
            if task in aux_tasks:
                aux = contrastive(u, v, spec, batch.labels)
                aux_sums[task] += aux.detach()
                task_loss = task_loss + config.loss.contrastive_weight * aux
            task_sums[task] += task_loss.detach()
            task_counts[task] += 1
            if combiner.per_step:
                step_losses[task] = step_losses[task] + task_loss if task in step_losses \
                    else task_loss
            else:
                running += combiner.backward({task: task_loss}, model, scale)
            seen += len(batch)
            window_examples += len(batch)
        if combiner.per_step:
            running += combiner.backward(step_losses, model, scale)
        if config.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        combiner.after_step()
        scheduler.step()
        state["step"] += 1
        bar.update(1)
        if probes and state["step"] % t.log_grad_conflict_every == 0:
            reading = gradient_conflict(model, probes, device)
            conflicts.append(reading)
            state["grad_cos"].append({"step": state["step"], **reading})
        # The loss is read (a host-device sync) only every log_every steps.
        if (i + 1) % t.log_every == 0 or i + 1 == n_steps:
            steps_in_window = (i % t.log_every) + 1
            value = running.item() / steps_in_window
            if not math.isfinite(value):
                raise TrainingError(f"the training loss became {value} at step {state['step']}; "
                                    "lower train.lr or check the data")
            total_loss += value * steps_in_window
            readings += steps_in_window
            rate = window_examples / max(time.perf_counter() - window_start, 1e-9)
            bar.set_postfix(loss=f"{value:.4f}", ex_s=f"{rate:.0f}")
            running.zero_()
            window_start, window_examples = time.perf_counter(), 0
    bar.close()
    task_losses = {name: task_sums[name].item() / n for name, n in task_counts.items() if n}
    grad_cos = {key: sum(r[key] for r in conflicts) / len(conflicts)
                for key in (conflicts[0] if conflicts else {})}
    aux_losses = {name: aux_sums[name].item() / task_counts[name] for name in aux_sums
                  if task_counts[name]}
    return EpochResult(total_loss / max(readings, 1), seen, task_losses, grad_cos, aux_losses)


def _probe_batches(data: TaskData, t) -> dict[str, Batch]:
    """One fixed training batch per task for the gradient-conflict readings."""
    probes = {}
    for name, dataset in data.train.items():
        order = np.random.default_rng([t.seed, 0xC05]).permutation(len(dataset))
        probes[name] = dataset.batch(order[:t.batch_size])
    return probes


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
    losses = {}
    for name, batch in probes.items():
        batch = batch.to(device)
        with autocast(device):
            output = model(batch)
        losses[name] = model.tasks[name].loss(output, batch.labels)
    grads = torch.nn.functional.normalize(task_gradients(losses, shared), dim=1)  # (K, P)
    cos = (grads @ grads.T).tolist()  # one sync for all pairs
    model.train(was_training)
    names = list(probes)
    return {f"grad_cos/{names[i]}-{names[j]}": round(cos[i][j], 6)
            for i in range(len(names)) for j in range(i + 1, len(names))}


def _save_resume_state(path: Path, model, combiner, optimizer, scheduler, samplers,
                       state: dict) -> None:
    payload = {"model": model.state_dict(), "combiner": combiner.state_dict(),
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "samplers": {n: s.state() for n, s in samplers.items()},
               "rng": torch.get_rng_state(), "state": state}
    atomic_torch_save(payload, path)

