"""Auxiliary in-batch losses on the siamese sentence embeddings of a pair task.

`loss.contrastive` picks one; the training loop adds `loss.contrastive_weight`
times it to the task's own loss of the batch, so it goes through whichever
`loss.method` combines the tasks. Each loss is one small class registered by
name, taking the embeddings u, v (B, d) of the pairs' first and second
sentences, the task and its labels. mnrl's scale s = 20 is Sentence-BERT's
(MultipleNegativesRankingLoss, Reimers & Gurevych 2019).

| name | what it does | paper |
|---|---|---|
| mnrl | cross-entropy of s cos(a_i, b_j) with target j = i, positive anchors | Henderson et al. 2017 |
| cosine_mse | MSE of C_ij = cos(a_i, b_j) against T = diag(label on [0, 1]) | research variant |
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from mtbert.config import LossConfig
from mtbert.tasks import BinaryTask, RegressionTask, Task

CONTRASTIVE_LOSSES: dict[str, type[ContrastiveLoss]] = {}


def register(cls: type[ContrastiveLoss]) -> type[ContrastiveLoss]:
    CONTRASTIVE_LOSSES[cls.name] = cls
    return cls


def cosine_matrix(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """C_ij = cos(u_i, v_j), (B, d) x (B, d) -> (B, B)."""
    return F.normalize(u.float(), dim=-1) @ F.normalize(v.float(), dim=-1).T


def similarity_target(task: Task, labels: torch.Tensor) -> torch.Tensor:
    """Each pair's label on [0, 1]: QQP's 0/1 as is, a score (STS) as (y - low) / (high - low)."""
    if isinstance(task, RegressionTask):
        return (labels.float() - task.low) / (task.high - task.low)
    if isinstance(task, BinaryTask):
        return labels.float()
    raise ValueError(f"task {task.name} has no pair similarity label")


class ContrastiveLoss:
    name: ClassVar[str]

    def __init__(self, config: LossConfig):
        self.config = config

    def __call__(self, u: torch.Tensor, v: torch.Tensor, task: Task,
                 labels: torch.Tensor) -> torch.Tensor:
        """The loss (a scalar) of a batch of pairs with embeddings u, v (B, d)."""
        raise NotImplementedError


@register
class MultipleNegativesRanking(ContrastiveLoss):
    """Each positive pair (a_i, b_i) ranks b_i above every other b_j of the batch.

    Only positive pairs are anchors (a QQP duplicate; an STS pair scored at
    least `loss.mnrl_threshold`); every b_j, negatives included, is a
    candidate. A batch without a positive pair adds zero.
    """

    name = "mnrl"

    def positives(self, task: Task, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(task, RegressionTask):
            return labels >= self.config.mnrl_threshold
        return labels > 0.5  # (B,) bool

    def __call__(self, u, v, task, labels):
        logits = self.config.mnrl_scale * cosine_matrix(u, v)  # (B, B)
        anchors = self.positives(task, labels)  # (B,)
        targets = torch.arange(len(labels), device=logits.device)
        # Summed over the anchors, divided by their count (1 when there are none), so that
        # a batch without positives gives zero with no host-device sync.
        per_pair = F.cross_entropy(logits, targets, reduction="none")  # (B,)
        return (per_pair * anchors).sum() / anchors.sum().clamp(min=1)


@register
class CosineMSE(ContrastiveLoss):
    """Mean over all B x B entries of (cos(a_i, b_j) - T_ij)^2, T = diag(label on [0, 1])."""

    name = "cosine_mse"

    def __call__(self, u, v, task, labels):
        cos = cosine_matrix(u, v)  # (B, B)
        target = torch.diag(similarity_target(task, labels))  # (B, B)
        return F.mse_loss(cos, target)


def make_contrastive(config: LossConfig) -> ContrastiveLoss | None:
    """The auxiliary loss of `loss.contrastive`, or None for none."""
    if config.contrastive == "none":
        return None
    return CONTRASTIVE_LOSSES[config.contrastive](config)
