"""Each loss-combination and gradient method has its defining property."""

import json
import math

import pytest
import torch

from conftest import ConfigReads, timeless_metrics, train_killed_and_resumed
from mtbert.balancing import LOSS_METHODS, make_loss_combiner, pcgrad_project
from mtbert.config import LossConfig, ModelConfig
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.heads import MultitaskModel
from mtbert.schedules import make_schedule
from mtbert.tasks import TASKS
from mtbert.train import train

TASK_NAMES = ["sst", "qqp", "sts"]


def _combiner(method, **loss):
    return make_loss_combiner(LossConfig(method=method, **loss), TASK_NAMES)


def test_pcgrad_removes_the_conflict_of_two_tasks():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # dot -1: they conflict
    out = pcgrad_project(grads, torch.Generator().manual_seed(0))
    assert out[0] @ grads[1] == pytest.approx(0.0, abs=1e-6)
    assert out[1] @ grads[0] == pytest.approx(0.0, abs=1e-6)
    # g1 minus its part along g2: (1, 0) - (-1/2)(-1, 1) = (0.5, 0.5)
    assert out[0].tolist() == pytest.approx([0.5, 0.5])
    assert out[1].tolist() == pytest.approx([0.0, 1.0])


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, 1.0], [0.0, 1.0, 3.0]])
    assert torch.equal(pcgrad_project(grads), grads)


def test_pcgrad_random_pairs_never_conflict_after_projection():
    torch.manual_seed(0)
    conflicts = 0
    for _ in range(100):
        grads = torch.randn(2, 8)
        conflicts += bool(grads[0] @ grads[1] < 0)
        out = pcgrad_project(grads)
        assert out[0] @ grads[1] >= -1e-5 and out[1] @ grads[0] >= -1e-5
    assert conflicts > 20  # the property was exercised


def test_pcgrad_three_tasks_fixes_each_conflict_and_spares_the_rest():
    grads = torch.tensor([[2.0, 1.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = pcgrad_project(grads, torch.Generator().manual_seed(3))
    assert out[0] @ grads[1] >= -1e-6 and out[1] @ grads[0] >= -1e-6
    assert torch.equal(out[2], grads[2])  # it conflicted with no one
    # (2, 1) - (-3/5)(-2, 1) = (0.8, 1.6)
    assert out[0].tolist() == pytest.approx([0.8, 1.6, 0.0])


def _tiny_model(**model):
    torch.manual_seed(0)
    encoder = BertEncoder(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return MultitaskModel(encoder, list(TASKS.values()), ModelConfig(dropout=0.0, **model))


def _task_losses(model):
    torch.manual_seed(1)
    ids = torch.randint(5, 20, (4, 6))
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    losses = {}
    for name, task in TASKS.items():
        out = model.heads[name](model.embed(name, ids, mask, types))
        labels = torch.tensor([0, 1, 1, 0]) if name != "sts" else torch.tensor([0., 5., 2., 1.])
        losses[name] = task.loss(out, labels if name != "qqp" else labels.float())
    return losses


def test_pcgrad_step_projects_encoder_gradients_and_keeps_head_gradients():
    model = _tiny_model()
    combiner = _combiner("pcgrad")
    combiner.backward(_task_losses(model), model, scale=1.0)
    got_head = model.heads["sts"].mlp[-1].weight.grad.clone()
    got_shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])

    model.zero_grad()
    losses = _task_losses(model)
    shared = model.shared_parameters()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss, shared, retain_graph=True, allow_unused=False)]) for loss in losses.values()]
    losses["sts"].backward()
    assert torch.allclose(got_head, model.heads["sts"].mlp[-1].weight.grad)
    expected = pcgrad_project(torch.stack(rows),
                              torch.Generator().manual_seed(0)).sum(0)
    assert torch.allclose(got_shared, expected, atol=1e-6)
    conflict = any(rows[i] @ rows[j] < 0 for i in range(3) for j in range(3))
    assert conflict != torch.allclose(got_shared, torch.stack(rows).sum(0), atol=1e-6)


def test_uncertainty_loss_is_the_formula():
    combiner = _combiner("uncertainty")
    with torch.no_grad():
        combiner.log_vars.copy_(torch.tensor([0.5, -1.0, 2.0]))
    losses = {"sst": torch.tensor(1.2), "qqp": torch.tensor(0.7), "sts": torch.tensor(3.0)}
    s = [0.5, -1.0, 2.0]
    expected = sum(0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, [1.2, 0.7, 3.0]))
    assert combiner(losses).item() == pytest.approx(expected)
    assert combiner({"qqp": torch.tensor(0.7)}).item() == \
        pytest.approx(0.5 * math.exp(1.0) * 0.7 - 0.5)


