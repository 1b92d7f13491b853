"""The CLI end to end on a tiny random model: exit codes, stdout, files."""

import json

import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.tasks import METRIC_KEYS

from conftest import write_task_files

runner = CliRunner()


def _train_args(tiny_encoder, task_dir, tmp_path):
    return ["train", "--data-dir", str(task_dir), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--set", f"model.encoder={tiny_encoder}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=1",
            "--set", "train.steps_per_epoch=4", "--set", "train.batch_size=8",
            "--set", "model.max_length=32"]


@pytest.fixture(scope="module")
def trained_run(tiny_encoder, tmp_path_factory):
    """One training through the CLI, shared by the tests that only read it: the run
    directory (root/run, its data in root/data) and the CLI's result."""
    root = tmp_path_factory.mktemp("cli")
    task_dir = write_task_files(root / "data")
    result = runner.invoke(app, ["-q", *_train_args(tiny_encoder, task_dir, root)])
    assert result.exit_code == 0, result.output
    return root / "run", result


@pytest.fixture
def trained(trained_run):
    return trained_run[0]


def _strategies():
    from mtbert.balancing import LOSS_METHODS
    from mtbert.schedules import SCHEDULES
    return [("train.schedule", name) for name in SCHEDULES] + \
        [("loss.method", name) for name in LOSS_METHODS]


