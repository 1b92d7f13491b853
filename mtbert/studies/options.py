"""A sweep worker's options: every `mtbert sweep` setting that is not the spec, with its
default declared once. The CLI takes its defaults from here when it starts, so this
module imports nothing else of the study stack until a sweep runs (`mtbert eval` loads
it and the package's docstring, nothing more: tests/test_architecture.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtbert.rundir import RUNS_DIR

WARM_TOP = 5  # configurations a warm start takes from the earlier study by default


@dataclass
class SweepOptions:
    trials: int | None = None
    timeout: float | None = None
    study: str | None = None
    storage: str | None = None
    out: Path = RUNS_DIR
    wandb_mode: str = "disabled"
    wandb_project: str = "mtbert"
    keep_top: int = 3
    heartbeat: int = 10
    grace: int = 30
    device: str = "auto"
    trials_per_gpu: int = 1
    max_retries: int = 2  # a killed or stopped trial is queued again this many times
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES of each GPU; None: one device
    budget_hours: float | None = None  # stored in the study; None keeps the stored one
    stop_after_flat: int | None = None  # stored in the study (studies.flat); None keeps it
    min_delta: float | None = None
    baseline: Path | None = None  # a `mtbert compare` JSON: `baseline` in constraints
    warm_start: str | None = None  # an earlier study whose best configurations run first
    warm_storage: str | None = None  # its storage URL; None: the sweep's own
    warm_top: int = WARM_TOP  # how many of its best configurations
    progress: bool = False  # show the running trials and the study on stderr (--quiet: no)
    storage_outage: float = 60.0  # seconds a worker waits for its storage to come back

    _opened: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def url(self) -> str:
        from mtbert.studies.storage import storage_url

        return storage_url(self.storage, self.out)

    def open_storage(self, *, must_exist: bool = False):
        """The study storage, its heartbeat and retries as these options say; opened once
        (creating or checking its tables takes a few tenths of a second)."""
        from mtbert.studies.storage import open_storage

        if self._opened is None:
            self._opened = open_storage(self.url, heartbeat=self.heartbeat,
                                         grace=self.grace, max_retries=self.max_retries,
                                         must_exist=must_exist)
        return self._opened
