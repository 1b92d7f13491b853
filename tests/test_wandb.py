"""W&B for the dashboard comparison, read back from the offline run files: each trial's
`config_id`, outcome (summary `state`, tags) and the exported model's artifact.

The W&B runs are the trial processes' own, and the artifact holds a trained model: those
tests run real trial processes (slow); the stand-in trial program makes no W&B run."""

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.tasks import METRIC_KEYS
from conftest import silent_server, tiny_sweep_args, wait_for, write_task_files

runner = CliRunner()

# Trial 0 is planted before the sweep: COMPLETE, value -1 (never the best), objective 1.0
# after epoch 2, so that the median pruner stops every trial that reaches epoch 2 below it.
# Then, enqueued: one epoch (COMPLETE), two epochs (PRUNED), a learning rate that makes the
# loss NaN (FAIL).
OUTCOMES_SPEC = """name: outcomes
base:
  optim.max_grad_norm: 0
  train.log_every: 1
space:
  train.epochs: {type: categorical, choices: [1, 2]}
  train.lr: {type: categorical, choices: [1.0e-3, 1.0e+30]}
enqueue:
  - {train.epochs: 1, train.lr: 1.0e-3}
  - {train.epochs: 2, train.lr: 1.0e-3}
  - {train.epochs: 1, train.lr: 1.0e+30}
pruner: {name: median, n_startup_trials: 1}
"""


