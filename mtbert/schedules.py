"""Task-sampling schedules: which task each batch of an epoch comes from.

A schedule turns one epoch into a list of task names, one per batch (an
optimizer step is `train.grad_accum` batches). With `train.steps_per_epoch`
> 0 the list has exactly steps x grad_accum entries; with 0 an epoch is one
pass over all training examples: each task's batches of one pass, in the
schedule's order or proportions. Each schedule is one small class registered
by name; the training loop knows none of them.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from mtbert.config import TrainConfig
from mtbert.errors import ConfigError

SCHEDULES: dict[str, type[Schedule]] = {}


def register(cls: type[Schedule]) -> type[Schedule]:
    SCHEDULES[cls.name] = cls
    return cls


class Schedule:
    name: ClassVar[str]

    def __init__(self, config: TrainConfig, batches_per_pass: dict[str, int],
                 sizes: dict[str, int]):
        self.config = config
        self.tasks = list(batches_per_pass)
        self.batches_per_pass = batches_per_pass
        self.sizes = sizes

    def plan(self, epoch: int, n_batches: int | None) -> list[str]:
        """Task of each batch of `epoch` (0-based); n_batches None = one pass."""
        raise NotImplementedError

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
    """Tasks drawn independently per batch with probabilities p_i ∝ N_i^alpha."""

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

    def alpha(self, epoch: int) -> float:
        return self.config.alpha


@register
class Annealed(_Sampled):
    """Annealed sampling (Stickland & Murray 2019): alpha moves linearly from
    `train.alpha_start` at the first epoch to `train.alpha_end` at the last,
    so training starts by dataset size and ends closer to uniform.
    """

    name = "annealed"

    def alpha(self, epoch: int) -> float:
        start, end, epochs = self.config.alpha_start, self.config.alpha_end, self.config.epochs
        if epochs <= 1:
            return start
        return start + (end - start) * epoch / (epochs - 1)


def make_schedule(config: TrainConfig, batches_per_pass: dict[str, int],
                  sizes: dict[str, int]) -> Schedule:
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"unknown train.schedule '{config.schedule}'; valid: "
                          f"{', '.join(SCHEDULES)}")
    return SCHEDULES[config.schedule](config, batches_per_pass, sizes)


def total_batches(schedule: Schedule, steps_per_epoch: int, grad_accum: int) -> int:
    """Batches of one epoch, as `plan` will return."""
    if steps_per_epoch > 0:
        return steps_per_epoch * grad_accum
    return sum(schedule.batches_per_pass.values())


def optimizer_steps(n_batches: int, grad_accum: int) -> int:
    return math.ceil(n_batches / grad_accum)
