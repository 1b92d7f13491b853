"""Where and how code runs: the device, autocast, atomic saves of tensors, the W&B
directory, and the environment recorded next to every result (atomic text writes:
`mtbert.rundir`).

Every command imports this module, so it imports nothing of the training stack, and
torch only where a function needs it: `mtbert eval` and `mtbert predict` resolve their
device here, and a sweep worker whose trials run on the CPU never imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from mtbert.errors import ConfigError, MtbertError, TrainingError
from mtbert.rundir import naming
from mtbert.version import __version__

if TYPE_CHECKING:
    import torch


def device_type(name: str) -> str:
    """The device type `--device NAME` trains on ("cpu", "cuda"); `cpu` asks no torch, so
    that a sweep worker that only starts trial processes on the CPU never imports it."""
    return "cpu" if name == "cpu" else resolve_device(name).type


def device_label(name: str) -> str:
    """The device type `--device NAME` trains on, for what a command shows and records;
    `--device cuda` without one (the training fails, and says why) is named as asked."""
    try:
        return device_type(name)
    except TrainingError:
        return name


def require_device(name: str) -> None:
    """Refuse `--device NAME` of a command that starts its work in other processes (a
    sweep's trials) where the device is not there: one line, exit 2, before any of it
    starts, rather than a failure in every trial."""
    if name == "cuda":
        try:
            resolve_device(name)
        except TrainingError as err:
            raise ConfigError(f"{err}; pass --device cpu, or --device auto to use a GPU "
                              "only where there is one") from None


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when PyTorch sees a GPU, else CPU; `cuda` without one is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_torch_save(payload: object, path: Path) -> None:
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # Through a Python file object: a failed write (a full disk) then raises an OSError
    # that `naming` finds behind torch's RuntimeError; torch's own writer says neither.
    with naming(path, partial=tmp):
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)


def wandb_dir(default: Path) -> Path:
    """Where W&B writes its runs: $WANDB_DIR when set, else `default` (a sweep's or a
    comparison's out dir), absolute so that child processes agree."""
    return Path(os.environ.get("WANDB_DIR") or default).resolve()


def environment(device: torch.device) -> dict[str, str | None]:
    """Versions and hardware of a run, for summary.json and the model card."""
    import torch

    return {"mtbert": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(), "git": _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold `run_dir` for this process: a second process that asks for it while the first
    runs is refused at once (an advisory lock, released when the process ends, even by
    SIGKILL, so a killed run leaves nothing to clean up)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with naming(run_dir / LOCK_FILE):
        handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise MtbertError(f"{run_dir} is in use by another mtbert process (pid {holder}); "
                              "wait for it to finish or pick another --out") from None
        handle.seek(0)
        handle.truncate()
        with naming(run_dir / LOCK_FILE):  # unbuffered: nothing left to fail at close
            os.write(handle.fileno(), f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
