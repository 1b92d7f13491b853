"""The benchmark command runs on CPU with a tiny checkpoint and prints its ratio line."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_encoder

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def encoder_without_dropout(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("no-dropout"), hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("extra", [["--batch-size", "8"], ["--tokens-per-step", "200"],
                                   ["--batch-size", "8", "--packed-attention", "nested"]])
def test_train_step_bench_prints_both_sides_and_the_ratio(encoder_without_dropout, task_dir,
                                                          tmp_path, monkeypatch, capsys, extra):
    import transformers  # noqa: F401 - the peer; a dev dependency, never skipped

    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    bench = _load_bench()
    # No dropout anywhere (encoder above, heads here): both sides compute the same function.
    build_config = bench.build_config
    monkeypatch.setattr(bench, "build_config", lambda data: build_config(
        {**data, "model": {**data["model"], "dropout": 0.0}}))
    sides = []

    class RecordedSide(bench.Side):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sides.append(self)

    monkeypatch.setattr(bench, "Side", RecordedSide)
    out = tmp_path / "bench.json"
    ratio = bench.main(["--device", "cpu", "--encoder", str(encoder_without_dropout),
                        "--data-dir", str(task_dir), "--warmup", "1", "--steps", "2",
                        "--blocks", "2", "--json", str(out), *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ratio ours/peer examples/s: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[-1]) == pytest.approx(ratio, abs=0.005)
    assert any(line.startswith("ours: ") for line in lines)
    assert any(line.startswith("peer: ") for line in lines)
    results = json.loads(out.read_text())
    for name in ("ours", "peer"):
        assert results[name]["examples_per_s"] > 0 and results[name]["mfu"] == "n/a"
    # Same weights, same first batch, no dropout: the same first loss up to float32
    # rounding (ours packed, the peer padded through transformers' SDPA BertModel).
    # Measured: equal bits with --batch-size 8, 7.4e-8 apart (one ulp) with 200 tokens.
    ours, peer = sides
    assert (ours.name, peer.name) == ("ours", "peer")
    assert ours.first_loss == pytest.approx(peer.first_loss, rel=1e-6)
    assert f"first-step loss: ours {ours.first_loss:.5f}, peer {peer.first_loss:.5f}" in lines
    if "--tokens-per-step" in extra:
        assert "200 real tokens per batch" in "\n".join(lines)
    kernel = extra[-1] if "--packed-attention" in extra else "auto"
    assert results["kernel"] == kernel
    assert f"ours packed, attention kernel {kernel}" in "\n".join(lines)


def test_the_warm_up_runs_every_batch_shape_the_timed_steps_hold(tiny_encoder, task_dir,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    bench = _load_bench()
    encoder, tok_dir = bench.build_encoder(str(tiny_encoder), "")
    config, sets = bench.load_sets(tok_dir, str(task_dir), 48)
    batches = bench.step_batches(sets, encoder.config, batch_size=5, tokens=0, n=14)
    warm, timed = batches[:2], batches[2:]
    for side in bench.make_sides(encoder, sets, config, torch.device("cpu"),
                                 kernels=["grid", "padded"]):
        ran = []
        monkeypatch.setattr(side, "run", lambda items, timed: ran.extend(items))
        side.warm_up(warm, timed)
        shape = lambda item: bench.batch_shape(side.host_batch(item[0], item[1]))  # noqa: E731
        want = {shape(item) for item in timed}
        assert len(want) > 2  # the timed steps hold several shapes
        assert want <= {shape(item) for item in ran}
        assert ran[:2] == warm and side.warmup_steps == len(ran) <= len(warm) + len(want)
        if side.name == "peer":  # padded to the longest member
            assert any(s[0][1] % 8 for s in want)
        else:  # rounded up to a multiple of 8
            assert all(s[0][1] % 8 == 0 for s in want)


def test_flops_count_matmuls_and_attention():
    import numpy as np

    from mtbert.encoder import BertConfig
    bench = _load_bench()
    config = BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16)
    # N = 2 * (4*64 + 2*8*16) = 1024; 6*N*5 tokens + 12*2*8*(3^2 + 2^2)
    assert bench.flops_per_step(config, np.array([3, 2])) == 6 * 1024 * 5 + 12 * 2 * 8 * 13
