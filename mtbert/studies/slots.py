"""Devices for a worker's trials: which GPU each running trial gets.

`mtbert sweep --gpus 0,1,2,3 --trials-per-gpu K` runs up to K trials on each
listed GPU at once, each trial process pinned to its GPU with
CUDA_VISIBLE_DEVICES; a trial that ends frees its slot for the next. Without
`--gpus` every trial shares the one device, K at a time. A slot also records
whether other trials ran beside it on the same device, so that a trial that
ran out of memory next to neighbours can be retried alone (a study must not
learn that large batches fail because of whoever shared the GPU).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from mtbert.errors import ConfigError


def visible_gpus() -> list[str]:
    """The GPUs PyTorch sees here, as the CUDA_VISIBLE_DEVICES value that selects each."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
              if d.strip()]
    # Under a CUDA_VISIBLE_DEVICES of its own, GPU i of this process is the i-th entry.
    return parent[:count] if len(parent) >= count else [str(i) for i in range(count)]


def parse_gpus(text: str) -> list[str]:
    """`--gpus all` or `--gpus 0,2`: the CUDA_VISIBLE_DEVICES value of each GPU to use.
    Numbers are PyTorch's device indices on this machine (0 .. count - 1)."""
    available = visible_gpus()
    if not available:
        raise ConfigError(f"--gpus {text}: PyTorch sees no CUDA GPU on this machine; leave "
                          "--gpus out to run on the CPU")
    if text.strip() == "all":
        return available
    try:
        wanted = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"bad --gpus {text!r}; e.g. --gpus 0,1 or --gpus all") from None
    missing = [g for g in wanted if not 0 <= g < len(available)]
    if missing or not wanted or len(set(wanted)) != len(wanted):
        raise ConfigError(f"bad --gpus {text!r}: this machine has GPUs "
                          f"{', '.join(map(str, range(len(available))))} (each at most once)")
    return [available[g] for g in wanted]


@dataclass(eq=False)  # each slot is itself: two on one GPU are never the same slot
class Slot:
    """A running trial's place: its GPU (None: the one default device) and the most
    other trials that shared that device with it at once."""

    gpu: str | None
    neighbours: int = 0


class DeviceSlots:
    """Up to `per_device` trials on each device at once; `acquire` blocks until one of the
    devices has room (for a trial that must run `alone`: until one is empty, which then
    takes nobody else)."""

    def __init__(self, gpus: list[str] | None, per_device: int):
        if per_device < 1:
            raise ValueError(f"per_device must be at least 1, got {per_device}")
        self.devices: list[str | None] = list(gpus) if gpus else [None]
        self.per_device = per_device
        self._running: dict[str | None, list[Slot]] = {d: [] for d in self.devices}
        self._alone: set[str | None] = set()
        self._changed = threading.Condition()

    @property
    def total(self) -> int:
        return len(self.devices) * self.per_device

    def _free(self, alone: bool) -> str | None | bool:
        """The least busy device that can take a trial (lowest first on a tie); False when
        none can."""
        candidates = [d for d in self.devices if d not in self._alone and
                      len(self._running[d]) < (1 if alone else self.per_device)]
        if alone:
            candidates = [d for d in candidates if not self._running[d]]
        if not candidates:
            return False
        return min(candidates, key=lambda d: (len(self._running[d]), self.devices.index(d)))

    def acquire(self, *, alone: bool = False) -> Slot:
        with self._changed:
            self._changed.wait_for(lambda: self._free(alone) is not False)
            device = self._free(alone)
            slot = Slot(device, neighbours=len(self._running[device]))
            for other in self._running[device]:
                other.neighbours = max(other.neighbours, len(self._running[device]))
            self._running[device].append(slot)
            if alone:
                self._alone.add(device)
            return slot

    def release(self, slot: Slot) -> None:
        with self._changed:
            self._running[slot.gpu].remove(slot)
            self._alone.discard(slot.gpu)
            self._changed.notify_all()

    def running(self) -> dict[str | None, int]:
        with self._changed:
            return {d: len(slots) for d, slots in self._running.items()}
