"""The CUDA path: each test needs a GPU and is skipped, by name, without one.

On a GPU machine: `PYTHONPATH=. python -m pytest -q tests/test_cuda.py`
(bench/gpu_check.py checks the same things at full size and takes the figures).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rng_states_across_a_resume
from mtbert.data import Batch, pack_rows, pad_rows
from mtbert.encoder import BertConfig, BertEncoder, varlen_attention
from mtbert.errors import TrainingError
from mtbert.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=128,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LENGTHS = [2, 60, 7, 33, 3, 18, 60, 5]


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(5, 50, size=n).astype(np.int64), np.zeros(n, dtype=np.int64))
            for n in lengths]


def test_a_batch_reaches_cuda_in_one_pinned_buffer_and_one_copy(monkeypatch):
    rows = _rows(LENGTHS)
    batch = Batch("sst", [pack_rows(rows, multiple=8)], torch.arange(8.0), np.arange(8))
    buffers, copies = [], []
    empty, to = torch.empty, torch.Tensor.to
    monkeypatch.setattr(torch, "empty", lambda *a, **k: buffers.append(k) or empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(t) or to(t, *a, **k))
    moved = batch.to(torch.device("cuda"))
    monkeypatch.undo()
    assert [k.get("pin_memory") for k in buffers] == [True] and len(copies) == 1
    assert copies[0].is_pinned()
    tensors = [*moved.views[0].tensors(), moved.labels]
    assert all(t.is_cuda for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    for old, new in zip([*batch.views[0].tensors(), batch.labels], tensors):
        assert torch.equal(new.cpu(), old)


@pytest.mark.parametrize("kernel,dtype", [("grid", torch.float32), ("nested", torch.float32),
                                          ("grid", torch.bfloat16), ("nested", torch.bfloat16),
                                          ("varlen", torch.bfloat16)])
def test_packed_kernels_match_the_padded_path_on_cuda(kernel, dtype):
    if kernel == "varlen" and varlen_attention() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    encoder = BertEncoder(TINY).cuda()
    encoder.packed_kernel = kernel
    rows = _rows(LENGTHS)
    ids, mask, types = (t.cuda() for t in pad_rows(rows, 0))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad():
        want = encoder(ids, mask, types)[mask.bool()].float()  # fp32 padded reference
        view = Batch("sst", [pack_rows(rows, multiple=8)], None, np.arange(8)).to(
            torch.device("cuda")).views[0]
        with autocast:
            got = encoder.forward_packed(view).float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # as bench/gpu_check.py
    assert float((got - want).norm() / want.norm()) < tolerance


def _with_sync_errors(run):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("loss, train_keys", [
    *[({"method": method}, {}) for method in ("sum", "uncertainty", "gradnorm", "pcgrad")],
    ({"method": "dwa", "dwa_window": 1}, {}),  # every step ends a window
    ({"method": "pcgrad"}, {"schedule": "proportional", "batches_per_step": 3}),
])
def test_a_training_step_makes_no_host_sync(tiny_config, tmp_path, loss, train_keys):
    from mtbert.train import _EpochSums, _train_step, setup

    config = tiny_config(loss=loss, train={"schedule": "round_robin_batch", **train_keys})
    s = setup(config, tmp_path / "run", torch.device("cuda"))
    s.model.train()
    plan = s.schedule.plan(0, 3 * s.per_step)
    groups = [plan[i * s.per_step:(i + 1) * s.per_step] for i in range(3)]
    sums = _EpochSums(list(s.data.train), list(s.auxiliary), s.device)
    for group in groups[:2]:
        _train_step(s, group, sums)
    _with_sync_errors(lambda: _train_step(s, groups[2], sums))  # raises on a sync


def test_a_sweep_trials_progress_file_adds_no_host_sync(tiny_config, tmp_path):
    """The progress file is fed from every step (`on_step`) but gets the loss only where
    the loop reads it: an epoch that writes it at every step makes as many synchronizing
    calls as one that does not."""
    import functools
    import warnings

    from mtbert.studies.trial import ProgressReport
    from mtbert.train import LoopState, _train_epoch, setup

    s = setup(tiny_config(train={"log_every": 3}), tmp_path / "run", torch.device("cuda"))
    report = ProgressReport(tmp_path / "run", every=0.0)  # rewritten at every call

    def syncs(on_step) -> int:
        plan = s.schedule.plan(0, 6 * s.per_step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _train_epoch(s, LoopState(), plan, desc="", progress=False, on_step=on_step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(None)  # CUDA's lazy first-use work out of the way
    assert syncs(functools.partial(report.step, epoch=0, epochs=1, steps=6)) == syncs(None) > 0
    assert report.progress.step == 6 and report.progress.loss is not None


def test_resume_restores_the_cuda_random_states(tiny_config, tmp_path):
    # Dropout 0.1: every step draws from the CUDA generator; whatever the resumed run
    # finds (another seed here), it restores the saved states.
    states, saved = rng_states_across_a_resume(
        tiny_config(), tmp_path, "cuda", lambda: [s.clone() for s in
                                                  torch.cuda.get_rng_state_all()],
        before_resume=lambda: torch.cuda.manual_seed_all(12345))
    assert all(torch.equal(a, b) for a, b in zip(saved["cuda_rng"], states["full", 0]))
    assert not torch.equal(states["full", 0][0], states["full", 1][0])  # epoch 2 drew
    assert torch.equal(states["resumed", 1][0], states["full", 1][0])


def test_out_of_gpu_memory_ends_the_run_with_its_reason(tiny_config, tmp_path):
    config = tiny_config()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6)  # not even the tiny model fits
    try:
        with pytest.raises(TrainingError, match="out of GPU memory"):
            train(config, run_dir=tmp_path / "run", device="cuda", progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
