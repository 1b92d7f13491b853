"""The task registry: what each task reads, predicts, optimises and scores.

A fourth task is one more entry in `TASKS`: its files, columns, label kind and
metric. Everything else (data loading, heads, losses, metrics, the overall
scores, prediction files) reads from here.

Torch (and scipy) are imported by the methods that compute, not by the module: the
task names and metric keys serve code that trains nothing (the sweep worker, its
trial processes' contract, specs, constraints) without the cost of importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Task:
    """A task: its data files, text/label columns, outputs, loss and metric."""

    name: str
    title: str
    text_columns: tuple[str, ...]
    label_column: str
    files: dict[str, str]
    metric_name: str
    prediction_header: str
    # Stem of the CS224N default project's output files: `<stem>-dev-output.csv`.
    output_stem: str
    num_outputs: int = field(default=1)
    # Names of the classes of a classification task, in label order (reports, plots).
    class_names: tuple[str, ...] = field(default=())

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def metric_key(self) -> str:
        return f"{self.name}/{self.metric_name}"

    def parse_label(self, raw: str) -> float | None:
        """The label of one row, or None when it is empty or out of range."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch; `output` is the head's (B, num_outputs)."""
        raise NotImplementedError

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Predictions as written to files: class ids or scores, shape (B,)."""
        raise NotImplementedError

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> float:
        raise NotImplementedError

    def probabilities(self, output: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities (B, classes) of a classification head; None for scores."""
        return None

    def output_file(self, split: str) -> str:
        """The CS224N name of this task's prediction file for `split` (dev or test)."""
        return f"{self.output_stem}-{split}-output.csv"

    def format_prediction(self, value: float) -> str:
        return str(int(value))

    def arithmetic_term(self, score: float) -> float:
        """This task's share of overall/arithmetic, on a 0..1 scale."""
        return score

    def geometric_term(self, score: float) -> float:
        """This task's factor in overall/geometric, never negative."""
        return max(score, 0.0)


