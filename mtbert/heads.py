"""Task heads on the shared encoder, and the multitask model that routes batches.

Choices (all `model.*` config keys): pooling `cls` | `mean`; BERT's shared
pooler, one pooler per task, or none; an optional hidden ReLU layer of
`head_hidden` units; dropout; pairs as one `concat` pass or two `siamese`
passes with features u, v, |u-v|, u*v (+ cosine, Reimers & Gurevych 2019);
STS output raw, clamped to [low, high] or low + (high-low)*sigmoid.

STS heads (`model.sts_head`): `regression`, the MLP above; `cosine`, the
Sentence-BERT head, high * cos(u, v) of the siamese embeddings with no
weights of its own (Reimers & Gurevych 2019); `classes`, the MLP with one
logit per rounded score (`tasks.ScoreClassesTask` holds its loss and
expected-score prediction).

`MultitaskModel.task_loss` is the one loss of a batch the training loop and
the gradient-conflict readings call for every task: the head's loss, plus,
for a pair task with an auxiliary contrastive loss (`mtbert/contrastive.py`),
that loss on the same forward pass's sentence embeddings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert.config import ModelConfig
from mtbert.contrastive import ContrastiveLoss
from mtbert.data import Batch, PackedView
from mtbert.encoder import BertEncoder
from mtbert.errors import ConfigError
from mtbert.runtime import autocast
from mtbert.tasks import RegressionTask, ScoreClassesTask, Task


class TaskHead(nn.Module):
    """dropout -> [Linear -> ReLU -> dropout] -> Linear(num_outputs) -> output transform."""

    def __init__(self, task: Task, in_features: int, *, hidden: int, dropout: float,
                 sts_output: str):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden > 0:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, task.num_outputs))
        self.mlp = nn.Sequential(*layers)
        # The output transform bounds a regressed score; class logits stay as they are.
        regressed = isinstance(task, RegressionTask) and not isinstance(task, ScoreClassesTask)
        self.bounds = (task.low, task.high) if regressed else None
        self.output = sts_output

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(features)  # (B, num_outputs)
        if self.bounds is None or self.output == "raw":
            return out
        low, high = self.bounds
        if self.output == "clamp":
            return out.clamp(low, high)
        return low + (high - low) * torch.sigmoid(out)


class CosineHead(nn.Module):
    """high * cos(u, v): Sentence-BERT's regression objective (Reimers & Gurevych 2019).

    SBERT regresses cos(u, v) on the gold score / 5 with MSE; predicting
    5 cos(u, v) against the gold score is the same objective times 25, in the
    score units the regression head's loss uses. Opposed embeddings give
    scores below 0; Pearson does not mind, and clamping would flatten them.
    """

    def __init__(self, task: RegressionTask):
        super().__init__()
        self.high = task.high

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(u.float(), v.float(), dim=-1)  # (B,)
        return self.high * cos.unsqueeze(-1)  # (B, 1)


@dataclass
class TaskLoss:
    """The loss of one task's batch."""

    total: torch.Tensor  # scalar: the head's loss + weight x the auxiliary loss
    auxiliary: torch.Tensor | None  # scalar: the unweighted auxiliary loss; None without one


