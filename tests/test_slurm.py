"""The shipped `deploy/slurm/sweep-array.sbatch` on a real Slurm (tests/slurm_cluster.py: a
single node of Debian's slurm-wlm and munge that the test starts and stops itself), on the
CPU, the tiny encoder and the CI PostgreSQL.

The script is submitted unchanged: the resources are overridden on the sbatch command line
(no GPU, one CPU and 1 GB per task) and its settings exported (SWEEP_DEVICE=cpu, the tiny
model through SWEEP_ARGS). A two-task array runs one trial per task; task 0 is requeued
from outside (`scontrol requeue`) in its trial's second epoch. Slurm starts it again
(SLURM_RESTART_COUNT 1: "start 2"), the stopped trial's retry resumes from its last epoch,
and the study ends with no trial RUNNING, queued or lost; the log says what happened and
nothing that did not (no "requeueing" by the script, no "could not requeue").

Slurm holds a requeued job for about two minutes (its BeginTime); the test starts it at
once (`scontrol update StartTime=now`), so that the test takes about a minute and a half.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from conftest import POSTGRES_URL, postgres_unreachable, wait_for, write_task_files
from mtbert.studies.storage import with_driver
from slurm_cluster import SlurmCluster, unavailable

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "sweep-array.sbatch"
MTBERT = Path(sys.executable).with_name("mtbert")  # the console command of this install
SPEC = """name: slurm
space:
  train.lr: {type: float, low: 0.0001, high: 0.01, log: true}
