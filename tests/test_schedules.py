"""Each task-sampling schedule does what its docstring says."""

from collections import Counter

import pytest

import math

from conftest import ConfigReads
from mtbert.config import TrainConfig
from mtbert.schedules import SCHEDULES, epoch_batches, make_schedule, optimizer_steps, step_size

SIZES = {"sst": 800, "qqp": 3200, "sts": 200}
BATCHES = {"sst": 25, "qqp": 100, "sts": 7}


def _schedule(every_task_per_step=False, **train):
    config = TrainConfig(**train)
    return make_schedule(config, BATCHES, SIZES, every_task_per_step=every_task_per_step)


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


def test_annealed_cosine_is_slow_at_both_ends():
    schedule = _schedule(schedule="annealed", epochs=5, alpha_shape="cosine")
    alphas = [schedule.alpha(e) for e in range(5)]
    expected = [1.0 - 0.8 * (1 - math.cos(math.pi * e / 4)) / 2 for e in range(5)]
    assert alphas == pytest.approx(expected)
    assert alphas[2] == pytest.approx(0.6)  # the same midpoint as linear
    assert alphas[0] - alphas[1] < 0.2 < alphas[1] - alphas[2]


def test_temperature_probabilities_follow_the_formula():
    schedule = _schedule(schedule="temperature", temperature=4.0)
    p = schedule.probabilities(0)
    norm = sum(n ** 0.25 for n in SIZES.values())
    assert p == {t: pytest.approx(n ** 0.25 / norm) for t, n in SIZES.items()}
    assert _schedule(schedule="temperature", temperature=1.0).probabilities(0)["qqp"] == \
        pytest.approx(3200 / 4200)


def _blocks(plan):
    """Consecutive runs of one task: ['a', 'a', 'b'] -> [('a', 2), ('b', 1)]."""
    runs = []
    for task in plan:
        if runs and runs[-1][0] == task:
            runs[-1] = (task, runs[-1][1] + 1)
        else:
            runs.append((task, 1))
    return runs


def test_sequential_visits_tasks_in_blocks_across_the_run():
    schedule = _schedule(schedule="sequential", epochs=2)
    run = schedule.plan(0, 9) + schedule.plan(1, 9)
    assert _blocks(run) == [("sst", 6), ("qqp", 6), ("sts", 6)]
    one_pass = schedule.plan(0, None) + schedule.plan(1, None)
    assert _blocks(one_pass) == [(t, 2 * n) for t, n in BATCHES.items()]
    assert len(schedule.plan(0, None)) == sum(BATCHES.values())


def test_round_robin_epoch_changes_task_only_at_epoch_boundaries():
    schedule = _schedule(schedule="round_robin_epoch", epochs=4)
    plans = [schedule.plan(e, 5) for e in range(4)]
    assert [set(p) for p in plans] == [{"sst"}, {"qqp"}, {"sts"}, {"sst"}]
    assert schedule.plan(1, None) == ["qqp"] * BATCHES["qqp"]
    assert epoch_batches(schedule, 2, 0, 1) == BATCHES["sts"]


def test_smart_round_robin_puts_the_target_task_last():
    schedule = _schedule(schedule="smart_round_robin")  # target sts
    plan = schedule.plan(0, 9)
    assert plan == ["sst", "qqp"] * 3 + ["sts"] * 3
    full = schedule.plan(0, None)
    assert Counter(full) == BATCHES
    assert full[-BATCHES["sts"]:] == ["sts"] * BATCHES["sts"] and "sts" not in full[:-7]
    assert _schedule(schedule="smart_round_robin", target_task="sst").plan(0, 6)[-2:] == \
        ["sst", "sst"]


def test_triple_batch_sees_every_task_every_step():
    schedule = _schedule(schedule="triple_batch")
    per_step = step_size(schedule, grad_accum=1)
    assert per_step == 3
    plan = schedule.plan(0, 4 * per_step)
    assert all(set(plan[i:i + 3]) == {"sst", "qqp", "sts"} for i in range(0, len(plan), 3))
    assert epoch_batches(schedule, 0, 0, 1) == 3 * max(BATCHES.values())  # smaller cycle
    truncated = _schedule(schedule="triple_batch", triple_batch_truncate=True)
    assert epoch_batches(truncated, 0, 0, 1) == 3 * min(BATCHES.values())
    assert epoch_batches(schedule, 0, 10, 2) == 60