def wandb_records(path: Path):
    """The records of a W&B run file (`run-ID.wandb`): W&B's block log, LevelDB's layout
    (a 7-byte file header, 32 KiB blocks of chunks each with a 7-byte header, a record
    split over chunks FIRST/MIDDLE/LAST), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is no W&B run file"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a chunk header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at a block's end
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(run_dir: Path) -> dict:
    """An offline run's last run record (config, tags, group), merged summary and
    artifacts, from its run file."""
    (path,) = run_dir.glob("run-*.wandb")
    run, summary, artifacts = None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return {"id": run.run_id, "group": run.run_group, "job_type": run.job_type,
            "tags": list(run.tags), "summary": summary, "artifacts": artifacts,
            "config": {item.key: json.loads(item.value_json) for item in run.config.update}}


def offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """Every offline run under a W&B directory, by run id."""
    runs = [read_run(d) for d in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
    return {r["id"]: r for r in runs}


@pytest.fixture(scope="module")
def outcomes(tiny_encoder, tmp_path_factory):
    """The outcomes study swept offline, its best trial reseeded once, then exported with
    --wandb; HOME points into the test's directory (W&B's default staging place)."""
    root = tmp_path_factory.mktemp("outcomes")
    env = {"WANDB_DIR": str(root / "wandb-dir"), "WANDB_SILENT": "true",
           "HOME": str(root / "home"), "XDG_DATA_HOME": str(root / "home" / "data"),
           "XDG_CACHE_HOME": str(root / "home" / "cache")}
    saved = {key: os.environ.get(key) for key in [*env, "WANDB_API_KEY", "WANDB_DATA_DIR"]}
    os.environ.update(env)
    for key in ("WANDB_API_KEY", "WANDB_DATA_DIR"):
        os.environ.pop(key, None)
    try:
        out = root / "runs"
        out.mkdir()
        study = optuna.create_study(study_name="outcomes", direction="maximize",
                                    storage=f"sqlite:///{out}/mtbert.db")
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                                  value=-1.0, intermediate_values={2: 1.0}))
        (root / "outcomes.yaml").write_text(OUTCOMES_SPEC)
        args = tiny_sweep_args(root / "outcomes.yaml", tiny_encoder,
                               write_task_files(root / "data"), out, 3)
        args[args.index("--wandb-mode") + 1] = "offline"
        swept = runner.invoke(app, args)
        assert swept.exit_code == 0, swept.output
        reseeded = runner.invoke(app, ["-q", "best", "--out", str(out), "--reseed", "1",
                                       "--top", "1", "--wandb-mode", "offline",
                                       "--device", "cpu"])
        assert reseeded.exit_code == 0, reseeded.output
        exported = runner.invoke(app, ["best", "--out", str(out), "--export",
                                       str(root / "model"), "--wandb", "--wandb-mode",
                                       "offline"])
        assert exported.exit_code == 0, exported.output
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    trials = optuna.load_study(study_name="outcomes", storage=f"sqlite:///{out}/mtbert.db").trials
    return root, trials, offline_runs(root / "wandb-dir"), exported


@pytest.mark.slow
def test_each_trial_run_holds_its_state_tags_and_config_id(outcomes):
    _, trials, runs, _ = outcomes
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL",
                                              "COMPLETE"]
    assert trials[4].user_attrs["reseed_of"] == 1
    by_trial = {t.number: runs[t.user_attrs["wandb_run_id"]] for t in trials[1:]}
    for number, run in by_trial.items():
        assert run["group"] == "outcomes"
        assert run["config"]["trial"] == number
    # The reseed shares its configuration's id; every other trial is its own.
    assert {n: r["config"]["config_id"] for n, r in by_trial.items()} == \
        {1: 1, 2: 2, 3: 3, 4: 1}
    assert {t.number: t.user_attrs["config_id"] for t in trials[1:]} == \
        {1: 1, 2: 2, 3: 3, 4: 1}
    assert {n: r["summary"]["state"] for n, r in by_trial.items()} == \
        {1: "COMPLETE", 2: "PRUNED", 3: "FAIL", 4: "COMPLETE"}
    states = {"COMPLETE", "PRUNED", "FAIL"}
    assert {n: [tag for tag in r["tags"] if tag in states] for n, r in by_trial.items()} == \
        {1: ["COMPLETE"], 2: ["PRUNED"], 3: ["FAIL"], 4: ["COMPLETE"]}
    assert "reseed" in by_trial[4]["tags"] and "reseed" not in by_trial[1]["tags"]
    assert "loss became nan" in by_trial[3]["summary"]["fail_reason"].lower()
    assert by_trial[3]["summary"]["fail_reason"] == trials[3].user_attrs["fail_reason"]
    assert by_trial[2]["summary"]["prune_reason"].startswith("pruned after epoch ")
    assert "fail_reason" not in by_trial[1]["summary"]
    # A COMPLETE run's summary holds the metrics of the model it kept.
    assert by_trial[1]["summary"]["best/overall/geometric"] == \
        trials[1].user_attrs["overall/geometric"]


@pytest.mark.slow
def test_export_logs_the_model_directory_as_an_artifact_staged_under_the_wandb_dir(outcomes):
    root, trials, runs, exported = outcomes
    (export_run,) = [r for r in runs.values() if r["job_type"] == "export"]
    assert export_run["group"] == "outcomes"
    assert "W&B: model artifact outcomes-model:best" in exported.stderr
    (artifact,) = export_run["artifacts"]
    assert (artifact.type, artifact.name) == ("model", "outcomes-model")
    metadata = json.loads(artifact.metadata)
    chosen = trials[metadata["trial"]]
    assert chosen.number in (1, 4)  # the seed run of trial 1's configuration nearest its mean
    assert set(artifact.aliases) == {"best", f"trial-{chosen.number}", "latest"}
    assert metadata["params"] == chosen.params
    assert metadata["metrics"] == {key: chosen.user_attrs[key] for key in METRIC_KEYS}
    assert metadata["config_id"] == 1
    assert metadata["seeds"] == [trials[1].user_attrs["seed"], trials[4].user_attrs["seed"]]
    assert metadata["seeds"][1] == metadata["seeds"][0] + 1
    assert metadata["wandb_run_id"] == chosen.user_attrs["wandb_run_id"]
    assert export_run["config"]["trial"] == chosen.number
    # Every file of the model directory, staged under the study's W&B directory (where
    # `wandb sync` finds it), byte for byte; under the home directory only W&B's debug logs.
    model = root / "model"
    files = {str(p.relative_to(model)): p for p in model.rglob("*") if p.is_file()}
    contents = {c.path: c for c in artifact.manifest.contents}
    assert set(contents) == set(files) and "model.safetensors" in contents
    staging = (root / "wandb-dir" / "wandb" / "data").resolve()
    for name, entry in contents.items():
        staged = Path(entry.local_path)
        assert staged.is_relative_to(staging), staged
        assert hashlib.sha256(staged.read_bytes()).digest() == \
            hashlib.sha256(files[name].read_bytes()).digest()
        assert entry.size == files[name].stat().st_size
    assert [p for p in (root / "home").rglob("*") if p.is_file() and "logs" not in p.parts] \
        == []


def test_wandb_goes_with_export(tmp_path):
    result = runner.invoke(app, ["best", "--out", str(tmp_path), "--wandb"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("mtbert: error: --wandb goes with --export DIR (it logs "
                                     "the exported model)")


def _trial_pid(run_dir: Path) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mtbert.studies.trial" in argv and str(run_dir).encode() in argv:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_trial_process_stopped_by_sigterm_ends_its_run_as_fail_and_dies_by_it(
        tiny_encoder, task_dir, tmp_path):
    out = tmp_path / "runs"
    spec = tmp_path / "long.yaml"
    spec.write_text("name: long\nspace:\n  model.dropout: {type: float, low: 0.0, high: 0.2}\n"
                    "pruner: {name: none}\n")
    args = tiny_sweep_args(spec, tiny_encoder, task_dir, out, 1, "--max-retries", "0",
                           "--set", "train.steps_per_epoch=5000")
    args[args.index("--wandb-mode") + 1] = "offline"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_DIR": str(tmp_path / "wandb-dir"),
           "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    worker = subprocess.Popen([sys.executable, "-m", "mtbert", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = (out / "long" / "trial-0000").resolve()
    log = run_dir / "trial.log"
    wait_for(lambda: worker.poll() is not None or (log.exists() and "optimizer steps in"
                                                   in log.read_text()),
             timeout=120, what="the trial's training to start")
    assert worker.poll() is None, worker.communicate()[1]
    os.kill(wait_for(lambda: _trial_pid(run_dir), timeout=10, what="the trial process"),
            signal.SIGTERM)  # the trial alone, as a scheduler or the OOM killer would
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 1, err  # no trial finished
    (trial,) = optuna.load_study(study_name="long", storage=f"sqlite:///{out}/mtbert.db").trials
    # The worker saw the process die by the signal, as before.
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == \
        "killed by signal 15"
    run = offline_runs(tmp_path / "wandb-dir")[trial.user_attrs["wandb_run_id"]]
    assert run["summary"]["state"] == "FAIL"
    assert run["summary"]["fail_reason"] == "interrupted (SIGTERM)"
    assert "FAIL" in run["tags"]


def test_a_seed_run_that_ends_its_configurations_race_is_raced_out_in_wandb():
    from mtbert.studies import racing
    from mtbert.studies.trial import Outcome, outcome

    note = "raced out: p = 0.03 < 0.1 against configuration 0"
    ended = outcome(None, race=racing.RACED, race_note=note)
    assert ended == Outcome("RACED_OUT", 0, note)  # COMPLETE for Optuna: exit 0
    assert ended.summary == {"state": "RACED_OUT", "race_note": note}
    assert outcome(None, race=racing.CONTINUE).summary == {"state": "COMPLETE"}
    assert outcome(optuna.TrialPruned("pruned after epoch 1")).summary == \
        {"state": "PRUNED", "prune_reason": "pruned after epoch 1"}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_sweep_with_wandb_online_out_of_reach_goes_offline_said_once(monkeypatch, caplog):
    from mtbert.tracking import online_or_offline

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level("WARNING", logger="mtbert"):
        assert online_or_offline("online") == "offline"
        assert online_or_offline("offline") == "offline"
        assert online_or_offline("disabled") == "disabled"
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("W&B online: the server is out of reach (127.0.0.1:")
    assert "logged offline, to upload later with `wandb sync`" in said


@pytest.mark.slow
def test_a_trial_whose_wandb_server_never_answers_logs_offline_within_the_bound(
        tiny_encoder, task_dir, tmp_path, monkeypatch):
    """The server accepts connections and never answers (the sweep's check passes): the
    trial's run waits $WANDB_INIT_TIMEOUT, then logs offline, and the trial completes."""
    listener = silent_server()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "8")
    out = tmp_path / "runs"
    args = tiny_sweep_args("lr-decay", tiny_encoder, task_dir, out, 1)
    args[args.index("--wandb-mode") + 1] = "online"
    result = subprocess.run([sys.executable, "-m", "mtbert", *args], capture_output=True,
                            text=True, timeout=300)
    listener.close()
    assert result.returncode == 0, result.stderr
    trial_log = (out / "lr-decay" / "trial-0000" / "trial.log").read_text()
    assert "W&B online did not start within 8 s" in trial_log
    assert list((out / "wandb").glob("offline-run-*")) or list(out.rglob("offline-run-*"))
