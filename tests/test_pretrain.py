"""`mtbert pretrain`: BERT's masking, the MLM head's checkpoint weights, an encoder directory
that loads and trains, resume after a kill, and bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mtbert.pretrain as pretrain_module
from mtbert.cli import app
from mtbert.encoder import BertConfig, BertEncoder, load_pretrained
from mtbert.pretrain import MLM_KEYS, MaskedLMHead, PretrainOptions, mask_tokens, pretrain
from mtbert.train import train

runner = CliRunner()


def test_masking_follows_bert_and_never_touches_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 60, (400, 50), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False  # [CLS], [SEP]
    maskable[::2, 40:] = False  # padding
    inputs, labels = mask_tokens(ids, maskable, mask_id=4, vocab_size=60, prob=0.15,
                                 generator=generator)
    chosen = labels != -100
    assert not (chosen & ~maskable).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert chosen.sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)
    masked = (inputs[chosen] == 4).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / 60, abs=0.03)  # kept, or swapped for itself


def test_every_sentence_predicts_at_least_one_token():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 60, (300, 4), generator=generator)
    maskable = torch.tensor([[False, True, True, False]]).repeat(300, 1)
    _, labels = mask_tokens(ids, maskable, mask_id=4, vocab_size=60, prob=0.01,
                            generator=generator)
    assert ((labels != -100).sum(1) >= 1).all()


def test_mlm_head_takes_the_checkpoints_cls_predictions_weights():
    encoder = BertEncoder(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16))
    head = MaskedLMHead(encoder)
    state = {name: torch.full_like(head.state_dict()[ours], 0.5 + i)
             for i, (ours, name) in enumerate(MLM_KEYS.items())}
    assert head.load_hf({**state, "bert.embeddings.word_embeddings.weight": torch.zeros(1)})
    assert torch.equal(head.bias, torch.full((20,), 4.5))
    assert torch.equal(head.norm.weight, torch.full((8,), 2.5))
    # The decoder is the word embedding matrix: logits = LN(gelu(W h)) E^T + b.
    hidden = torch.randn(3, 8)
    h = torch.nn.functional.layer_norm(torch.nn.functional.gelu(hidden @ head.dense.weight.T
                                                                + head.dense.bias), (8,),
                                       head.norm.weight, head.norm.bias, 1e-12)
    torch.testing.assert_close(head(hidden, encoder.word_emb.weight),
                               h @ encoder.word_emb.weight.T + head.bias)
    fresh = MaskedLMHead(encoder)
    del state["cls.predictions.bias"]
    assert not fresh.load_hf(state)
    assert torch.equal(fresh.bias, torch.zeros(20))


def _distinct_train_sentences(task_dir) -> int:
    seen = set()
    for name, columns in (("ids-sst-train.csv", ["sentence"]),
                          ("quora-train.csv", ["sentence1", "sentence2"]),
                          ("sts-train.csv", ["sentence1", "sentence2"])):
        with open(task_dir / name) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                seen.update(row[c].strip() for c in columns)
    return len(seen)


def _pretrain_args(tiny_encoder, task_dir, out, *extra):
    return ["pretrain", "--data-dir", str(task_dir), "--out", str(out), "--device", "cpu",
            "--set", f"model.encoder={tiny_encoder}", "--set", "model.max_length=32",
            "--steps", "12", "--batch-size", "8", "--lr", "1e-3", *extra]


def test_pretrain_changes_the_encoder_and_the_result_loads_and_trains(
        tiny_encoder, task_dir, tmp_path, tiny_config):
    out = tmp_path / "pretrained"
    result = runner.invoke(app, ["-q", *_pretrain_args(tiny_encoder, task_dir, out),
                                 "--steps", "40", "--lr", "5e-3", "--log-every", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert {"config.json", "model.safetensors", "vocab.txt", "pretrain.json"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / pretrain_module.STATE_FILE).exists()
    report = json.loads((out / "pretrain.json").read_text())
    assert report["steps"] == 40 and report["mlm_head"] == "fresh"
    assert report["sentences"] == _distinct_train_sentences(task_dir)
    assert [p["step"] for p in report["curve"]] == [8, 16, 24, 32, 40]
    assert report["last"]["loss"] < report["first"]["loss"]

    before, _ = load_pretrained(str(tiny_encoder))
    after, directory = load_pretrained(str(out))
    assert directory == out
    changed = [name for name, p in after.state_dict().items()
               if not torch.equal(p, before.state_dict()[name])]
    assert "word_emb.weight" in changed and "layers.1.ffn_up.weight" in changed
    assert "pooler.weight" not in changed  # MLM does not reach BERT's pooler
    assert set(MLM_KEYS.values()) <= set(load_file(str(out / "model.safetensors")))

    summary = train(tiny_config(model={"encoder": str(out)}), run_dir=tmp_path / "run",
                    device="cpu", progress=False)
    assert 0.0 <= summary["best"]["metrics"]["overall/geometric"] <= 1.0

    # Pretraining the output again continues with its saved MLM head.
    again = runner.invoke(app, ["-q", *_pretrain_args(out, task_dir, tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "pretrain.json").read_text())["mlm_head"] == \
        "checkpoint"


class Killed(Exception):
    pass


def test_resume_after_a_kill_gives_the_uninterrupted_weights(tiny_encoder, task_dir,
                                                             tmp_path, tiny_config,
                                                             monkeypatch):
    config = tiny_config()
    options = PretrainOptions(steps=10, batch_size=8, lr=1e-3, max_length=32, save_every=4,
                              log_every=3)
    pretrain(config, out=tmp_path / "full", options=options, device="cpu", progress=False)

    def killed_before_writing(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(pretrain_module, "write_hf_encoder", killed_before_writing)
        with pytest.raises(Killed):
            pretrain(config, out=tmp_path / "killed", options=options, device="cpu",
                     progress=False)
    assert torch.load(tmp_path / "killed" / pretrain_module.STATE_FILE,
                      weights_only=True)["step"] == 8
    resumed = pretrain(config, out=tmp_path / "killed", options=options, device="cpu",
                       progress=False, resume=True)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    again = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert full.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], again[name]), name
    assert resumed["curve"] == json.loads((tmp_path / "full" / "pretrain.json").read_text())[
        "curve"]


def test_the_clip_is_an_option_and_zero_turns_it_off(tiny_config, tmp_path, monkeypatch):
    clipped_to = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        clipped_to.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    weights = {}
    for norm in (1.0, 0.05, 0.0):
        options = PretrainOptions(steps=3, batch_size=8, lr=1e-2, max_length=32,
                                  max_grad_norm=norm)
        out = tmp_path / f"clip-{norm}"
        report = pretrain(tiny_config(), out=out, options=options, device="cpu",
                          progress=False)
        assert report["options"]["max_grad_norm"] == norm
        weights[norm] = load_file(str(out / "model.safetensors"))[
            "embeddings.word_embeddings.weight"]
    assert clipped_to == [1.0] * 3 + [0.05] * 3  # every step; none without a clip
    assert not torch.equal(weights[1.0], weights[0.05])


@pytest.mark.parametrize("extra, message", [
    (["--mask-prob", "1.5"], "bad --mask-prob 1.5; valid: between 0 and 1"),
    (["--max-grad-norm", "-1"],
     "bad --max-grad-norm -1.0; valid: a finite number >= 0 (0: no clipping)"),
    (["--splits", "train,holdout"], "bad split 'holdout' in --splits; valid: train, dev, test"),
    (["--resume"], "holds no pretraining state"),
    (["--set", "data.tasks=nli"], "bad value 'nli' in data.tasks"),
])
def test_bad_input_exits_2_with_one_line(tiny_encoder, task_dir, tmp_path, extra, message):
    result = runner.invoke(app, _pretrain_args(tiny_encoder, task_dir, tmp_path / "out", *extra))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_a_non_empty_out_is_refused(tiny_encoder, task_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, _pretrain_args(tiny_encoder, task_dir, out))
    assert result.exit_code == 2 and "exists and is not empty" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_mask_token_is_a_clear_error(tmp_path, task_dir):
    from conftest import write_tiny_encoder
    encoder = write_tiny_encoder(tmp_path / "enc")
    vocab = (encoder / "vocab.txt").read_text().replace("[MASK]\n", "[MSK]\n")
    (encoder / "vocab.txt").write_text(vocab)
    result = runner.invoke(app, _pretrain_args(encoder, task_dir, tmp_path / "out"))
    assert result.exit_code == 2 and "has no [MASK] token" in result.output


def test_written_encoder_round_trips_through_the_hf_key_map(tmp_path):
    from mtbert.modeldir import write_hf_encoder
    from mtbert.tokenize import Tokenizer
    from conftest import write_tiny_encoder
    source = write_tiny_encoder(tmp_path / "src", seed=3)
    encoder, _ = load_pretrained(str(source))
    write_hf_encoder(encoder, Tokenizer(source), tmp_path / "dst")
    loaded, _ = load_pretrained(str(tmp_path / "dst"))
    for name, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