def test_round_robin_groups_one_batch_per_task_for_gradient_methods():
    schedule = _schedule(schedule="round_robin_batch", every_task_per_step=True)
    assert step_size(schedule, grad_accum=1) == 3
    assert _schedule(schedule="round_robin_batch").batches_per_step == 1


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_runs_with_defaults_and_is_seeded(name):
    schedule = _schedule(schedule=name)
    per_step = step_size(schedule, 1)
    assert len(schedule.plan(0, 30 * per_step)) == 30 * per_step
    assert schedule.plan(1, 30) == _schedule(schedule=name).plan(1, 30)
    assert len(schedule.plan(0, None)) == epoch_batches(schedule, 0, 0, 1)
    assert set(schedule.plan(0, None)) <= set(SIZES)
    assert epoch_batches(schedule, 0, 10, 4) == 40 * per_step


SAMPLED = ["proportional", "annealed", "temperature"]


def _steps(plan, per_step):
    return [plan[i:i + per_step] for i in range(0, len(plan), per_step)]


@pytest.mark.parametrize("name", SAMPLED)
def test_sampled_steps_hold_batches_per_step_draws_of_mixed_tasks(name):
    schedule = _schedule(schedule=name, batches_per_step=3)
    assert step_size(schedule, grad_accum=2) == 6
    assert epoch_batches(schedule, 0, 10, 1) == 30
    steps = _steps(schedule.plan(0, 3 * 200), 3)
    assert len(steps) == 200 and all(len(step) == 3 for step in steps)
    # Mixed: 1 - sum_i p_i^3, at least 0.55 of the steps for each (alpha <= 1 at epoch 0).
    assert sum(len(set(step)) > 1 for step in steps) > 90
    # One pass keeps its batches and spends them in fewer steps.
    assert epoch_batches(schedule, 0, 0, 1) == sum(BATCHES.values()) == 132
    assert optimizer_steps(132, step_size(schedule, 1)) == 44
    assert optimizer_steps(132, step_size(_schedule(schedule=name, batches_per_step=5), 1)) == 27


def test_batches_per_step_draws_follow_the_probabilities():
    schedule = _schedule(schedule="proportional", alpha=0.5, batches_per_step=3)
    p = schedule.probabilities(0)
    steps = _steps(schedule.plan(0, 3 * 4000), 3)
    for position in range(3):  # each batch of a step drawn with the same p
        counts = Counter(step[position] for step in steps)
        assert {t: counts[t] / 4000 for t in SIZES} == {t: pytest.approx(p[t], abs=0.025)
                                                        for t in SIZES}
    # Independent draws: a step is all one task with probability sum_i p_i^3.
    one_task = sum(len(set(step)) == 1 for step in steps) / 4000
    assert one_task == pytest.approx(sum(q ** 3 for q in p.values()), abs=0.02)


# Each epoch's plan as drawn before train.batches_per_step existed (0 sst, 1 qqp, 2 sts):
# epoch 0 of 24 batches, and the first 12 batches of epoch 1 as one pass.
PLANS_BEFORE = {"proportional": ("011011101111110112011101", "011111122211"),
                "annealed": ("011011101111110112011101", "011110122211"),
                "temperature": ("011011101020110102011101", "011110122211")}


@pytest.mark.parametrize("name", SAMPLED)
def test_batches_per_step_groups_the_same_draws(name):
    def digits(plan):
        return "".join(str(list(SIZES).index(task)) for task in plan)

    one = _schedule(schedule=name)
    assert one.batches_per_step == 1
    assert (digits(one.plan(0, 24)), digits(one.plan(1, None)[:12])) == PLANS_BEFORE[name]
    assert _schedule(schedule=name, batches_per_step=4).plan(0, 24) == one.plan(0, 24)


@pytest.mark.parametrize("name", sorted(set(SCHEDULES) - set(SAMPLED)))
def test_other_schedules_ignore_batches_per_step(name):
    plain, keyed = _schedule(schedule=name), _schedule(schedule=name, batches_per_step=4)
    assert keyed.batches_per_step == plain.batches_per_step
    assert keyed.plan(0, 12) == plain.plan(0, 12)
    assert keyed.plan(1, None) == plain.plan(1, None)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_schedule_declares_the_keys_it_reads(name):
    config = ConfigReads("train", TrainConfig(schedule=name, epochs=3))
    schedule = SCHEDULES[name](config, BATCHES, SIZES)
    assert schedule.batches_per_step >= 1
    for epoch in range(3):
        schedule.plan(epoch, 30)
        schedule.plan(epoch, None)
    assert config.read - {"train.seed", "train.epochs"} == set(schedule.reads)
