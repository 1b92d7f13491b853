"""Metrics on dev sets, the overall scores, and CS224N prediction files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from mtbert.data import EncodedSet
from mtbert.heads import MultitaskModel
from mtbert.tasks import Task, overall_scores


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_set(model: MultitaskModel, dataset: EncodedSet, *, batch_size: int,
                device: torch.device) -> np.ndarray:
    """Predictions (class ids or scores) for every example, in order."""
    was_training = model.training
    model.eval()
    predictions = np.zeros(len(dataset), dtype=np.float32)
    for batch in dataset.batches(batch_size):
        with autocast(device):
            out = model(batch.to(device))
        predictions[batch.indices] = dataset.task.predict(out).float().cpu().numpy()
    model.train(was_training)
    return predictions


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
    with open(path, "w") as f:
        f.write(f"id\t{task.prediction_header}\n")
        for example_id, value in zip(ids, predictions):
            f.write(f"{example_id}\t{task.format_prediction(value)}\n")
