"""Metrics, overall scores and losses of the task registry."""

import math

import numpy as np
import pytest
import torch

from mtbert.tasks import METRIC_KEYS, TASKS, overall_scores


def test_metric_keys():
    assert METRIC_KEYS == ("sst/acc", "qqp/acc", "sts/pearson", "overall/arithmetic",
                           "overall/geometric")


def test_overall_scores_pinned():
    scores = overall_scores({"sst/acc": 0.5, "qqp/acc": 0.8, "sts/pearson": 0.6})
    assert scores["overall/arithmetic"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert scores["overall/geometric"] == pytest.approx((0.5 * 0.8 * 0.6) ** (1 / 3))


def test_negative_pearson_zeroes_geometric_not_arithmetic():
    scores = overall_scores({"sst/acc": 0.5, "qqp/acc": 0.8, "sts/pearson": -0.2})
    assert scores["overall/geometric"] == 0.0
    assert scores["overall/arithmetic"] == pytest.approx((0.5 + 0.8 + 0.4) / 3)


def test_single_task_overall_is_that_task():
    assert overall_scores({"sst/acc": 0.4}) == {"overall/arithmetic": 0.4,
                                                "overall/geometric": pytest.approx(0.4)}


@pytest.mark.parametrize("task, raw, expected", [
    ("sst", "3", 3.0), ("sst", "3.0", 3.0), ("sst", "5", None), ("sst", "", None),
    ("sst", "2.5", None), ("qqp", "1.0", 1.0), ("qqp", "0", 0.0), ("qqp", "", None),
    ("qqp", "0.5", None), ("sts", "4.6", 4.6), ("sts", "5.2", None), ("sts", "nan", None),
])
def test_label_parsing(task, raw, expected):
    assert TASKS[task].parse_label(raw) == expected


def test_scores_and_losses_on_a_tiny_batch():
    sst, qqp, sts = TASKS["sst"], TASKS["qqp"], TASKS["sts"]
    assert sst.score(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0])) == 0.5
    assert sts.score(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert sts.score(np.array([1.0, 1.0]), np.array([2.0, 4.0])) == 0.0  # constant output
    logits = torch.zeros(2, 5)
    assert sst.loss(logits, torch.tensor([1, 4])).item() == pytest.approx(math.log(5))
    assert qqp.loss(torch.zeros(2, 1), torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2))
    assert sts.loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])).item() == 1.0
    assert qqp.predict(torch.tensor([[-0.1], [0.3]])).tolist() == [0, 1]
