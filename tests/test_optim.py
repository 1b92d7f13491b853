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


def test_layer_scales_give_the_documented_lr_per_group():
    config = OptimConfig(layer_scales={"0-1": 1.0, "2": 2.0, "embeddings": 0.5},
                         head_lr={"sts": 3e-3})
    groups = param_groups(_model(), lr=1e-3, config=config)
    assert _lr_of(groups, "encoder.word_emb.weight") == pytest.approx(5e-4)
    assert _lr_of(groups, "encoder.layers.0.attn.qkv.weight") == pytest.approx(1e-3)
    assert _lr_of(groups, "encoder.layers.1.ffn_up.weight") == pytest.approx(1e-3)
    assert _lr_of(groups, "encoder.layers.2.ffn_up.weight") == pytest.approx(2e-3)
    assert _lr_of(groups, "encoder.pooler.weight") == pytest.approx(1e-3)
    assert _lr_of(groups, "heads.sts.mlp.1.weight") == pytest.approx(3e-3)
    assert _lr_of(groups, "heads.sst.mlp.1.weight") == pytest.approx(1e-3)


def test_layer_scales_multiply_layer_decay():
    config = OptimConfig(layer_decay=0.5, layer_scales={"2": 2.0, "0": 4.0})
    groups = param_groups(_model(), lr=1e-3, config=config)
    assert _lr_of(groups, "encoder.layers.2.ffn_up.weight") == pytest.approx(2e-3)
    assert _lr_of(groups, "encoder.layers.0.ffn_up.weight") == pytest.approx(1e-3)  # .25 x 4


@pytest.mark.parametrize("scales, message", [
    ({"3": 2.0}, "layers 0..2"), ({"a-b": 1.0}, "'N', 'N-M'"), ({"2-1": 1.0}, "0 <= N <= M")])
def test_bad_layer_scales_name_the_key(scales, message):
    from mtbert.errors import ConfigError
    from mtbert.config import build_config
    with pytest.raises(ConfigError, match=message):
        if "3" in scales:
            param_groups(_model(), lr=1e-3, config=OptimConfig(layer_scales=scales))
        else:
            build_config({"optim": {"layer_scales": scales}})


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_choices_and_unfreeze_after():
    from mtbert.optim import apply_freezing
    model = _model()
    apply_freezing(model, OptimConfig(freeze="encoder"), epoch=0)
    assert _trainable(model) == {n for n, _ in model.named_parameters()
                                 if not n.startswith("encoder.")}
    apply_freezing(model, OptimConfig(freeze="embeddings"), epoch=0)
    frozen = {n for n, _ in model.named_parameters()} - _trainable(model)
    assert frozen == {"encoder.word_emb.weight", "encoder.pos_emb.weight",
                      "encoder.type_emb.weight", "encoder.emb_norm.weight",
                      "encoder.emb_norm.bias"}
    apply_freezing(model, OptimConfig(train_layers=[1]), epoch=0)
    encoder_trainable = {n for n in _trainable(model) if n.startswith("encoder.")}
    assert encoder_trainable and all(n.startswith("encoder.layers.1.") for n in encoder_trainable)
    config = OptimConfig(freeze="encoder", unfreeze_after=2)
    apply_freezing(model, config, epoch=1)
    assert not any(n.startswith("encoder.") for n in _trainable(model))
    apply_freezing(model, config, epoch=2)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_frozen_parameters_do_not_change_in_training(tiny_config, tmp_path):
    import mtbert
    from mtbert.encoder import load_pretrained
    from mtbert.train import train
    config = tiny_config(optim={"freeze": "encoder", "weight_decay": 0.1}, train={"epochs": 1})
    train(config, run_dir=tmp_path / "frozen", device="cpu", progress=False)
    before, _ = load_pretrained(config.model.encoder)
    after = mtbert.load(tmp_path / "frozen" / "model").model
    for name, param in before.state_dict().items():
        assert torch.equal(param, after.encoder.state_dict()[name]), name
    config = tiny_config(optim={"train_layers": [1]}, train={"epochs": 1})
    train(config, run_dir=tmp_path / "probe", device="cpu", progress=False)
    after = mtbert.load(tmp_path / "probe" / "model").model
    changed = {n for n, p in before.state_dict().items()
               if not torch.equal(p, after.encoder.state_dict()[n])}
    assert changed and all(n.startswith("layers.1.") for n in changed)


def test_bad_train_layer_names_the_valid_range(tiny_config, tmp_path):
    from mtbert.errors import ConfigError
    from mtbert.train import train
    with pytest.raises(ConfigError, match=r"layer 5, but the encoder has layers 0..1"):
        train(tiny_config(optim={"train_layers": [5]}), run_dir=tmp_path / "x", device="cpu",
              progress=False)