@pytest.mark.parametrize("key, name", _strategies())
def test_every_schedule_and_loss_method_trains_by_name_alone(tiny_encoder, task_dir, tmp_path,
                                                             key, name):
    result = runner.invoke(app, ["-q", *_train_args(tiny_encoder, task_dir, tmp_path),
                                 "--set", f"{key}={name}"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"{key.split('.')[1]}: {name}" in config
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["step"] == 4 and 0.0 <= record["overall/geometric"] <= 1.0


def test_train_writes_the_run_and_prints_the_best_metrics(trained_run):
    trained, result = trained_run
    assert (trained / "model" / "model.safetensors").exists()
    config = (trained / "config.yaml").read_text()
    assert "steps_per_epoch: 4" in config
    summary = json.loads((trained / "summary.json").read_text())
    best = summary["best"]
    assert (best["epoch"], best["step"], summary["selection_metric"]) == \
        (1, 4, "overall/geometric")
    lines = result.stdout.splitlines()
    assert lines[0] == f"run: {trained}"
    assert lines[1] == "best: epoch 1 step 4 (by overall/geometric)"
    assert lines[-1] == f"model: {trained / 'model'}"
    printed = dict(line.split() for line in lines[2:-1])
    assert list(printed) == list(METRIC_KEYS) == list(best["metrics"])
    for key, value in printed.items():  # summary.json's value to the 4 decimals printed
        assert value == f"{best['metrics'][key]:.4f}", key


def test_eval_json_on_an_unseen_file_and_skip_counts(trained, tmp_path):
    import mtbert

    pairs = [("good movie", "good movie"), ("bad plot", "the cat"), ("the dog", "fast piano")]
    predicted = mtbert.load(trained / "model").predict("qqp", pairs)
    # Labels that agree with the model on the first two pairs and not on the third: 2/3
    # if every labelled row is scored against its own label and the empty one skipped.
    labels = [predicted[0], predicted[1], 1 - predicted[2]]
    rows = [f"{i}\t{i}x\t{a}\t{b}\t{float(y)}" for i, ((a, b), y) in
            enumerate(zip(pairs, labels))]
    path = tmp_path / "pairs.csv"
    path.write_text("\tid\tsentence1\tsentence2\tis_duplicate\n" + "\n".join(rows[:2]) +
                    "\n9\tc\tthe dog\tthe dog\t\n" + rows[2] + "\n")
    result = runner.invoke(app, ["eval", str(trained / "model"), "--task", "qqp", "--file",
                                 str(path), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert list(metrics) == ["qqp/acc"] and metrics["qqp/acc"] == pytest.approx(2 / 3)
    assert "skipped 1 of 4 rows (1 empty label)" in result.stderr


def test_eval_on_the_dev_files(trained):
    result = runner.invoke(app, ["eval", str(trained / "model"), "--data-dir",
                                 str(trained.parent / "data"),
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"sst/acc", "qqp/acc", "sts/pearson",
                                              "overall/arithmetic", "overall/geometric"}


def test_eval_missing_column_is_one_line_exit_2(trained, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("\tid\tsentence1\tsentence2\n0\ta\tx\ty\n")
    result = runner.invoke(app, ["eval", str(trained / "model"), "--task", "qqp", "--file",
                                 str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"mtbert: error: {path}: missing column 'is_duplicate' "
                                     "(found: id, sentence1, sentence2); qqp needs id, "
                                     "sentence1, sentence2, is_duplicate")


def test_predict_writes_the_cs224n_format(trained, tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("\tid\tsentence1\tsentence2\n0\tx1\tgood movie\tthe plot\n"
                    "1\tx2\tthe cat\tthe dog\n")
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(trained / "model"), "--task", "sts",
                                 "--input", str(path), "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "id\tPredicted_Similarity"
    assert [line.split("\t")[0] for line in lines[1:]] == ["x1", "x2"]
    assert all(0.0 <= float(line.split("\t")[1]) <= 5.0 for line in lines[1:])


def test_unknown_task_for_model(trained, tmp_path):
    result = runner.invoke(app, ["predict", str(trained / "model"), "--task", "mnli",
                                 "--input", "x", "--output", "y"])
    assert result.exit_code == 2
    assert "no 'mnli' head; its tasks: sst, qqp, sts" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.lrr=1"], "unknown config key 'train.lrr'; valid keys:"),
    (["train", "--set", "train.epochs=-1"], "bad value -1 for train.epochs"),
    (["config", "--set", "loss.method=magic"], "bad value 'magic' for loss.method; valid: sum"),
    (["train", "missing.yaml"], "config file missing.yaml does not exist"),
    (["eval", "/nonexistent/model"], "is not an mtbert model directory"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_missing_data_dir_is_one_line(tiny_encoder, tmp_path):
    result = runner.invoke(app, ["train", "--data-dir", str(tmp_path / "none"),
                                 "--set", f"model.encoder={tiny_encoder}",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "data directory" in result.stderr and "mtbert data download" in result.stderr


def test_resume_a_finished_run_changes_nothing(trained, tmp_path):
    import shutil

    trained = shutil.copytree(trained, tmp_path / "run")  # the shared run stays as it is
    before = (trained / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["-q", "train", "--resume", str(trained), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (trained / "metrics.jsonl").read_text() == before
    assert "best: epoch 1 step 4" in result.stdout


def test_config_show_and_version():
    result = runner.invoke(app, ["config", "--show"])
    assert result.exit_code == 0
    assert any(line.startswith("train.schedule ") and "annealed" in line
               for line in result.stdout.splitlines())
    resolved = runner.invoke(app, ["config", "--set", "train.lr=3e-5"])
    assert "lr: 3.0e-05" in resolved.stdout
    assert runner.invoke(app, ["--version"]).stdout.strip() == "mtbert 0.1.0"


def test_data_download_from_a_local_server(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "ok.csv").write_bytes(b"x\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import mtbert.download as download
    from mtbert.download import git_blob_id
    monkeypatch.setattr(download, "OFFICIAL_FILES",
                        {"ok.csv": git_blob_id(b"x\n"), "gone.csv": "0" * 40})
    try:
        result = runner.invoke(app, ["-q", "data", "download", "--data-dir",
                                     str(tmp_path / "d"), "--url",
                                     f"http://127.0.0.1:{server.server_port}/"])
    finally:
        server.shutdown()
    assert result.exit_code == 1
    assert "downloaded ok.csv" in result.stdout and "failed     gone.csv" in result.stdout
    assert (tmp_path / "d" / "ok.csv").read_bytes() == b"x\n"
    assert not (tmp_path / "d" / "gone.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu", "train"], "mtbert: error: No such option: --device"),
    (["train", "--device", "gpu"], "mtbert: error: Invalid value for '--device'"),
    (["sweep", "alpha", "--trials", "0"], "mtbert: error: Invalid value for '--trials'"),
])
def test_usage_errors_are_one_line_from_the_console_command(args, message):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "mtbert", *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1


def test_unwritable_output_is_one_line(trained, tmp_path):
    result = runner.invoke(app, ["predict", str(trained / "model"), "--task", "sst", "--input",
                                 str(trained.parent / "data" / "ids-sst-dev.csv"),
                                 "--output", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"mtbert: error: Is a directory: {tmp_path}"