objective: overall/arithmetic
pruner: {name: none}
sampler: {name: random, seed: 0}
"""
STUDY = "slurm"

pytestmark = [
    pytest.mark.outside,
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
    pytest.mark.skipif(postgres_unreachable() is not None, reason=str(postgres_unreachable())),
    pytest.mark.skipif(not MTBERT.is_file(),
                       reason=f"no mtbert command beside {sys.executable} for the jobs to run"),
    pytest.mark.timeout(600),
]


@pytest.fixture
def cluster():
    # A short root: a munge socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="mtbert-slurm-", dir="/tmp"))
    try:
        with SlurmCluster(root, cpus=os.cpu_count() or 1) as running:
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database():
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    name = f"mtbert_slurm_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(with_driver(POSTGRES_URL), isolation_level="AUTOCOMMIT",
                                     poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.make_url(POSTGRES_URL).set(database=name).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _trial_of_task(task: str) -> Path | None:
    """The run directory of the trial that array task `task` trains now, from /proc: the
    trial process's command line names it, its environment the task."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"mtbert.studies.trial" not in argv:
                continue
            env = dict(item.split(b"=", 1) for item in
                       (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if env.get(b"SLURM_ARRAY_TASK_ID") == task.encode():
            return Path(argv[argv.index(b"mtbert.studies.trial") + 1].decode())
    return None


def _epochs(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def test_a_sweep_array_on_slurm_survives_a_requeue_and_loses_no_trial(
        cluster, database, tiny_encoder, tmp_path):
    data, out, work = write_task_files(tmp_path / "data"), tmp_path / "runs", tmp_path / "work"
    work.mkdir()
    spec = tmp_path / "slurm.yaml"
    spec.write_text(SPEC)
    # Epochs of a few seconds: long enough to requeue the task inside the second.
    extra = (f"--study {STUDY} --wandb-mode disabled --set model.encoder={tiny_encoder} "
             f"--set model.max_length=32 --set data.cache_dir={tmp_path / 'cache'} "
             "--set data.max_train_examples=0 --set data.max_eval_examples=0 "
             "--set train.epochs=3 --set train.steps_per_epoch=300 --set train.batch_size=8")
    env = {"MTBERT_STORAGE": database, "SWEEP_ARGS": extra, "OMP_NUM_THREADS": "1",
           "PATH": f"{MTBERT.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    submitted = cluster.client(
        "sbatch", "--parsable", "--array=0-1", "--gres=none", "--cpus-per-task=1",
        "--mem=1G", "--time=20",
        f"--export=ALL,SWEEP_DEVICE=cpu,SWEEP_SPEC={spec},SWEEP_TRIALS=1,SWEEP_OUT={out},"
        f"SWEEP_DATA={data},SWEEP_MAX_RETRIES=2", str(SBATCH), env=env, cwd=work)
    job = submitted.stdout.strip().split(";")[0]

    # Task 0's trial in its second epoch: its first epoch and resume state are written.
    run_dir = wait_for(lambda: _trial_of_task("0"), timeout=180,
                       what="the trial process of task 0")
    wait_for(lambda: _epochs(run_dir) >= 1 and (run_dir / "resume.pt").exists(),
             timeout=180, what=f"the first epoch of {run_dir.name}")
    assert _epochs(run_dir) < 3, "the trial ended before it could be requeued"
    cluster.client("scontrol", "requeue", f"{job}_0")
    wait_for(lambda: cluster.job(f"{job}_0").get("JobState") == "PENDING", timeout=120,
             what=f"task {job}_0 back in the queue")
    cluster.client("scontrol", "update", f"JobId={job}_0", "StartTime=now")

    def ended():
        states = [cluster.job(f"{job}_{task}").get("JobState") for task in (0, 1)]
        return states if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                             for s in states) else None

    assert wait_for(ended, timeout=360, what=f"both tasks of job {job} to end") == \
        ["COMPLETED", "COMPLETED"]
    task0, task1 = cluster.job(f"{job}_0"), cluster.job(f"{job}_1")
    assert (task0["Restarts"], task0["ExitCode"]) == ("1", "0:0")
    assert (task1["Restarts"], task1["ExitCode"]) == ("0", "0:0")

    log0 = (work / f"mtbert-sweep-{job}_0.out").read_text()
    log1 = (work / f"mtbert-sweep-{job}_1.out").read_text()
    starts = [ln for ln in log0.splitlines() if ln.startswith(f"sweep-array: task {job}_0 on ")]
    assert [ln.split(", ")[1] for ln in starts] == ["start 1", "start 2"], log0
    assert "device cpu" in starts[0]
    assert ("sweep-array: mtbert exited 130: stopped; its running trial is queued again "
            "(sacct shows 130 as 2:0)") in log0
    assert (f"sweep-array: stopped by Slurm (job COMPLETING, restart 1): requeued or "
            f"preempted from outside; Slurm starts {job}_0 again itself") in log0
    assert log0.rstrip().endswith("sweep-array: mtbert exited 0: done"), log0
    for false_alarm in ("requeueing", "could not requeue", "Terminated"):
        assert false_alarm not in log0 + log1, false_alarm
    assert log1.count(f"sweep-array: task {job}_1 on ") == 1
    assert log1.rstrip().endswith("sweep-array: mtbert exited 0: done"), log1

    trials = optuna.load_study(study_name=STUDY, storage=with_driver(database)).trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], states  # none RUNNING, none queued
    (stopped,) = [t for t in trials if t.state.name == "FAIL"]
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert Path(stopped.user_attrs["run_dir"]) == run_dir
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == stopped.number]
    assert retry.state.name == "COMPLETE" and retry.user_attrs["resumed_from_epoch"] >= 1
    summary = json.loads(Path(retry.user_attrs["run_dir"], "summary.json").read_text())
    assert summary["epochs_completed"] == 3

    # `mtbert studies`: the stopped trial is retried, not a failure.
    listed = json.loads(cluster.client(str(MTBERT), "studies", "--json", env=env).stdout)
    assert [(s["name"], s["retried"], s["states"]["FAIL"]) for s in listed] == \
        [(STUDY, 1, 1)]

    if cluster.accounting:  # sacct: each start of task 0, and mtbert's 130 read as 2
        rows = cluster.client("sacct", "-j", job, "-D", "-n", "-P",
                              "-o", "JobID,State,ExitCode").stdout.split()
        assert rows.count(f"{job}_0|REQUEUED|0:0") == 1, rows
        assert rows.count(f"{job}_0.batch|FAILED|2:0") == 1, rows
        assert rows.count(f"{job}_0|COMPLETED|0:0") == 1, rows
        assert f"{job}_1|COMPLETED|0:0" in rows, rows