def test_liebel_loss_is_the_formula():
    combiner = _combiner("liebel")
    with torch.no_grad():
        combiner.w.copy_(torch.tensor([1.0, 2.0, 0.5]))
    losses = {"sst": torch.tensor(1.2), "qqp": torch.tensor(0.7), "sts": torch.tensor(3.0)}
    expected = sum(li / (2 * wi ** 2) + math.log(1 + wi ** 2)
                   for wi, li in zip([1.0, 2.0, 0.5], [1.2, 0.7, 3.0]))
    assert combiner(losses).item() == pytest.approx(expected)


def test_dwa_weights_follow_the_loss_ratios():
    combiner = _combiner("dwa", dwa_temperature=2.0)
    combiner.end_epoch({"sst": 2.0, "qqp": 1.0, "sts": 4.0})
    assert combiner.task_weights() == {t: pytest.approx(1.0) for t in TASK_NAMES}  # one epoch
    combiner.end_epoch({"sst": 1.0, "qqp": 0.9, "sts": 4.0})
    ratios = torch.tensor([0.5, 0.9, 1.0])
    expected = 3 * torch.softmax(ratios / 2.0, dim=0)
    assert list(combiner.task_weights().values()) == pytest.approx(expected.tolist())
    assert sum(combiner.task_weights().values()) == pytest.approx(3.0)
    losses = {"sst": torch.tensor(1.0), "sts": torch.tensor(2.0)}
    assert combiner(losses).item() == pytest.approx(expected[0].item() + 2 * expected[2].item())


def _dwa_steps(combiner, steps):
    """Drives `combiner` as the loop does: one backward per batch, then after_step; `steps`
    is each step's list of (task, loss). Returns the weights after each step."""
    weights = []
    for batches in steps:
        for task, value in batches:
            combiner.backward({task: torch.tensor(value, requires_grad=True)}, None, 1.0)
        combiner.after_step()
        weights.append(combiner.task_weights())
    return weights


