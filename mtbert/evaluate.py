"""Metrics on dev sets, the overall scores, and CS224N prediction files."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtbert.data import EncodedSet
from mtbert.heads import MultitaskModel
from mtbert.rundir import naming
from mtbert.runtime import autocast
from mtbert.tasks import Task, overall_scores


def _outputs(model: MultitaskModel, dataset: EncodedSet, *, batch_size: int,
             device: torch.device, progress: bool = False):
    """(indices, head output) per batch of `dataset`, in eval mode and without gradients."""
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(dataset), desc=f"predict {dataset.task.name}", unit="ex",
               disable=not progress, file=sys.stderr, leave=False)
    try:
        with torch.no_grad():
            for batch in dataset.batches(batch_size):
                with autocast(device):
                    out = model(batch.to(device))
                yield batch.indices, out
                bar.update(len(batch.indices))
    finally:
        bar.close()
        model.train(was_training)


@dataclass
class SetOutputs:
    """What a model says about every example of a set, in order."""

    predictions: np.ndarray  # (N,) class ids or scores, as written to prediction files
    probabilities: np.ndarray | None  # (N, classes) of a classification task, else None


def predict_set_outputs(model: MultitaskModel, dataset: EncodedSet, *, batch_size: int,
                        device: torch.device, progress: bool = False,
                        with_probabilities: bool = True) -> SetOutputs:
    """Predictions and, for classification tasks, class probabilities in one pass."""
    task = dataset.task
    predictions = np.zeros(len(dataset), dtype=np.float32)
    probabilities = None
    for indices, out in _outputs(model, dataset, batch_size=batch_size, device=device,
                                 progress=progress):
        predictions[indices] = task.predict(out).float().cpu().numpy()
        probs = task.probabilities(out) if with_probabilities else None
        if probs is not None:
            if probabilities is None:
                probabilities = np.zeros((len(dataset), probs.shape[-1]), dtype=np.float32)
            probabilities[indices] = probs.float().cpu().numpy()
    return SetOutputs(predictions, probabilities)


def predict_set(model: MultitaskModel, dataset: EncodedSet, *, batch_size: int,
                device: torch.device, progress: bool = False) -> np.ndarray:
    """Predictions (class ids or scores) for every example, in order."""
    return predict_set_outputs(model, dataset, batch_size=batch_size, device=device,
                               progress=progress, with_probabilities=False).predictions


def evaluate(model: MultitaskModel, dev_sets: dict[str, EncodedSet], *, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """The per-task metric keys of `dev_sets` plus overall/arithmetic and overall/geometric."""
    metrics = {}
    for dataset in dev_sets.values():
        predictions = predict_set(model, dataset, batch_size=batch_size, device=device)
        metrics[dataset.task.metric_key] = dataset.task.score(predictions, dataset.labels)
    metrics.update(overall_scores(metrics))
    return metrics


def write_predictions(path: Path, task: Task, ids: list[str], predictions: np.ndarray) -> None:
    """CS224N output format: a header, then `id<TAB>prediction` per example."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path), open(path, "w", encoding="utf-8") as f:
        f.write(f"id\t{task.prediction_header}\n")
        for example_id, value in zip(ids, predictions):
            f.write(f"{example_id}\t{task.format_prediction(value)}\n")
