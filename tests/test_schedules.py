"""Each task-sampling schedule does what its docstring says."""

from collections import Counter

import pytest

from mtbert.config import TrainConfig
from mtbert.schedules import SCHEDULES, make_schedule, total_batches

SIZES = {"sst": 800, "qqp": 3200, "sts": 200}
BATCHES = {"sst": 25, "qqp": 100, "sts": 7}


def _schedule(**train):
    config = TrainConfig(**train)
    return make_schedule(config, BATCHES, SIZES)


def test_round_robin_batch_alternates_tasks():
    plan = _schedule(schedule="round_robin_batch").plan(0, 7)
    assert plan == ["sst", "qqp", "sts", "sst", "qqp", "sts", "sst"]


def test_round_robin_one_pass_sees_each_task_once():
    plan = _schedule(schedule="round_robin_batch").plan(0, None)
    assert Counter(plan) == BATCHES
    assert plan[:6] == ["sst", "qqp", "sts"] * 2
    assert set(plan[-10:]) == {"qqp"}  # the others' passes are done


def test_proportional_probabilities_follow_the_formula():
    schedule = _schedule(schedule="proportional", alpha=0.5)
    p = schedule.probabilities(0)
    norm = sum(n ** 0.5 for n in SIZES.values())
    for task, n in SIZES.items():
        assert p[task] == pytest.approx(n ** 0.5 / norm)
    plan = schedule.plan(0, 6000)
    assert Counter(plan)["qqp"] / 6000 == pytest.approx(p["qqp"], abs=0.03)


def test_proportional_alpha_zero_is_uniform():
    assert _schedule(schedule="proportional", alpha=0.0).probabilities(0) == {
        t: pytest.approx(1 / 3) for t in SIZES}


def test_annealed_moves_alpha_from_start_to_end():
    schedule = _schedule(schedule="annealed", epochs=5)  # defaults 1.0 -> 0.2
    assert schedule.alpha(0) == pytest.approx(1.0)
    assert schedule.alpha(2) == pytest.approx(0.6)
    assert schedule.alpha(4) == pytest.approx(0.2)
    first, last = schedule.probabilities(0), schedule.probabilities(4)
    assert first["qqp"] == pytest.approx(3200 / 4200)
    norm = sum(n ** 0.2 for n in SIZES.values())
    assert last["sts"] == pytest.approx(200 ** 0.2 / norm)
    assert last["qqp"] < first["qqp"] and last["sts"] > first["sts"]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_runs_with_defaults_and_is_seeded(name):
    schedule = _schedule(schedule=name)
    assert len(schedule.plan(0, 30)) == 30
    assert schedule.plan(1, 30) == _schedule(schedule=name).plan(1, 30)
    assert len(schedule.plan(0, None)) == total_batches(schedule, 0, 1) == sum(BATCHES.values())
    assert total_batches(schedule, 10, 4) == 40
