"""The auxiliary contrastive losses, the cosine and 6-class STS heads: hand-computed values on
tiny batches, packed == padded, training, loading, predicting, and bad combinations."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import train_killed_and_resumed
from mtbert.cli import app
from mtbert.config import LossConfig, ModelConfig, build_config
from mtbert.data import Batch, pack_rows
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.errors import ConfigError
from mtbert.predictor import load
from mtbert.heads import CosineHead, MultitaskModel
from mtbert.contrastive import CONTRASTIVE_LOSSES
from mtbert.tasks import TASKS, ScoreClassesTask, get_task
from mtbert.train import train

runner = CliRunner()

# Two pairs: u = (e1, e2), v = (e1, e1 + e2). cos matrix C_ij = cos(u_i, v_j):
#   C = [[1, 1/sqrt2], [0, 1/sqrt2]]
U = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
V = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
R = 1 / math.sqrt(2)


def _loss(name, **config):
    return CONTRASTIVE_LOSSES[name](LossConfig(**config))


def test_mnrl_anchors_only_the_positive_pairs():
    mnrl = _loss("mnrl", mnrl_scale=1.0)
    # QQP: only pair 0 is a duplicate; its row of logits is (1, 1/sqrt2), target 0.
    one = mnrl(U, V, TASKS["qqp"], torch.tensor([1.0, 0.0]))
    assert one.item() == pytest.approx(-math.log(math.e / (math.e + math.exp(R))), abs=1e-6)
    # Both duplicates: mean of row 0 (target 0) and row 1 = (0, 1/sqrt2), target 1.
    both = mnrl(U, V, TASKS["qqp"], torch.tensor([1.0, 1.0]))
    row1 = -math.log(math.exp(R) / (1 + math.exp(R)))
    assert both.item() == pytest.approx((one.item() + row1) / 2, abs=1e-6)
    # No positive pair: nothing to rank, zero.
    assert mnrl(U, V, TASKS["qqp"], torch.tensor([0.0, 0.0])).item() == 0.0


def test_mnrl_scale_and_sts_threshold():
    mnrl = _loss("mnrl", mnrl_scale=20.0, mnrl_threshold=4.0)
    # STS 4.5 >= 4 is an anchor, 3.9 is not; logits of row 0 are 20 * (1, 1/sqrt2).
    value = mnrl(U, V, TASKS["sts"], torch.tensor([4.5, 3.9])).item()
    assert value == pytest.approx(math.log(1 + math.exp(20 * R - 20)), rel=1e-5)
    assert _loss("mnrl", mnrl_threshold=5.0)(U, V, TASKS["sts"],
                                              torch.tensor([4.5, 3.9])).item() == 0.0


def test_cosine_mse_against_the_label_diagonal():
    mse = _loss("cosine_mse")
    # QQP labels (1, 0): T = diag(1, 0); squared errors 0, 1/2, 0, 1/2 over 4 entries.
    assert mse(U, V, TASKS["qqp"], torch.tensor([1.0, 0.0])).item() == pytest.approx(0.25)
    # STS scores (5, 2.5) -> T = diag(1, 0.5).
    want = (0 + R**2 + 0 + (R - 0.5) ** 2) / 4
    assert mse(U, V, TASKS["sts"], torch.tensor([5.0, 2.5])).item() == pytest.approx(want)


def test_cosine_head_predicts_five_times_the_cosine():
    head = CosineHead(TASKS["sts"])
    out = head(U, V)
    assert out.shape == (2, 1)
    assert out.squeeze(-1).tolist() == pytest.approx([5.0, 5 * R])
    assert list(head.parameters()) == []


def test_six_class_head_loss_and_expected_score():
    task = get_task("sts", score_head="classes")
    assert isinstance(task, ScoreClassesTask) and task.num_outputs == 6
    # Row 0 uniform; row 1 puts weight 4 on score 5: p = (1, 1, 1, 1, 1, 4) / 9.
    logits = torch.tensor([[0.0] * 6, [0.0] * 5 + [math.log(4.0)]])
    assert task.predict(logits).tolist() == pytest.approx([2.5, (0 + 1 + 2 + 3 + 4 + 20) / 9])
    # Gold 2.5 rounds half up to class 3 (p = 1/6), gold 4.6 to class 5 (p = 4/9).
    loss = task.loss(logits, torch.tensor([2.5, 4.6])).item()
    assert loss == pytest.approx((math.log(6) - math.log(4 / 9)) / 2, rel=1e-6)
    # The score is still Pearson of the predictions, the file format still a score.
    assert task.metric_key == "sts/pearson" and task.format_prediction(3.25) == "3.2500"


TINY = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _rows(lengths, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(5, 50, size=n).astype(np.int64), np.zeros(n, dtype=np.int64))
            for n in lengths]


def _padded(rows):
    T = max(len(ids) for ids, _ in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T,
                                                                          dtype=torch.long)
    for r, (i, _) in enumerate(rows):
        ids[r, :len(i)], mask[r, :len(i)] = torch.from_numpy(i), 1
    return ids, mask, torch.zeros_like(ids)


@pytest.mark.parametrize("sts_head, contrastive", [("regression", "mnrl"),
                                                   ("cosine", "cosine_mse"),
                                                   ("classes", "mnrl")])
def test_packed_and_padded_give_the_same_head_output_aux_loss_and_gradients(sts_head,
                                                                           contrastive):
    a, b = _rows([4, 30, 9, 2], seed=1), _rows([25, 3, 12, 7], seed=2)
    labels = torch.tensor([4.5, 1.0, 4.0, 0.2])
    task = get_task("sts", score_head=sts_head)
    aux = CONTRASTIVE_LOSSES[contrastive](LossConfig())
    results = []
    for batch in (Batch("sts", [_padded(a), _padded(b)], labels, np.arange(4)),
                  Batch("sts", [pack_rows(a + b, groups=2)], labels, np.arange(4))):
        torch.manual_seed(0)
        model = MultitaskModel(BertEncoder(TINY), [task], ModelConfig(
            pair_encoding="siamese", sts_head=sts_head, dropout=0.0, pooling="mean")).eval()
        u, v = model.sentence_pair(batch)
        out = model.pair_output("sts", u, v)
        torch.testing.assert_close(out, model(batch))  # forward is the same path
        loss = task.loss(out, labels) + aux(u, v, task, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), loss.item(), grads))
    assert results[0][0].shape == (4, task.num_outputs)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_task_loss_is_the_head_loss_plus_the_weighted_auxiliary_loss():
    a, b = _rows([4, 6, 9, 3], seed=5), _rows([7, 3, 5, 8], seed=6)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    batch = Batch("qqp", [_padded(a), _padded(b)], labels, np.arange(4))
    torch.manual_seed(0)
    model = MultitaskModel(BertEncoder(TINY), [TASKS["qqp"]], ModelConfig(
        pair_encoding="siamese", dropout=0.0)).eval()
    mnrl = CONTRASTIVE_LOSSES["mnrl"](LossConfig())
    u, v = model.sentence_pair(batch)
    head = TASKS["qqp"].loss(model.pair_output("qqp", u, v), labels)
    aux = mnrl(u, v, TASKS["qqp"], labels)
    with_aux = model.task_loss(batch, mnrl, weight=0.3)
    assert with_aux.auxiliary.item() == pytest.approx(aux.item(), rel=1e-6)
    assert with_aux.total.item() == pytest.approx(head.item() + 0.3 * aux.item(), rel=1e-6)
    plain = model.task_loss(batch)
    assert plain.auxiliary is None and plain.total.item() == pytest.approx(head.item(), rel=1e-6)
    concat = MultitaskModel(BertEncoder(TINY), [TASKS["qqp"]], ModelConfig())
    with pytest.raises(ConfigError, match="auxiliary mnrl loss of qqp needs "
                                          "model.pair_encoding=siamese"):
        concat.task_loss(Batch("qqp", [_padded(a)], labels, np.arange(4)), mnrl)


@pytest.mark.parametrize("sts_head, contrastive, packing", [
    ("cosine", "none", "packed"), ("classes", "mnrl", "padded"),
    ("regression", "cosine_mse", "packed"), ("cosine", "mnrl", "packed")])
def test_training_with_each_option_logs_exports_and_predicts(tiny_config, tmp_path, sts_head,
                                                            contrastive, packing):
    # Dev batches of 64, as `mtbert eval` scores below (MultitaskPredictor's batch size):
    # see the end of the test.
    config = tiny_config(model={"pair_encoding": "siamese", "sts_head": sts_head},
                         loss={"contrastive": contrastive, "contrastive_weight": 0.5},
                         train={"packing": packing, "eval_batch_size": 64})
    summary = train(config, run_dir=tmp_path / "run", device="cpu", progress=False)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert -1.0 <= record["sts/pearson"] <= 1.0
        has_aux = {k for k in record if k.startswith("train/contrastive_")}
        assert has_aux == (set() if contrastive == "none" else
                           {"train/contrastive_qqp", "train/contrastive_sts"})
        assert all(math.isfinite(record[k]) and record[k] >= 0 for k in has_aux)
    model_dir = tmp_path / "run" / "model"
    assert f"sts_head: {sts_head}" in (model_dir / "config.yaml").read_text()
    model = load(model_dir)
    scores = model.predict("sts", [("good movie", "good movie"), ("the cat", "fast piano")])
    if sts_head == "cosine":
        # Identical sentences, identical embeddings: 5 * cos = 5.
        assert scores[0] == pytest.approx(5.0, abs=1e-4)
    if sts_head == "classes":
        assert all(0.0 <= s <= 5.0 for s in scores)
        assert model.model.heads["sts"].mlp[-1].out_features == 6
    # The exported model scores the dev files as training did. Batched alike, packed
    # (training) and padded (`mtbert eval`) give the same bits here. In batches of 16
    # against 64 some predictions move by one float32 ulp (4.8e-7 at 5.0), and the cosine
    # head of this barely trained model scores every dev pair 4.9997..5.0000 (std 9e-5):
    # one ulp then moves Pearson by up to 2.4e-4. Rounding, not a bug; so the same batches.
    result = runner.invoke(app, ["eval", str(model_dir), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == pytest.approx(summary["best"]["metrics"], abs=1e-6)


@pytest.mark.parametrize("sts_head", ["cosine", "classes"])
def test_sts_heads_fit_a_batch(sts_head):
    """Gradients reach the encoder through the cosine head (it has no weights of its own)
    and through the class head: 40 Adam steps on one batch cut its loss by far."""
    a, b = _rows([5, 8, 6, 9, 4, 7], seed=3), _rows([6, 5, 9, 4, 8, 7], seed=4)
    batch = Batch("sts", [pack_rows(a + b, groups=2)],
                  torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), np.arange(6))
    task = get_task("sts", score_head=sts_head)
    torch.manual_seed(0)
    model = MultitaskModel(BertEncoder(TINY), [task], ModelConfig(
        pair_encoding="siamese", sts_head=sts_head, dropout=0.0, pooler="none"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = task.loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_resume_with_the_new_heads_matches_the_uninterrupted_run(tiny_config, tmp_path):
    config = tiny_config(model={"pair_encoding": "siamese", "sts_head": "classes"},
                         loss={"contrastive": "mnrl"})
    full, resumed = train_killed_and_resumed(config, tmp_path)
    assert resumed["best"] == full["best"]


@pytest.mark.parametrize("sets, message", [
    (["model.sts_head=cosine"], "model.sts_head=cosine .*set model.pair_encoding=siamese"),
    (["loss.contrastive=mnrl"], "loss.contrastive=mnrl needs one embedding per sentence"),
    (["model.sts_head=ordinal"], "model.sts_head; valid: regression, cosine, classes"),
    (["loss.contrastive=simcse"], "loss.contrastive; valid: none, mnrl, cosine_mse"),
    (["model.pair_encoding=siamese", "loss.contrastive=mnrl", "loss.contrastive_tasks=sst"],
     "'sst' in loss.contrastive_tasks; valid: qqp, sts"),
    (["model.pair_encoding=siamese", "loss.contrastive=mnrl", "data.tasks=sst",
      "train.select_metric=sst/acc"], "none of loss.contrastive_tasks"),
])
def test_bad_combinations_exit_2_with_one_line(tiny_encoder, task_dir, tmp_path, sets, message):
    args = ["train", "--data-dir", str(task_dir), "--out", str(tmp_path / "run"),
            "--set", f"model.encoder={tiny_encoder}"]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtbert: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_config_show_documents_the_new_keys():
    result = runner.invoke(app, ["config", "--show"])
    for key in ("model.sts_head", "loss.contrastive ", "loss.contrastive_weight",
                "loss.contrastive_tasks", "loss.mnrl_scale", "loss.mnrl_threshold"):
        assert key in result.stdout
    with pytest.raises(ConfigError, match="mnrl_scale"):
        build_config({"loss": {"mnrl_scale": 0}})
