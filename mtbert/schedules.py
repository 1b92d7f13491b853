"""Task-sampling schedules: which task each batch of an epoch comes from.

A schedule turns one epoch into a list of task names, one per batch. An
optimizer step takes `batches_per_step x train.grad_accum` consecutive
batches of that list: one batch for most schedules, one batch of every task
for `triple_batch` (and for `round_robin_batch` under a loss method that
needs every task in each step, such as pcgrad), and `train.batches_per_step`
batches, each task drawn independently, for the sampled schedules
(`proportional`, `annealed`, `temperature`): so that sampling by size
combines with loss weights and with methods that compare the tasks of a step.
With `train.steps_per_epoch` > 0 an epoch is exactly that many optimizer
steps; with 0 it is one pass over all training examples, spent in the
schedule's order or proportions (the sampled schedules keep the batches of
one pass, in ceil(batches / batches_per_step) steps). Each schedule is one
small class registered by name, declaring the config keys it reads (`reads`);
the training loop knows none of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from mtbert.errors import ConfigError

if TYPE_CHECKING:  # the config names the registries' entries; these modules only read it
    from mtbert.config import TrainConfig

SCHEDULES: dict[str, type[Schedule]] = {}


def register(cls: type[Schedule]) -> type[Schedule]:
    SCHEDULES[cls.name] = cls
    return cls


class Schedule:
    name: ClassVar[str]
    # The run-config keys the schedule reads beyond those every run reads (train.seed,
    # train.epochs): a key that no schedule or loss method in use reads changes nothing.
    reads: ClassVar[tuple[str, ...]] = ()
    batches_per_step: int = 1
    by_size: ClassVar[bool] = False  # draws tasks by training-set size

    def __init__(self, config: TrainConfig, batches_per_pass: dict[str, int],
                 sizes: dict[str, int], *, every_task_per_step: bool = False):
        self.config = config
        self.tasks = list(batches_per_pass)
        self.batches_per_pass = batches_per_pass
        self.sizes = sizes
        self.every_task_per_step = every_task_per_step

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        """Task of each batch of `epoch` (0-based); n_batches None = one pass."""
        raise NotImplementedError

    def pass_batches(self) -> int:
        """Batches of an epoch that is one pass (train.steps_per_epoch 0)."""
        return sum(self.batches_per_pass.values())

    def _rng(self, epoch: int) -> np.random.Generator:
        # Seeded per epoch, so a resumed run draws the same plan as the killed one.
        return np.random.default_rng([self.config.seed, epoch, 0x5C4ED])


@register
class RoundRobinBatch(Schedule):
    """One batch of each task in turn: sst, qqp, sts, sst, ...

    For one pass, a task whose pass is done drops out of the rotation and the
    others go on until every example was seen once.
    """

    name = "round_robin_batch"

    @property
    def batches_per_step(self) -> int:  # type: ignore[override]
        # Loss methods that compare task gradients (pcgrad, gradnorm) need one
        # batch of every task in each step: one round of the rotation.
        return len(self.tasks) if self.every_task_per_step else 1

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        if n_batches is not None:
            return [self.tasks[i % len(self.tasks)] for i in range(n_batches)]
        left = dict(self.batches_per_pass)
        order = []
        while any(left.values()):
            for task in self.tasks:
                if left[task]:
                    order.append(task)
                    left[task] -= 1
        return order


class _Sampled(Schedule):
    """Tasks drawn independently per batch with probabilities p_i ∝ N_i^alpha; an
    optimizer step takes `train.batches_per_step` consecutive draws."""

    by_size = True

    @property
    def batches_per_step(self) -> int:  # type: ignore[override]
        return self.config.batches_per_step

    def alpha(self, epoch: int) -> float:
        raise NotImplementedError

    def probabilities(self, epoch: int) -> dict[str, float]:
        alpha = self.alpha(epoch)
        weights = {t: self.sizes[t] ** alpha for t in self.tasks}
        total = sum(weights.values())
        return {t: w / total for t, w in weights.items()}

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        n = sum(self.batches_per_pass.values()) if n_batches is None else n_batches
        p = self.probabilities(epoch)
        draws = self._rng(epoch).choice(len(self.tasks), size=n, p=[p[t] for t in self.tasks])
        return [self.tasks[i] for i in draws]


@register
class Proportional(_Sampled):
    """p_i ∝ N_i^alpha with a fixed `train.alpha` (1 = by dataset size, 0 = uniform).

    For one pass the number of batches is that of one pass over all tasks;
    with alpha = 1 each task is seen about once.
    """

    name = "proportional"
    reads = ("train.alpha", "train.batches_per_step")

    def alpha(self, epoch: int) -> float:
        return self.config.alpha


@register
class Annealed(_Sampled):
    """Annealed sampling (Stickland & Murray 2019): alpha moves from
    `train.alpha_start` at the first epoch to `train.alpha_end` at the last,
    so training starts by dataset size and ends closer to uniform.

    `train.alpha_shape` linear: in equal steps; cosine: half a cosine wave,
    slow at both ends, fastest in the middle.
    """

    name = "annealed"
    reads = ("train.alpha_start", "train.alpha_end", "train.alpha_shape",
             "train.batches_per_step")

    def alpha(self, epoch: int) -> float:
        start, end, epochs = self.config.alpha_start, self.config.alpha_end, self.config.epochs
        if epochs <= 1:
            return start
        progress = epoch / (epochs - 1)
        if self.config.alpha_shape == "cosine":
            progress = (1 - math.cos(math.pi * progress)) / 2
        return start + (end - start) * progress


@register
class Temperature(_Sampled):
    """Temperature sampling as in jiant: p_i ∝ N_i^(1/T) with T = `train.temperature`.

    T = 1 samples by dataset size, larger T flattens towards uniform (T = 2
    is the square-root rule). One pass: the batches of one pass over all tasks.
    """

    name = "temperature"
    reads = ("train.temperature", "train.batches_per_step")

    def alpha(self, epoch: int) -> float:
        return 1.0 / self.config.temperature


@register
class Sequential(Schedule):
    """All of task 1's batches, then task 2's, then task 3's: the
    catastrophic-forgetting baseline.

    The whole run (train.epochs x the batches of one epoch) is cut into one
    contiguous block per task, in `data.tasks` order; a block boundary may fall
    inside an epoch. With steps_per_epoch > 0 the blocks are equal; for full
    passes each task's block is train.epochs passes over its own data.
    """

    name = "sequential"

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        epochs = self.config.epochs
        if n_batches is None:
            per_epoch = self.pass_batches()
            blocks = [(t, epochs * self.batches_per_pass[t]) for t in self.tasks]
        else:
            per_epoch = n_batches
            total = epochs * n_batches
            bounds = [round(total * k / len(self.tasks)) for k in range(len(self.tasks) + 1)]
            blocks = [(t, bounds[k + 1] - bounds[k]) for k, t in enumerate(self.tasks)]
        run = [task for task, n in blocks for _ in range(n)]
        return run[epoch * per_epoch:(epoch + 1) * per_epoch]


@register
class RoundRobinEpoch(Schedule):
    """One task per epoch, in turn: epoch 1 sst, epoch 2 qqp, epoch 3 sts, epoch 4 sst...

    With steps_per_epoch > 0 the epoch is that many steps of its task; for
    full passes it is one pass over that task's data.
    """

    name = "round_robin_epoch"

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        task = self.tasks[epoch % len(self.tasks)]
        return [task] * (self.batches_per_pass[task] if n_batches is None else n_batches)


@register
class SmartRoundRobin(Schedule):
    """Round robin over the other tasks, then the target task (`train.target_task`)
    as the last block of every epoch, so that each evaluation follows training
    on the task the run cares most about.

    With steps_per_epoch > 0 the target task gets its fair share (1/number of
    tasks) of the epoch's batches, at the end; for full passes, every task
    makes one pass and the target's comes last.
    """

    name = "smart_round_robin"
    reads = ("train.target_task",)

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        target = self.config.target_task
        if target not in self.tasks:
            return RoundRobinBatch(self.config, self.batches_per_pass, self.sizes).plan(
                epoch, n_batches)
        others = [t for t in self.tasks if t != target]
        if n_batches is None:
            left = {t: self.batches_per_pass[t] for t in others}
            head: list[str] = []
            while any(left.values()):
                for task in others:
                    if left[task]:
                        head.append(task)
                        left[task] -= 1
            return head + [target] * self.batches_per_pass[target]
        n_target = n_batches // len(self.tasks) if others else n_batches
        head = [others[i % len(others)] for i in range(n_batches - n_target)] if others else []
        return head + [target] * n_target


@register
class TripleBatch(Schedule):
    """One batch of every task per optimizer step, one step on the combined loss.

    A full pass lasts as many steps as the largest task has batches, the
    smaller tasks cycling through their data again; with
    `train.triple_batch_truncate` it lasts as many as the smallest has, and
    the larger tasks see only part of their data each epoch.
    """

    name = "triple_batch"
    reads = ("train.triple_batch_truncate",)

    @property
    def batches_per_step(self) -> int:  # type: ignore[override]
        return len(self.tasks)

    def _pass_steps(self) -> int:
        counts = self.batches_per_pass.values()
        return min(counts) if self.config.triple_batch_truncate else max(counts)

    def pass_batches(self) -> int:
        return self._pass_steps() * len(self.tasks)

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        n = self.pass_batches() if n_batches is None else n_batches
        return [self.tasks[i % len(self.tasks)] for i in range(n)]


def make_schedule(config: TrainConfig, batches_per_pass: dict[str, int],
                  sizes: dict[str, int], *, every_task_per_step: bool = False) -> Schedule:
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"unknown train.schedule '{config.schedule}'; valid: "
                          f"{', '.join(SCHEDULES)}")
    return SCHEDULES[config.schedule](config, batches_per_pass, sizes,
                                      every_task_per_step=every_task_per_step)


def step_size(schedule: Schedule, grad_accum: int) -> int:
    """Batches per optimizer step."""
    return schedule.batches_per_step * grad_accum


def epoch_batches(schedule: Schedule, epoch: int, steps_per_epoch: int, grad_accum: int) -> int:
    """Batches of one epoch, as `plan` will return them."""
    if steps_per_epoch > 0:
        return steps_per_epoch * step_size(schedule, grad_accum)
    return len(schedule.plan(epoch, None))


def optimizer_steps(n_batches: int, per_step: int) -> int:
    return math.ceil(n_batches / per_step)