def _parse_float(raw: str) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Single label out of `num_outputs` classes, cross-entropy, accuracy."""

    def parse_label(self, raw: str) -> float | None:
        value = _parse_float(raw)
        if value is None or value != int(value) or not 0 <= value < self.num_outputs:
            return None
        return value

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(output.float(), labels.long())

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=-1)

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(output.float(), dim=-1)

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(predictions == labels))


@dataclass(frozen=True)
class BinaryTask(Task):
    """One logit, binary cross-entropy, accuracy at probability 0.5."""

    def parse_label(self, raw: str) -> float | None:
        value = _parse_float(raw)
        return value if value in (0.0, 1.0) else None

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(output.float().squeeze(-1), labels.float())

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return (output.squeeze(-1) > 0).long()

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        import torch

        positive = torch.sigmoid(output.float().squeeze(-1))  # (B,)
        return torch.stack([1.0 - positive, positive], dim=-1)  # (B, 2)

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(predictions == labels))


@dataclass(frozen=True)
class RegressionTask(Task):
    """A score in [low, high], mean squared error, Pearson correlation."""

    low: float = 0.0
    high: float = 5.0

    def parse_label(self, raw: str) -> float | None:
        value = _parse_float(raw)
        if value is None or not self.low <= value <= self.high:
            return None
        return value

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.mse_loss(output.float().squeeze(-1), labels.float())

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.float().squeeze(-1)

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> float:
        from scipy.stats import pearsonr

        # Pearson is undefined for constant inputs (a collapsed model); count that as 0.
        if len(labels) < 2 or np.std(predictions) == 0 or np.std(labels) == 0:
            return 0.0
        return float(pearsonr(predictions, labels)[0])

    def format_prediction(self, value: float) -> str:
        return f"{value:.4f}"

    def arithmetic_term(self, score: float) -> float:
        # The CS224N leaderboard maps Pearson from [-1, 1] onto [0, 1].
        return (1.0 + score) / 2.0


@dataclass(frozen=True)
class ScoreClassesTask(RegressionTask):
    """A score task learned as classes of the rounded score low..high (STS: 0..5).

    One logit per integer score, cross-entropy on the gold score rounded half
    up (2.5 -> 3); the prediction written to files and scored is the expected
    score sum_k p_k k, so Pearson stays the metric, as the research report
    that treated STS-B as 6-way classification evaluated it.
    """

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        classes = torch.floor(labels.float() - self.low + 0.5).long()  # (B,)
        return F.cross_entropy(output.float(), classes)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        import torch

        values = torch.arange(self.num_outputs, device=output.device, dtype=torch.float32)
        return output.float().softmax(-1) @ (values + self.low)  # (B,)


TASKS: dict[str, Task] = {
    "sst": ClassificationTask(
        name="sst",
        title="SST-5 sentiment",
        text_columns=("sentence",),
        label_column="sentiment",
        files={"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv",
               "test": "ids-sst-test-student.csv"},
        metric_name="acc",
        prediction_header="Predicted_Sentiment",
        output_stem="sst",
        num_outputs=5,
        class_names=("very negative", "negative", "neutral", "positive", "very positive"),
    ),
    "qqp": BinaryTask(
        name="qqp",
        title="Quora question pairs (paraphrase)",
        text_columns=("sentence1", "sentence2"),
        label_column="is_duplicate",
        files={"train": "quora-train.csv", "dev": "quora-dev.csv",
               "test": "quora-test-student.csv"},
        metric_name="acc",
        prediction_header="Predicted_Is_Paraphrase",
        output_stem="para",
        class_names=("not paraphrase", "paraphrase"),
    ),
    "sts": RegressionTask(
        name="sts",
        title="STS-B semantic similarity",
        text_columns=("sentence1", "sentence2"),
        label_column="similarity",
        files={"train": "sts-train.csv", "dev": "sts-dev.csv",
               "test": "sts-test-student.csv"},
        metric_name="pearson",
        prediction_header="Predicted_Similarity",
        output_stem="sts",
    ),
}

OVERALL_KEYS = ("overall/arithmetic", "overall/geometric")
METRIC_KEYS = tuple(task.metric_key for task in TASKS.values()) + OVERALL_KEYS


# model.sts_head: how a score task (STS) is predicted. regression and cosine both
# output one score (an MLP, or 5 cos(u, v), see heads.py); classes outputs one logit
# per integer score.
SCORE_HEADS = ("regression", "cosine", "classes")


def get_task(name: str, *, score_head: str = "regression") -> Task:
    """Task `name`; a score task as `score_head` (model.sts_head) learns and predicts it."""
    from mtbert.errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
    if score_head not in SCORE_HEADS:
        raise ConfigError(f"bad value {score_head!r} for model.sts_head; valid: "
                          f"{', '.join(SCORE_HEADS)}")
    task = TASKS[name]
    if score_head == "classes" and isinstance(task, RegressionTask):
        fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
        fields["num_outputs"] = int(task.high - task.low) + 1
        return ScoreClassesTask(**fields)
    return task


def overall_scores(scores: dict[str, float]) -> dict[str, float]:
    """The two overall scores over the tasks present in `scores`.

    arithmetic: the CS224N leaderboard mean, (sst + qqp + (1 + pearson)/2) / 3.
    geometric: (sst · qqp · max(pearson, 0))^(1/3), which punishes a model
    that trades one task away for the others. With fewer tasks (single-task
    runs) both are taken over the tasks present.
    """
    present = [(TASKS[key.split("/")[0]], value) for key, value in scores.items()
               if key.split("/")[0] in TASKS]
    if not present:
        return {}
    arithmetic = sum(task.arithmetic_term(v) for task, v in present) / len(present)
    product = math.prod(task.geometric_term(v) for task, v in present)
    return {"overall/arithmetic": arithmetic, "overall/geometric": product ** (1.0 / len(present))}
