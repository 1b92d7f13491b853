"""Layer-wise learning rates, weight decay groups and the LR schedule."""

import pytest
import torch

from mtbert.config import ModelConfig, OptimConfig
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.heads import MultitaskModel
from mtbert.optim import linear_schedule, param_groups
from mtbert.tasks import TASKS


def _model():
    encoder = BertEncoder(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=16))
    return MultitaskModel(encoder, list(TASKS.values()), ModelConfig())


def _lr_of(groups, name):
    return next(g["lr"] for g in groups if name in g["names"])


def test_layer_decay_gives_each_layer_its_lr():
    groups = param_groups(_model(), lr=1e-3, config=OptimConfig(layer_decay=0.5))
    assert _lr_of(groups, "heads.sst.mlp.1.weight") == pytest.approx(1e-3)
    assert _lr_of(groups, "encoder.pooler.weight") == pytest.approx(1e-3)
    assert _lr_of(groups, "encoder.layers.2.ffn_up.weight") == pytest.approx(1e-3)  # top, l=3
    assert _lr_of(groups, "encoder.layers.1.attn.qkv.weight") == pytest.approx(5e-4)
    assert _lr_of(groups, "encoder.layers.0.attn.qkv.weight") == pytest.approx(2.5e-4)
    assert _lr_of(groups, "encoder.word_emb.weight") == pytest.approx(1.25e-4)  # xi^L


def test_no_decay_on_biases_and_layernorms_and_decay_off_is_uniform():
    groups = param_groups(_model(), lr=1e-3, config=OptimConfig(weight_decay=0.1))
    for group in groups:
        for name in group["names"]:
            no_decay = name.endswith("bias") or "norm" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert {g["lr"] for g in groups} == {1e-3}
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(_model().parameters()))


def test_linear_warmup_then_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_schedule(opt, warmup=0.2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
