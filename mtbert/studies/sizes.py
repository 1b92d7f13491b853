"""A spec's sizes: named sets of overrides of its base (`sizes:`), one folded in per study.

A shipped spec's base is the research protocol (bert-base-uncased, all training data,
10 epochs, lr 1e-5); its `cpu` size is a study that fits 2 CPU cores (minilm-l6, short
epochs), its `gpu` size the protocol itself. `mtbert sweep --size auto` (the default)
picks `gpu` where the trials train on CUDA, else `cpu`, and the spec as written when it
has no size of that name. The base is built as: base, then the size, then `--set`; a
resolved spec (`--print`, the copy a study stores) therefore has no sizes and runs the
same anywhere.

A study stores the size it was made with (user attribute `size`, `job.STUDY_SIZE`);
every later worker runs that size, and a worker asked for another is refused, so that
one study never mixes trials of two sizes. A study with no stored size was made before
sizes existed, when the shipped bases were today's `cpu` size (or from a spec without
sizes): `auto` runs it at `cpu` where the spec has that size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from mtbert.errors import ConfigError

AUTO = "auto"
CPU = "cpu"
GPU = "gpu"
SIZE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class NoStudy:
    """The stored size of a study that does not exist yet."""


NO_STUDY = NoStudy()


@dataclass(frozen=True)
class SizeChoice:
    """The size a sweep folds into its spec's base (None: the base as written), and why."""

    name: str | None
    why: str

    def line(self, spec: str) -> str:
        shown = f"size {self.name}" if self.name else "no size"
        return f"spec {spec}: {shown} ({self.why})"


def check_sizes(raw: Any, fail: Callable[[str], Exception]) -> dict[str, dict[str, Any]]:
    """A spec's `sizes:`: size name -> a mapping of run config keys (empty: the base)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise fail("sizes must map size names to base overrides, e.g. sizes: {cpu: "
                   "{model.encoder: minilm-l6}, gpu: {}}")
    sizes = {}
    for name, overrides in raw.items():
        if not isinstance(name, str) or not SIZE_NAME.fullmatch(name) or name == AUTO:
            raise fail(f"sizes: bad size name {name!r}; letters, digits, '_', '.', '-' "
                       f"(not '{AUTO}', which picks one)")
        if overrides is not None and not isinstance(overrides, dict):
            raise fail(f"sizes.{name} must be a mapping of run config keys (or empty)")
        sizes[name] = dict(overrides or {})
    return sizes


def choose_size(requested: str, sizes: list[str], *, where: str,
                on_cuda: Callable[[], bool], study: str | None = None,
                stored: str | None | NoStudy = NO_STUDY) -> SizeChoice:
    """The size of a sweep asked for `requested` (`--size`, `auto` by default) of a spec
    with `sizes`, joining `study` whose stored size is `stored` (NO_STUDY: a new study;
    None: a study made without a size). `on_cuda` says whether the trials train on CUDA;
    it is asked only where `auto` has to look."""
    names = ", ".join(sizes) if sizes else "none (it runs as written)"
    if requested != AUTO and requested not in sizes:
        raise ConfigError(f"{where} has no size '{requested}'; its sizes: {names}")
    if isinstance(stored, str):
        if requested not in (AUTO, stored):
            raise ConfigError(f"study {study} was made with size {stored}; a worker of it "
                              f"runs size {stored} (leave --size out), or use --study "
                              "NEW_NAME")
        if stored not in sizes:
            raise ConfigError(f"study {study} was made with size {stored}, which {where} "
                              f"does not have; its sizes: {names}")
        return SizeChoice(stored, f"study {study}'s size")
    if requested != AUTO:
        return SizeChoice(requested, "--size")
    if not sizes:
        return SizeChoice(None, "the spec has no sizes: its base as written")
    if stored is None:
        return (SizeChoice(CPU, f"study {study} has no stored size: made before sizes, "
                                "when shipped bases were the cpu size") if CPU in sizes
                else SizeChoice(None, f"study {study} has no stored size: its base as "
                                      "written"))
    name, device = (GPU, "CUDA") if on_cuda() else (CPU, "the CPU")
    if name not in sizes:
        return SizeChoice(None, f"auto: the trials train on {device} and the spec has no "
                                f"size {name} (sizes: {names}); its base as written")
    return SizeChoice(name, f"auto: the trials train on {device}")


def trials_on_cuda(device: str, gpus: bool) -> bool:
    """Whether a sweep's trials train on CUDA: on --gpus, with --device cuda, or with
    --device auto where PyTorch sees a GPU (asked only then: `cpu` imports no torch)."""
    if gpus or device == "cuda":
        return True
    if device == "cpu":
        return False
    from mtbert.runtime import device_type

    return device_type(device) == "cuda"
