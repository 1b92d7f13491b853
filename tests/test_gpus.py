"""Every GPU of a host from one command: slots per GPU, the environment of each trial
process, `--gpus` errors, and the retry alone of a trial that ran out of memory beside
others. On CPU: the GPUs are the slot logic's names, the trials run on the CPU."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

import mtbert.studies.slots as slots_module
from mtbert.cli import app
from mtbert.errors import ConfigError
from mtbert.studies.runner import SweepOptions, TrialRunner
from mtbert.studies.slots import DeviceSlots, parse_gpus
from mtbert.studies.spec import load_spec

from conftest import use_stub_trials

runner = CliRunner()


def test_each_gpu_takes_k_trials_the_least_busy_first_and_a_freed_slot_is_reused():
    slots = DeviceSlots(["0", "1", "2"], per_device=2)
    taken = [slots.acquire() for _ in range(6)]
    assert [s.gpu for s in taken] == ["0", "1", "2", "0", "1", "2"]
    assert slots.running() == {"0": 2, "1": 2, "2": 2}
    waiting: list = []
    thread = threading.Thread(target=lambda: waiting.append(slots.acquire()))
    thread.start()
    thread.join(timeout=0.3)
    assert thread.is_alive() and not waiting  # every slot is busy: the 7th trial waits
    slots.release(taken[4])  # a trial on GPU 1 ends
    thread.join(timeout=5)
    assert waiting[0].gpu == "1" and slots.running() == {"0": 2, "1": 2, "2": 2}


def test_no_gpu_ever_holds_more_than_k_trials_under_concurrent_use():
    slots = DeviceSlots(["0", "1"], per_device=3)
    seen, failures = [], []

    def trial(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            slot = slots.acquire()
            counts = slots.running()
            seen.append(counts)
            if max(counts.values()) > 3:
                failures.append(counts)
            threading.Event().wait(rng.random() / 500)
            slots.release(slot)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(seen) == 240 and failures == []
    assert slots.running() == {"0": 0, "1": 0}


def test_a_trial_that_must_run_alone_waits_for_an_empty_gpu_which_then_takes_nobody():
    slots = DeviceSlots(["0", "1"], per_device=2)
    a, b = slots.acquire(), slots.acquire()  # one on each GPU
    alone: list = []
    thread = threading.Thread(target=lambda: alone.append(slots.acquire(alone=True)))
    thread.start()
    thread.join(timeout=0.3)
    assert thread.is_alive()  # no GPU is empty
    slots.release(b)
    thread.join(timeout=5)
    assert alone[0].gpu == "1" and alone[0].neighbours == 0
    c = slots.acquire()
    assert c.gpu == "0"  # GPU 1 is reserved for the lone trial, though it has room
    assert a.neighbours == 1 and c.neighbours == 1


def test_the_child_environment_pins_its_gpu_and_splits_the_cpu_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    spec = load_spec("default")
    worker = TrialRunner(spec, SweepOptions(out=tmp_path, gpus=["0", "3"], trials_per_gpu=2),
                         "s")
    slot = worker.slots.acquire()
    env = worker._child_env(slot)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["OMP_NUM_THREADS"] == "4"  # 16 cores over 2 GPUs x 2 trials
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["MTBERT_WORKER_PID"] == str(os.getpid())
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    one = TrialRunner(spec, SweepOptions(out=tmp_path), "s")
    env = one._child_env(one.slots.acquire())
    assert "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] == \
        os.environ.get("CUDA_VISIBLE_DEVICES")
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"  # the user's wins
    assert env["OMP_NUM_THREADS"] == "2"


@pytest.mark.parametrize("text, visible, expected", [
    ("all", ["0", "1", "2"], ["0", "1", "2"]),
    ("0,2", ["0", "1", "2"], ["0", "2"]),
    ("1", ["4", "6"], ["6"]),  # under CUDA_VISIBLE_DEVICES=4,6 GPU 1 is physical GPU 6
])
def test_gpus_name_pytorchs_devices(text, visible, expected, monkeypatch):
    monkeypatch.setattr(slots_module, "visible_gpus", lambda: visible)
    assert parse_gpus(text) == expected


@pytest.mark.parametrize("text, visible, message", [
    ("0", [], "PyTorch sees no CUDA GPU on this machine"),
    ("2", ["0", "1"], "this machine has GPUs 0, 1"),
    ("0,0", ["0", "1"], "each at most once"),
    ("one", ["0"], "e.g. --gpus 0,1 or --gpus all"),
])
def test_bad_gpus_are_one_line(text, visible, message, monkeypatch):
    monkeypatch.setattr(slots_module, "visible_gpus", lambda: visible)
    with pytest.raises(ConfigError, match=message):
        parse_gpus(text)


@pytest.mark.slow
def test_gpus_without_cuda_is_exit_2_through_the_real_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtbert", "sweep", "default", "--gpus",
                             "0", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr == ("mtbert: error: --gpus 0: PyTorch sees no CUDA GPU on this "
                             "machine; leave --gpus out to run on the CPU\n")


# The message train() gives for torch.cuda.OutOfMemoryError in a step.
OUT_OF_MEMORY = ("out of GPU memory at step 0; lower train.batch_size or model.max_length "
                 "(or run fewer trials per GPU)")


def _sweep(tiny_encoder, task_dir, out: Path, *extra: str):
    spec = out.parent / "one.yaml"
    spec.write_text("name: one\nspace:\n  train.seed: {type: categorical, choices: [0, 1]}\n"
                    "pruner: {name: none}\n")
    return runner.invoke(app, [
        "-q", "sweep", str(spec), "--out", str(out), "--data-dir", str(task_dir),
        "--wandb-mode", "disabled", "--device", "cpu", "--gpus", "0",
        "--set", f"model.encoder={tiny_encoder}", "--set", "model.max_length=32",
        "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
        "--set", "train.batch_size=8", *extra])


@pytest.fixture
def one_fake_gpu(monkeypatch):
    """GPU "0" as the slots' name; stand-in trials (on the CPU), the first of which runs
    out of GPU memory in its first step (as train() reports it: test_retries.py)."""
    monkeypatch.setattr(slots_module, "visible_gpus", lambda: ["0"])
    use_stub_trials(monkeypatch, epoch_s=0.5, fail={"trial-0000": OUT_OF_MEMORY})


@pytest.mark.slow
def test_out_of_memory_beside_another_trial_is_retried_alone(one_fake_gpu, tiny_encoder,
                                                            task_dir, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    # Trials 0 and 1 start together; the retry of 0 is queued when 0 fails, and some thread
    # takes it before a new trial, whichever of 1 or a third trial is still running then.
    result = _sweep(tiny_encoder, task_dir, out, "--trials", "4", "--trials-per-gpu", "2")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="one", storage=f"sqlite:///{out}/mtbert.db").trials
    by_number = {t.number: t for t in trials}
    assert by_number[0].state.name == "FAIL" and by_number[0].user_attrs["gpu"] == "0"
    assert "out of GPU memory" in by_number[0].user_attrs["fail_reason"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1
    assert retries[0].user_attrs["retry_reason"] == "oom"
    assert retries[0].state.name == "COMPLETE" and retries[0].params == by_number[0].params


@pytest.mark.slow
def test_out_of_memory_alone_stays_a_failure(one_fake_gpu, tiny_encoder, task_dir, tmp_path,
                                             monkeypatch):
    out = tmp_path / "runs"
    result = _sweep(tiny_encoder, task_dir, out, "--trials", "2", "--trials-per-gpu", "1")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="one", storage=f"sqlite:///{out}/mtbert.db").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert not [t for t in trials if t.user_attrs.get("retry_of") is not None]
    assert "gpu" in result.stdout.splitlines()[0].split()
