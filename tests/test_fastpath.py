"""The packed path gives the padded path's outputs and gradients; bucketing covers every
example once per pass; the fast-path config keys reach the training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtbert.config import ModelConfig, build_config
from mtbert.data import Batch, LengthBucketSampler, pack_rows
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.errors import EncoderError
from mtbert.heads import MultitaskModel
from mtbert.tasks import get_task

TINY = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _rows(lengths, seed=0, pair=False):
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(5, 50, size=n).astype(np.int64)
        types = np.zeros(n, dtype=np.int64)
        if pair:
            types[n // 2:] = 1
        rows.append((ids, types))
    return rows


def _padded(rows):
    T = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    types = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (i, t) in enumerate(rows):
        ids[r, :len(i)], types[r, :len(i)], mask[r, :len(i)] = torch.from_numpy(i), \
            torch.from_numpy(t), 1
    return ids, mask, types


def _model(task: str, **model_config):
    torch.manual_seed(0)
    model = MultitaskModel(BertEncoder(TINY), [get_task(task)],
                           ModelConfig(dropout=0.0, **model_config))
    return model.eval()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Lengths from 2 to 60 tokens in one batch: most of the padded grid is padding.
LENGTHS = [2, 60, 7, 33, 3, 18, 60, 5]


@pytest.mark.parametrize("kernel", ["grid", "nested"])
def test_packed_encoder_matches_padded_outputs_and_gradients(kernel):
    torch.manual_seed(0)
    encoder = BertEncoder(TINY)
    encoder.packed_kernel = kernel
    rows = _rows(LENGTHS, pair=True)
    ids, mask, types = _padded(rows)
    padded = encoder(ids, mask, types)  # (B, T, d)
    real = padded[mask.bool()]  # (N, d), sequence after sequence
    # A random projection as the loss: sum(h**2) of LayerNorm outputs has almost no
    # gradient below the last LayerNorm, which would compare rounding noise.
    weights = torch.randn_like(real)
    (real * weights).sum().backward()
    want = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    packed = encoder.forward_packed(pack_rows(rows))
    assert packed.shape == (sum(LENGTHS), 32)
    torch.testing.assert_close(packed, real, atol=1e-5, rtol=1e-4)
    (packed * weights).sum().backward()
    for name, grad in want.items():
        torch.testing.assert_close(encoder.get_parameter(name).grad, grad, atol=1e-5,
                                   rtol=1e-4, msg=name)


@pytest.mark.parametrize("pooling,pooler", [("cls", "shared"), ("mean", "none"),
                                            ("mean", "per_task")])
def test_packed_model_matches_padded_single_sentence(pooling, pooler):
    rows = _rows(LENGTHS)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    outputs, grads = [], []
    for batch in (Batch("sst", [_padded(rows)], labels, np.arange(8)),
                  Batch("sst", [pack_rows(rows)], labels, np.arange(8))):
        model = _model("sst", pooling=pooling, pooler=pooler)
        out = model(batch)
        get_task("sst").loss(out, labels).backward()
        outputs.append(out)
        grads.append(_grads(model))
    assert outputs[0].shape == (8, 5)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_model_matches_padded_siamese_pairs(pooling):
    a, b = _rows([4, 40, 9, 2], seed=1), _rows([30, 3, 12, 25], seed=2)
    labels = torch.tensor([0.5, 4.0, 2.5, 1.0])
    outputs, grads = [], []
    for batch in (Batch("sts", [_padded(a), _padded(b)], labels, np.arange(4)),
                  Batch("sts", [pack_rows(a + b, groups=2)], labels, np.arange(4))):
        model = _model("sts", pooling=pooling, pair_encoding="siamese", siamese_cosine=True)
        out = model(batch)
        get_task("sts").loss(out, labels).backward()
        outputs.append(out)
        grads.append(_grads(model))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_pack_rows_offsets_positions_and_grid_index():
    view = pack_rows(_rows([3, 1, 2]))
    assert view.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert view.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert view.pad_index.tolist() == [0, 1, 2, 3, 6, 7]  # rows of max_len 3
    assert view.seq_index.tolist() == [0, 0, 0, 1, 2, 2]
    assert (view.max_len, view.min_len, view.n_seqs) == (3, 1, 3)


def test_packed_sequence_longer_than_positions_is_an_error():
    encoder = BertEncoder(TINY)
    with pytest.raises(EncoderError, match="sequence length 70 exceeds"):
        encoder.forward_packed(pack_rows(_rows([70])))


def test_unknown_packed_kernel_names_the_valid_ones():
    encoder = BertEncoder(TINY)
    encoder.packed_kernel = "flash"
    with pytest.raises(EncoderError, match="'flash'.*auto, grid, nested"):
        encoder.forward_packed(pack_rows(_rows([4])))


@pytest.mark.parametrize("size,batch_size", [(103, 8), (16, 32), (1, 1)])
def test_length_buckets_cover_every_example_once_per_pass(size, batch_size):
    lengths = np.random.default_rng(0).integers(3, 80, size=size)
    sampler = LengthBucketSampler(lengths, batch_size, seed=0, task="sst", window=3)
    for _ in range(2):  # two passes, each a new permutation
        batches = [sampler.next() for _ in range(sampler.batches_per_pass)]
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(size))
        assert all(0 < len(b) <= batch_size for b in batches)


def test_length_buckets_group_similar_lengths_and_resume_exactly():
    lengths = np.random.default_rng(1).integers(3, 80, size=400)
    sampler = LengthBucketSampler(lengths, 16, seed=3, task="sst")
    batches = [sampler.next() for _ in range(sampler.batches_per_pass)]
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[c]) for c in np.array_split(
        np.random.default_rng(0).permutation(400), 25)])
    assert spread < random_spread / 3
    # Batch order is shuffled, not sorted by length across the pass.
    firsts = [lengths[b].min() for b in batches]
    assert firsts != sorted(firsts)
    # Resume state: a sampler restored mid-pass yields the same next batches.
    sampler.next()
    state = sampler.state()
    want = [sampler.next().tolist() for _ in range(5)]
    other = LengthBucketSampler(lengths, 16, seed=3, task="sst")
    other.restore(state)
    assert [other.next().tolist() for _ in range(5)] == want


def test_fast_path_config_keys_are_checked():
    config = build_config({"train": {"packing": "padded", "bucket_by_length": True,
                                     "packed_attention": "grid"}})
    assert (config.train.packing, config.train.bucket_by_length) == ("padded", True)
    from mtbert.errors import ConfigError
    with pytest.raises(ConfigError, match="train.packing; valid: auto, packed, padded"):
        build_config({"train": {"packing": "unpadded"}})


# ---------------------------------------------------------------- bounded shapes

@pytest.mark.parametrize("longest,multiple,limit,want", [
    (60, 8, None, 64), (64, 8, None, 64), (3, 8, None, 8), (1, 1, None, 1),
    (125, 8, 128, 128), (125, 8, 126, 126), (61, 8, 32, 64)])
def test_padded_length_rounds_up_to_the_multiple_but_not_past_the_limit(longest, multiple,
                                                                        limit, want):
    from mtbert.data import padded_length
    assert padded_length(longest, multiple, limit) == want


def test_rounded_padding_masks_exactly_the_real_tokens():
    from mtbert.data import pad_rows
    rows = _rows(LENGTHS)
    ids, mask, types = pad_rows(rows, 0, multiple=8, limit=64)
    assert ids.shape == mask.shape == types.shape == (8, 64)  # longest 60 -> 64
    assert mask.sum(1).tolist() == LENGTHS
    for r, n in enumerate(LENGTHS):  # real tokens first, then only padding
        assert mask[r, :n].all() and not mask[r, n:].any()
        assert ids[r, :n].tolist() == rows[r][0].tolist() and not ids[r, n:].any()
    assert pad_rows(rows, 0, multiple=8, limit=62)[0].shape == (8, 62)  # never past the limit


@pytest.mark.parametrize("packing", ["padded", "grid"])
def test_rounded_shapes_give_the_same_outputs_and_gradients(packing):
    """Padding a batch (or the packed grid) to a multiple of 8 instead of its longest
    member (60 -> 64) changes no output and no gradient: the extra tokens are masked."""
    from mtbert.data import pad_rows
    rows = _rows(LENGTHS, pair=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    results = []
    for multiple in (1, 8):
        if packing == "padded":
            view = pad_rows(rows, 0, multiple=multiple)
            assert view[0].shape[1] == {1: 60, 8: 64}[multiple]
        else:
            view = pack_rows(rows, multiple=multiple)
            assert (view.max_len, view.grid_len) == (60, {1: 60, 8: 64}[multiple])
        model = _model("sst", pooling="mean", pooler="none")
        model.encoder.packed_kernel = "grid"
        out = model(Batch("sst", [view], labels, np.arange(8)))
        get_task("sst").loss(out, labels).backward()
        results.append((out, _grads(model)))
    (out1, grads1), (out8, grads8) = results
    torch.testing.assert_close(out8, out1, atol=1e-6, rtol=1e-5)
    for name in grads1:
        torch.testing.assert_close(grads8[name], grads1[name], atol=1e-6, rtol=1e-5, msg=name)


def test_pack_rows_grid_index_follows_the_rounded_length():
    view = pack_rows(_rows([3, 1, 2]), multiple=4)
    assert (view.max_len, view.grid_len) == (3, 4)
    assert view.pad_index.tolist() == [0, 1, 2, 4, 8, 9]  # rows of 4
    assert view.seq_index.tolist() == [0, 0, 0, 1, 2, 2]


# ---------------------------------------------------------------- one copy per batch

def _staged_batches():
    from mtbert.data import pad_rows
    a, b = _rows([4, 40, 9], seed=1), _rows([30, 3, 12], seed=2)
    labels = torch.tensor([0.5, 4.0, 2.5])
    return [Batch("sts", [pack_rows(a + b, groups=2)], labels, np.arange(3)),
            Batch("sts", [pad_rows(a, 0, multiple=8), pad_rows(b, 0, multiple=8)], labels,
                  np.arange(3))]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_batch_reaches_the_device_in_one_buffer_and_one_copy(layout, monkeypatch):
    batch = _staged_batches()[layout == "padded"]
    copies, pins = [], []
    to, pin = torch.Tensor.to, torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(t) or to(t, *a, **k))
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda t, *a, **k: pins.append(t) or pin(t, *a, **k))
    moved = batch.to(torch.device("cpu"))
    monkeypatch.undo()
    assert (len(copies), len(pins)) == (1, 0)  # one copy (pinned: by torch.empty) per batch
    before = [t for v in batch.views for t in (v.tensors() if batch.packed else v)]
    after = [t for v in moved.views for t in (v.tensors() if moved.packed else v)]
    before.append(batch.labels)
    after.append(moved.labels)
    assert len(after) == (6 if layout == "packed" else 7)
    storages = {t.untyped_storage().data_ptr() for t in after}
    assert storages == {copies[0].untyped_storage().data_ptr()}  # all views of one buffer
    for old, new in zip(before, after):
        assert (new.dtype, new.shape) == (old.dtype, old.shape)
        assert torch.equal(new, old)
    if layout == "packed":
        view, old = moved.views[0], batch.views[0]
        assert (view.max_len, view.min_len, view.grid_len, view.groups) == \
            (old.max_len, old.min_len, old.grid_len, 2)


# ---------------------------------------------------------------- kernel choice

def test_auto_takes_the_grid_kernel_until_a_gpu_measurement_says_otherwise():
    from mtbert.encoder import AUTO_KERNEL, PackedAttention
    assert AUTO_KERNEL == {"cpu": "grid", "cuda": "grid"}
    assert PackedAttention(pack_rows(_rows([3, 5])), "auto").kernel == "grid"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_varlen_kernel_without_cuda_is_an_error_naming_the_others():
    encoder = BertEncoder(TINY)
    encoder.packed_kernel = "varlen"
    with pytest.raises(EncoderError, match="'varlen' needs CUDA.*valid elsewhere: auto, grid"):
        encoder.forward_packed(pack_rows(_rows([4])))