class MultitaskModel(nn.Module):
    def __init__(self, encoder: BertEncoder, tasks: list[Task], config: ModelConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        d = encoder.config.hidden_size
        self.poolers = nn.ModuleDict()
        if config.pooler == "per_task":
            # Each task starts from BERT's pre-trained pooler and then drifts its own way.
            self.poolers.update({t.name: copy.deepcopy(encoder.pooler) for t in tasks})
        self.tasks = {task.name: task for task in tasks}
        self.heads = nn.ModuleDict()
        for task in tasks:
            siamese = task.is_pair and config.pair_encoding == "siamese"
            if isinstance(task, RegressionTask) and config.sts_head == "cosine":
                if not siamese:
                    raise ConfigError("model.sts_head=cosine needs model.pair_encoding=siamese")
                self.heads[task.name] = CosineHead(task)
                continue
            in_features = (4 * d + int(config.siamese_cosine)) if siamese else d
            self.heads[task.name] = TaskHead(task, in_features, hidden=config.head_hidden,
                                             dropout=config.dropout,
                                             sts_output=config.sts_output)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task trains: the encoder (with BERT's pooler)."""
        return list(self.encoder.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters only `task` trains: its head and, if per task, its pooler."""
        own = list(self.heads[task].parameters())
        if task in self.poolers:
            own += list(self.poolers[task].parameters())
        return own

    def last_shared_weight(self) -> nn.Parameter | None:
        """The weight of the last layer all tasks share (GradNorm's W)."""
        if self.config.pooler == "shared":
            return self.encoder.pooler.weight
        return self.encoder.layers[-1].ffn_down.weight if len(self.encoder.layers) else None

    def embed(self, task: str, ids: torch.Tensor, mask: torch.Tensor,
              types: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (B, d) of token ids (B, T) for `task`'s head."""
        hidden = self.encoder(ids, mask, types)  # (B, T, d)
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, d)
        return self._pooler(task, pooled)

    def embed_packed(self, task: str, view: PackedView) -> torch.Tensor:
        """Sentence embeddings (S, d) of the S sequences of a packed batch."""
        hidden = self.encoder.forward_packed(view)  # (N, d)
        if self.config.pooling == "cls":
            pooled = hidden[view.cu_seqlens[:-1].long()]  # (S, d): each sequence's first token
        else:
            sums = hidden.new_zeros(view.n_seqs, hidden.shape[1]).index_add_(
                0, view.seq_index, hidden)  # (S, d)
            pooled = sums / view.lengths[:, None].to(hidden.dtype)
        return self._pooler(task, pooled)

    def _pooler(self, task: str, pooled: torch.Tensor) -> torch.Tensor:
        if self.config.pooler == "shared":
            return torch.tanh(self.encoder.pooler(pooled))
        if self.config.pooler == "per_task":
            return torch.tanh(self.poolers[task](pooled))
        return pooled

    def is_siamese(self, batch: Batch) -> bool:
        """Whether `batch` holds pairs encoded one sentence at a time."""
        return batch.views[0].groups == 2 if batch.packed else len(batch.views) == 2

    def forward(self, batch: Batch) -> torch.Tensor:
        """The head's output (B, num_outputs) for a batch of one task."""
        if self.is_siamese(batch):
            return self.pair_output(batch.task, *self.sentence_pair(batch))
        if batch.packed:
            features = self.embed_packed(batch.task, batch.views[0])  # (B, d)
        else:
            features = self.embed(batch.task, *batch.views[0])  # (B, d)
        return self.heads[batch.task](features)

    def task_loss(self, batch: Batch, contrastive: ContrastiveLoss | None = None, *,
                  weight: float = 1.0) -> TaskLoss:
        """The loss of a batch of one task, with `weight` x the `contrastive` loss if given.

        The forward pass runs under autocast (bf16 on CUDA), the losses after
        it in full precision: under autocast the contrastive cosine matrix
        would be a bf16 matmul.
        """
        task = self.tasks[batch.task]
        if contrastive is None:
            with autocast(batch.labels.device):
                output = self(batch)
            return TaskLoss(task.loss(output, batch.labels), None)
        if not self.is_siamese(batch):
            raise ConfigError(f"the auxiliary {contrastive.name} loss of {batch.task} needs "
                              "model.pair_encoding=siamese (one embedding per sentence)")
        with autocast(batch.labels.device):
            u, v = self.sentence_pair(batch)  # 2 x (B, d)
            output = self.pair_output(batch.task, u, v)
        head_loss = task.loss(output, batch.labels)
        auxiliary = contrastive(u, v, task, batch.labels)
        return TaskLoss(head_loss + weight * auxiliary, auxiliary)

    def sentence_pair(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings u, v (B, d) of the first and second sentences of a siamese batch."""
        if batch.packed:
            return self.embed_packed(batch.task, batch.views[0]).chunk(2)  # 2 x (B, d)
        (ids_a, mask_a, types_a), (ids_b, mask_b, types_b) = batch.views
        B, T = ids_a.shape[0], max(ids_a.shape[1], ids_b.shape[1])
        # Both sentences in one encoder pass: pad to a common length, stack on the batch.
        pad = lambda t: F.pad(t, (0, T - t.shape[1]))  # noqa: E731
        emb = self.embed(batch.task, torch.cat([pad(ids_a), pad(ids_b)]),
                         torch.cat([pad(mask_a), pad(mask_b)]),
                         torch.cat([pad(types_a), pad(types_b)]))  # (2B, d)
        return emb[:B], emb[B:]

    def pair_output(self, task: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The head's output (B, num_outputs) from the sentence embeddings u, v (B, d)."""
        head = self.heads[task]
        if isinstance(head, CosineHead):
            return head(u, v)
        return head(self._siamese_features(u, v))

    def _siamese_features(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = [u, v, (u - v).abs(), u * v]
        if self.config.siamese_cosine:
            parts.append(F.cosine_similarity(u, v, dim=-1).unsqueeze(-1))
        return torch.cat(parts, dim=-1)  # (B, 4d [+1])