def test_dwa_window_weights_act_from_the_third_window():
    combiner = _combiner("dwa", dwa_window=3, dwa_temperature=2.0)
    # A step holds one batch of each task; sst's loss halves every window, qqp's stays,
    # sts's falls by a tenth.
    steps = [[("sst", 2.0 * 0.5 ** (s // 3)), ("qqp", 1.0), ("sts", 4.0 * 0.9 ** (s // 3))]
             for s in range(9)]
    weights = _dwa_steps(combiner, steps)
    assert weights[:5] == [dict.fromkeys(TASK_NAMES, 1.0)] * 5  # steps 1-5: w = 1
    for step in (5, 8):  # after windows 2 (steps 4-6) and 3 (steps 7-9)
        expected = 3 * torch.softmax(torch.tensor([0.5, 1.0, 0.9]) / 2.0, dim=0)
        assert list(weights[step].values()) == pytest.approx(expected.tolist())
    assert weights[5]["sst"] < weights[5]["sts"] < weights[5]["qqp"]
    combiner.end_epoch({"sst": 9.0, "qqp": 0.1, "sts": 1.0})  # windows: epochs change nothing
    assert combiner.task_weights() == weights[8]


def test_dwa_window_weights_are_the_ratio_of_window_means():
    combiner = _combiner("dwa", dwa_window=2, dwa_temperature=0.5)
    steps = [[("sst", 3.0), ("qqp", 1.0)], [("sst", 1.0), ("sts", 2.0), ("sts", 4.0)],  # 1
             [("sst", 1.0), ("qqp", 0.5), ("sts", 1.0)], [("qqp", 1.5), ("qqp", 0.4)]]  # 2
    weights = _dwa_steps(combiner, steps)
    # Window means: sst 2 then 1, qqp 1 then 0.8, sts 3 then 1.
    ratios = [1.0 / 2.0, 0.8 / 1.0, 1.0 / 3.0]
    norm = sum(math.exp(r / 0.5) for r in ratios)
    assert list(weights[-1].values()) == pytest.approx([3 * math.exp(r / 0.5) / norm
                                                        for r in ratios])
    assert combiner.history.tolist() == [pytest.approx([2.0, 1.0, 3.0]),
                                         pytest.approx([1.0, 0.8, 1.0])]
    assert combiner({"sts": torch.tensor(2.0)}).item() == pytest.approx(2.0 * weights[-1]["sts"])


def test_dwa_window_keeps_its_weights_while_a_task_misses_a_window():
    combiner = _combiner("dwa", dwa_window=1)
    every = [("sst", 2.0), ("qqp", 1.0), ("sts", 1.0)]
    no_qqp = [("sst", 1.0), ("sts", 0.5)]
    weights = _dwa_steps(combiner, [every, every, [("sst", 1.0), ("qqp", 1.0), ("sts", 0.5)],
                                    no_qqp, every, every])
    assert weights[1] == dict.fromkeys(TASK_NAMES, pytest.approx(1.0))  # ratios 1: even
    moved = weights[2]
    assert moved["qqp"] > moved["sts"] and moved["qqp"] > moved["sst"]
    assert weights[3] == weights[4] == moved  # qqp absent from window 4: no ratio 4/3 or 5/4
    assert weights[5] == dict.fromkeys(TASK_NAMES, pytest.approx(1.0))  # 6/5: all even


def test_dwa_without_a_window_is_per_epoch_and_keeps_its_state():
    combiner = _combiner("dwa")
    _dwa_steps(combiner, [[("sst", 2.0 ** -s), ("qqp", 1.0), ("sts", 1.0)] for s in range(6)])
    assert combiner.task_weights() == dict.fromkeys(TASK_NAMES, 1.0)  # steps change nothing
    assert set(combiner.state_dict()) == {"history", "weights"}  # as before dwa_window
    assert set(_combiner("dwa", dwa_window=5).state_dict()) == \
        {"history", "weights", "window_sum", "window_batches", "steps"}


def test_dwa_window_state_travels_with_the_state_dict():
    steps = [[("sst", 1.0 + s), ("qqp", 1.0), ("sts", 2.0 / (1 + s))] for s in range(10)]
    whole = _combiner("dwa", dwa_window=3)
    _dwa_steps(whole, steps)
    first = _combiner("dwa", dwa_window=3)
    _dwa_steps(first, steps[:4])  # stopped inside the second window
    resumed = _combiner("dwa", dwa_window=3)
    resumed.load_state_dict(first.state_dict())
    assert resumed._steps == 4
    _dwa_steps(resumed, steps[4:])
    assert resumed.task_weights() == whole.task_weights() != dict.fromkeys(TASK_NAMES, 1.0)


def test_resume_with_dwa_windows_across_epochs_matches_the_uninterrupted_run(tiny_config,
                                                                            tmp_path):
    # Windows of 4 steps in epochs of 6: the run is killed inside its second window.
    config = tiny_config(loss={"method": "dwa", "dwa_window": 4}, train={"epochs": 3})
    full, resumed = train_killed_and_resumed(config, tmp_path, kill_epoch=0)
    assert resumed["best"] == full["best"]
    records = timeless_metrics(tmp_path / "killed")
    assert records == timeless_metrics(tmp_path / "full")
    weights = [[r[f"loss_weight/{t}"] for t in TASK_NAMES] for r in records]
    assert weights[0] == [1.0, 1.0, 1.0]  # step 6: one window ended
    assert weights[1] != [1.0, 1.0, 1.0] and weights[2] != weights[1]  # after steps 8, 12, 16


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    model = _tiny_model()
    combiner = _combiner("gradnorm")
    optimizer = torch.optim.SGD(combiner.parameters(), lr=0.05)
    losses = _task_losses(model)
    W = model.last_shared_weight()
    norms = [torch.autograd.grad(loss, W, retain_graph=True)[0].norm().item()
             for loss in losses.values()]
    combiner.backward(losses, model, scale=1.0)
    optimizer.step()
    combiner.after_step()
    weights = combiner.task_weights()
    assert sum(weights.values()) == pytest.approx(3.0)
    # First step: all loss ratios are 1, so the target is the mean norm for every task.
    largest, smallest = max(range(3), key=norms.__getitem__), min(range(3), key=norms.__getitem__)
    assert weights[TASK_NAMES[largest]] < 1.0 < weights[TASK_NAMES[smallest]]


@pytest.mark.parametrize("method", ["uncertainty", "liebel", "gradnorm"])
def test_learned_weights_move_during_training(tiny_config, tmp_path, method):
    config = tiny_config(loss={"method": method}, train={"epochs": 2})
    train(config, run_dir=tmp_path / method, device="cpu", progress=False)
    records = [json.loads(line) for line in
               (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    initial = _combiner(method).task_weights()
    for record in records:
        assert set(k for k in record if k.startswith("loss_weight/")) == \
            {f"loss_weight/{t}" for t in TASK_NAMES}
    last = {t: records[-1][f"loss_weight/{t}"] for t in TASK_NAMES}
    assert any(abs(last[t] - initial[t]) > 1e-3 for t in TASK_NAMES), last
    assert records[0] != records[1]


def _pcgrad_steps(config, run_dir, monkeypatch) -> tuple[dict, list[list[tuple]]]:
    """The run's summary, and what the loop did in each optimizer step, in order: each
    training batch cut ("batch", task, size) and each PCGrad backward ("backward", tasks)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from mtbert.balancing import PCGrad
    from mtbert.data import EncodedSet

    events = []
    cut, backward = EncodedSet.batch, PCGrad.backward

    def record_batch(self, indices):
        events.append(("batch", self.task.name, len(indices)))
        return cut(self, indices)

    def record_backward(self, losses, model, scale):
        events.append(("backward", tuple(sorted(losses))))
        return backward(self, losses, model, scale)

    monkeypatch.setattr(EncodedSet, "batch", record_batch)
    monkeypatch.setattr(PCGrad, "backward", record_backward)
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: events.append(("step",)))
    try:
        summary = train(config, run_dir=run_dir, device="cpu", progress=False)
    finally:
        hook.remove()
    last_step = max(i for i, e in enumerate(events) if e == ("step",))
    steps, current = [], []
    for event in events[:last_step + 1]:  # after the last step: the dev set's batches
        if event == ("step",):
            steps.append(current)
            current = []
        else:
            current.append(event)
    return summary, steps


@pytest.mark.parametrize("schedule", ["triple_batch", "round_robin_batch"])
def test_pcgrad_trains_with_one_batch_of_every_task_per_step(tiny_config, tmp_path, schedule,
                                                             monkeypatch):
    config = tiny_config(loss={"method": "pcgrad"}, train={"schedule": schedule, "epochs": 1})
    summary, steps = _pcgrad_steps(config, tmp_path / schedule, monkeypatch)
    assert summary["steps"] == 6
    # Every optimizer step: one batch of 8 of each task, then one backward of all three.
    assert len(steps) == 6
    for step in steps:
        assert sorted(step[:3]) == [("batch", "qqp", 8), ("batch", "sst", 8), ("batch", "sts", 8)]
        assert step[3:] == [("backward", ("qqp", "sst", "sts"))]
    record = json.loads((tmp_path / schedule / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/loss_sst", "train/loss_qqp", "train/loss_sts"} <= set(record)


def test_pcgrad_with_sampling_gets_the_drawn_tasks_of_each_step(tiny_config, tmp_path,
                                                                monkeypatch, caplog):
    config = tiny_config(loss={"method": "pcgrad"},
                         train={"schedule": "proportional", "batches_per_step": 3, "epochs": 1})
    with caplog.at_level("WARNING", logger="mtbert"):
        summary, steps = _pcgrad_steps(config, tmp_path / "p", monkeypatch)
    assert "gives most steps a single task" not in caplog.text
    plan = make_schedule(config.train, dict.fromkeys(TASK_NAMES, 6),
                         dict.fromkeys(TASK_NAMES, 48)).plan(0, 18)
    assert summary["steps"] == len(steps) == 6
    for i, step in enumerate(steps):
        drawn = plan[3 * i:3 * i + 3]
        # Three batches of 8 as drawn, then one backward of their tasks (a task drawn
        # twice: its two losses summed into one).
        assert step[:3] == [("batch", task, 8) for task in drawn]
        assert step[3:] == [("backward", tuple(sorted(set(drawn))))]
    assert any(len(set(plan[i:i + 3])) > 1 for i in range(0, 18, 3))


def test_gradient_conflict_readings_are_logged_and_leave_training_unchanged(tiny_config,
                                                                            tmp_path):
    plain = train(tiny_config(), run_dir=tmp_path / "plain", device="cpu", progress=False)
    config = tiny_config(train={"log_grad_conflict_every": 2})
    probed = train(config, run_dir=tmp_path / "probed", device="cpu", progress=False)
    assert probed["best"] == plain["best"]
    readings = [json.loads(line) for line in
                (tmp_path / "probed" / "grad_conflict.jsonl").read_text().splitlines()]
    assert [r["step"] for r in readings] == [2, 4, 6, 8, 10, 12]
    pairs = {"grad_cos/sst-qqp", "grad_cos/sst-sts", "grad_cos/qqp-sts"}
    assert all(set(r) == pairs | {"step"} for r in readings)
    assert all(-1.0 <= r[k] <= 1.0 for r in readings for k in pairs)
    record = json.loads((tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["grad_cos/sst-qqp"] == pytest.approx(
        sum(r["grad_cos/sst-qqp"] for r in readings[:3]) / 3, abs=1e-5)


@pytest.mark.parametrize("method", ["dwa", "pcgrad", "gradnorm"])
def test_resume_keeps_the_method_state(tiny_config, tmp_path, method):
    config = tiny_config(loss={"method": method}, train={"epochs": 3})
    full, resumed = train_killed_and_resumed(config, tmp_path, kill_epoch=1)
    assert resumed["best"] == full["best"]
    assert timeless_metrics(tmp_path / "killed") == timeless_metrics(tmp_path / "full")


def test_every_method_is_registered():
    assert set(LOSS_METHODS) == {"sum", "weighted", "uncertainty", "liebel", "dwa", "gradnorm",
                                 "pcgrad"}



def _one_step(combiner, model, losses) -> None:
    """Backpropagate one optimizer step's task losses as the training loop does: at once
    for a per-step method, batch by batch otherwise; then the method's after-step."""
    if combiner.per_step:
        combiner.backward(losses, model, scale=1.0)
    else:
        for task, loss in losses.items():
            combiner.backward({task: loss}, model, scale=1.0)
    combiner.after_step()

@pytest.mark.parametrize("method", sorted(LOSS_METHODS))
def test_a_method_declares_the_keys_it_reads(method):
    config = ConfigReads("loss", LossConfig(method=method))
    combiner = LOSS_METHODS[method](config, TASK_NAMES)
    model = _tiny_model()
    for epoch in range(3):
        model.zero_grad()
        losses = _task_losses(model)
        _one_step(combiner, model, losses)
        combiner.end_epoch({t: 1.0 / (epoch + 1) for t in TASK_NAMES})
    combiner.task_weights()
    # The loop trains a method's parameters at loss.weight_lr (train._make_optimizer).
    trained = {"loss.weight_lr"} if list(combiner.parameters()) else set()
    assert config.read | trained == set(combiner.reads)


def test_pcgrad_step_counter_travels_with_the_state_dict():
    combiner = _combiner("pcgrad")
    model = _tiny_model()
    for _ in range(3):
        combiner.backward(_task_losses(model), model, scale=1.0)
    restored = _combiner("pcgrad")
    restored.load_state_dict(combiner.state_dict())
    assert restored.steps == combiner.steps == 3


@pytest.mark.parametrize("method, window", [(m, 0) for m in sorted(LOSS_METHODS)] +
                         [("dwa", 1)])
def test_a_step_builds_no_tensor_from_python_values(method, window, monkeypatch):
    """torch.tensor(list, device=cuda), .item() and `if tensor` block the host on a GPU;
    after the first step (GradNorm builds its index tensor then, once) no method does
    any, nor dwa at the end of a window (window 1: every step ends one)."""
    model = _tiny_model()
    combiner = _combiner(method, weights={"sst": 2.0}, dwa_window=window)
    calls = []
    tensor, item, as_bool = torch.tensor, torch.Tensor.item, torch.Tensor.__bool__
    for step in range(2):
        model.zero_grad()
        losses = _task_losses(model)  # labels made with torch.tensor: before the watch
        if step == 1:
            monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append("tensor") or
                                tensor(*a, **k))
            monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item") or item(t))
            monkeypatch.setattr(torch.Tensor, "__bool__",
                                lambda t: calls.append("bool") or as_bool(t))
        _one_step(combiner, model, losses)
        monkeypatch.undo()
    assert calls == []
    if method == "gradnorm":  # built once per task order and device, then reused
        assert combiner._index_tensor(tuple(TASK_NAMES)) is \
            combiner._index_tensor(tuple(TASK_NAMES))
        assert combiner._index_tensor(tuple(TASK_NAMES)).tolist() == [0, 1, 2]
