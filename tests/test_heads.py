"""Every head option gives the right output shape and range on a tiny model."""

import itertools
import math

import numpy as np
import pytest
import torch

from mtbert.config import ModelConfig
from mtbert.data import Batch
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.heads import MultitaskModel
from mtbert.tasks import TASKS

TINY = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)


def _view(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T // 2:] = 0
    return ids, mask, torch.zeros_like(ids)


def _batch(task, views):
    return Batch(task, views, None, np.arange(views[0][0].shape[0]))


@pytest.mark.parametrize("pooling, pooler, pairs, hidden", list(itertools.product(
    ["cls", "mean"], ["shared", "per_task", "none"], ["concat", "siamese"], [0, 16])))
def test_output_shapes(pooling, pooler, pairs, hidden):
    torch.manual_seed(0)
    config = ModelConfig(pooling=pooling, pooler=pooler, pair_encoding=pairs, head_hidden=hidden,
                         siamese_cosine=pairs == "siamese")
    model = MultitaskModel(BertEncoder(TINY), list(TASKS.values()), config).eval()
    pair_views = [_view(3, 7, 1), _view(3, 5, 2)] if pairs == "siamese" else [_view(3, 9, 1)]
    assert model(_batch("sst", [_view(3, 6, 0)])).shape == (3, 5)
    assert model(_batch("qqp", pair_views)).shape == (3, 1)
    assert model(_batch("sts", pair_views)).shape == (3, 1)
    assert ("poolers.sst.weight" in dict(model.named_parameters())) == (pooler == "per_task")


def test_siamese_features_include_cosine():
    model = MultitaskModel(BertEncoder(TINY), [TASKS["sts"]],
                           ModelConfig(pair_encoding="siamese", siamese_cosine=True))
    assert model.heads["sts"].mlp[-1].in_features == 4 * 32 + 1


def test_hidden_layer_and_mean_pooling_ignore_padding():
    torch.manual_seed(0)
    model = MultitaskModel(BertEncoder(TINY), [TASKS["sst"]],
                           ModelConfig(pooling="mean", head_hidden=16, pooler="none")).eval()
    assert [type(m).__name__ for m in model.heads["sst"].mlp] == [
        "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    ids, mask, types = _view(2, 6, 3)
    short = model(_batch("sst", [(ids[:, :3], mask[:, :3], types[:, :3])]))
    padded_ids = torch.cat([ids[:, :3], torch.zeros(2, 3, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask[:, :3], torch.zeros(2, 3, dtype=torch.long)], 1)
    padded = model(_batch("sst", [(padded_ids, padded_mask, torch.zeros_like(padded_ids))]))
    assert torch.allclose(short, padded, atol=1e-5)


@pytest.mark.parametrize("output", ["sigmoid", "clamp"])
def test_sts_output_range(output):
    torch.manual_seed(0)
    model = MultitaskModel(BertEncoder(TINY), [TASKS["sts"]],
                           ModelConfig(sts_output=output)).eval()
    batch = _batch("sts", [_view(4, 6, 0)])
    last = model.heads["sts"].mlp[-1]
    with torch.no_grad():
        free = model(batch).squeeze(-1)
        # A bias far beyond either bound: the output must stop at that bound.
        last.bias.fill_(-100.0)
        lowest = model(batch).squeeze(-1)
        last.bias.fill_(100.0)
        highest = model(batch).squeeze(-1)
        # No weights, bias 1.5: inside the range the transform is the documented one.
        last.weight.zero_()
        last.bias.fill_(1.5)
        inside = model(batch).squeeze(-1)
    assert ((free >= 0.0) & (free <= 5.0)).all(), free
    assert ((lowest >= 0.0) & (highest <= 5.0)).all()
    assert lowest.tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert highest.tolist() == pytest.approx([5.0] * 4, abs=1e-6)
    middle = 1.5 if output == "clamp" else 5 / (1 + math.exp(-1.5))
    assert inside.tolist() == pytest.approx([middle] * 4)
