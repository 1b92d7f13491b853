"""Loss combination: how the task losses of one step become the loss to minimise.

Each method is one small `nn.Module` registered by name (a module, so that
methods with learned weights carry them as parameters). A step may hold the
loss of one task (round-robin schedules) or of several.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mtbert.config import LossConfig
from mtbert.errors import ConfigError

LOSS_METHODS: dict[str, type[LossCombiner]] = {}


def register(cls: type[LossCombiner]) -> type[LossCombiner]:
    LOSS_METHODS[cls.name] = cls
    return cls


class LossCombiner(nn.Module):
    name: ClassVar[str]

    def __init__(self, config: LossConfig, tasks: list[str]):
        super().__init__()
        self.config = config
        self.tasks = tasks

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The combined scalar loss of the task losses present in this step."""
        raise NotImplementedError


@register
class Sum(LossCombiner):
    """Plain sum of the task losses."""

    name = "sum"

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(losses.values())).sum()


@register
class Weighted(LossCombiner):
    """Fixed weights: sum of `loss.weights.<task>` x task loss."""

    name = "weighted"

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.config.weights.get(t, 1.0) * loss
                            for t, loss in losses.items()]).sum()


def make_loss_combiner(config: LossConfig, tasks: list[str]) -> LossCombiner:
    if config.method not in LOSS_METHODS:
        raise ConfigError(f"unknown loss.method '{config.method}'; valid: "
                          f"{', '.join(LOSS_METHODS)}")
    return LOSS_METHODS[config.method](config, tasks)
