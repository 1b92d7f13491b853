"""The fast path's switches: packed batches and their attention kernel.

A sweep is hundreds of short runs on short sentences (25-31 tokens on
average): padding each batch to its longest member wastes about half of all
tokens, so by default every batch travels packed (`data.PackedView`) and the
encoder computes real tokens only. `train.packing=padded` keeps the plain
padded path, the reference the packed one is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable

from mtbert.config import TrainConfig
from mtbert.data import EncodedSet
from mtbert.heads import MultitaskModel


def uses_packing(config: TrainConfig) -> bool:
    """Whether batches are packed: `auto` is packed on every device, the path measured
    faster on CPU (bench/RESULTS.md) and, on CUDA, the one that skips padded tokens."""
    return config.packing in ("auto", "packed")


def configure_packing(model: MultitaskModel, datasets: Iterable[EncodedSet],
                      config: TrainConfig) -> bool:
    """Set every dataset's batch layout and the encoder's packed attention kernel."""
    packed = uses_packing(config)
    for dataset in datasets:
        dataset.packed = packed
    model.encoder.packed_kernel = config.packed_attention
    return packed
