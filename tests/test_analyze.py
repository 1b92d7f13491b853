"""`mtbert analyze` and `mtbert predict --all` on a tiny trained model: files, numbers, codes."""

import json
import shutil

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from typer.testing import CliRunner

import mtbert
from mtbert.analysis import confusion_matrix, per_class_metrics
from mtbert.cli import app
from mtbert.data import read_examples
from mtbert.tasks import TASKS

from conftest import write_task_files

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_root(tiny_encoder, tmp_path_factory):
    """One training shared by the tests that only read it: root/run/model, its dev files in
    root/data. A test that changes either works on a copy (`own_copy`)."""
    root = tmp_path_factory.mktemp("analyze")
    task_dir = write_task_files(root / "data")
    result = runner.invoke(app, [
        "-q", "train", "--data-dir", str(task_dir), "--out", str(root / "run"),
        "--device", "cpu", "--set", f"model.encoder={tiny_encoder}",
        "--set", f"data.cache_dir={root / 'cache'}", "--set", "train.epochs=1",
        "--set", "train.steps_per_epoch=6", "--set", "train.batch_size=8",
        "--set", "model.max_length=32", "--set", "train.lr=1e-3"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def trained(trained_root):
    return trained_root / "run" / "model"


@pytest.fixture
def task_dir(trained_root):
    return trained_root / "data"


def own_copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / path.name)


@pytest.fixture(scope="module")
def analysed(trained_root):
    out = trained_root / "analysis"
    result = runner.invoke(app, ["analyze", str(trained_root / "run" / "model"), "--data-dir",
                                 str(trained_root / "data"), "--out", str(out),
                                 "--examples", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"report: {out / 'analysis.md'}\n"
    return out, json.loads((out / "analysis.json").read_text())


def _outputs(model_dir, task_dir, name):
    model = mtbert.load(model_dir)
    examples = read_examples(task_dir / TASKS[name].files["dev"], TASKS[name])
    return examples, model.predict_outputs(examples)


def test_confusion_matrix_and_per_class_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 1])
    matrix = confusion_matrix(labels, predictions, 3)
    assert matrix.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    rows = per_class_metrics(matrix, ["a", "b", "c"])
    assert rows[0] == {"class": "a", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert rows[1]["precision"] == pytest.approx(0.5) and rows[1]["recall"] == pytest.approx(2 / 3)
    assert rows[1]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # Never predicted and never right: precision, recall and F1 are 0, not NaN.
    assert rows[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_analyze_writes_valid_pngs_a_report_and_the_numbers(analysed):
    out, numbers = analysed
    expected = {"sst-confusion.png", "qqp-confusion.png", "sts-scatter.png",
                "sts-error-by-gold.png"}
    assert set(numbers["figures"].values()) == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    report = (out / "analysis.md").read_text()
    for name in expected:
        assert f"]({name})" in report
    assert "| very negative |" in report and "Most confident false positives" in report
    assert set(numbers["metrics"]) == {"sst/acc", "qqp/acc", "sts/pearson",
                                       "overall/arithmetic", "overall/geometric"}
    assert numbers["missing"] == {} and numbers["split"] == "dev"


def test_classification_numbers_match_the_predictions(analysed, trained, task_dir):
    _, numbers = analysed
    for name in ("sst", "qqp"):
        examples, outputs = _outputs(trained, task_dir, name)
        gold, predicted = examples.labels.astype(int), outputs.predictions.astype(int)
        t = numbers["tasks"][name]
        classes = len(t["classes"])
        expected = [[int(np.sum((gold == i) & (predicted == j))) for j in range(classes)]
                    for i in range(classes)]
        assert t["confusion"] == expected
        assert t["examples"] == len(gold) == 24
        assert t["accuracy"] == pytest.approx(np.mean(gold == predicted))
        assert numbers["metrics"][f"{name}/acc"] == pytest.approx(t["accuracy"])
        f1s = []
        for k, row in enumerate(t["per_class"]):
            tp = np.sum((gold == k) & (predicted == k))
            precision = tp / max(np.sum(predicted == k), 1)
            recall = tp / max(np.sum(gold == k), 1)
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            f1s.append(f1)
            assert row["support"] == int(np.sum(gold == k))
            assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
                (precision, recall, f1))
        assert t["macro_f1"] == pytest.approx(np.mean(f1s))
    assert numbers["tasks"]["sst"]["classes"][0] == "very negative"


def test_false_positives_and_negatives_are_such_errors_most_confident_first(
        analysed, trained, task_dir):
    _, numbers = analysed
    examples, outputs = _outputs(trained, task_dir, "qqp")
    by_id = {i: k for k, i in enumerate(examples.ids)}
    positive = outputs.probabilities[:, 1]
    t = numbers["tasks"]["qqp"]
    for key, gold, predicted, sign in (("false_positives", 0, 1, -1),
                                       ("false_negatives", 1, 0, 1)):
        items = t[key]
        errors = np.flatnonzero((examples.labels == gold) & (outputs.predictions == predicted))
        assert len(items) == min(3, len(errors))
        for item in items:
            k = by_id[item["id"]]
            assert examples.labels[k] == gold and outputs.predictions[k] == predicted
            assert item["probability"] == pytest.approx(positive[k], abs=1e-6)
            assert (item["sentence1"], item["sentence2"]) == examples.texts[k]
        probs = [item["probability"] for item in items]
        assert probs == sorted(probs, key=lambda p: sign * p)
        # Nothing left out was more confident than the last one listed.
        if items and len(errors) > len(items):
            rest = sorted(sign * positive[errors])[len(items):]
            assert sign * probs[-1] <= rest[0] + 1e-6
    # The probabilities say the same as the predictions.
    assert np.array_equal(positive > 0.5, outputs.predictions == 1)


def test_sst_mistakes_are_wrong_and_most_confident_first(analysed, trained, task_dir):
    _, numbers = analysed
    examples, outputs = _outputs(trained, task_dir, "sst")
    names = numbers["tasks"]["sst"]["classes"]
    items = numbers["tasks"]["sst"]["confident_errors"]
    wrong = np.flatnonzero(examples.labels != outputs.predictions)
    assert len(items) == min(3, len(wrong))
    by_id = {i: k for k, i in enumerate(examples.ids)}
    for item in items:
        k = by_id[item["id"]]
        assert item["gold"] == names[int(examples.labels[k])] != item["predicted"]
        assert item["predicted"] == names[int(outputs.predictions[k])]
        assert item["probability"] == pytest.approx(outputs.probabilities[k].max(), abs=1e-6)
    probs = [item["probability"] for item in items]
    assert probs == sorted(probs, reverse=True)


def test_predict_outputs_probabilities_agree_with_predictions(trained, task_dir):
    for name in ("sst", "qqp"):
        _, outputs = _outputs(trained, task_dir, name)
        assert outputs.probabilities.shape == (24, TASKS[name].num_outputs if name == "sst"
                                               else 2)
        assert np.allclose(outputs.probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert np.array_equal(outputs.probabilities.argmax(axis=1), outputs.predictions)
    examples, outputs = _outputs(trained, task_dir, "sts")
    assert outputs.probabilities is None
    assert np.array_equal(outputs.predictions, mtbert.load(trained).predict_examples(examples))


def test_sts_numbers_match_scipy(analysed, trained, task_dir):
    _, numbers = analysed
    examples, outputs = _outputs(trained, task_dir, "sts")
    t = numbers["tasks"]["sts"]
    assert t["pearson"] == pytest.approx(pearsonr(outputs.predictions, examples.labels)[0],
                                         abs=1e-6)
    assert t["spearman"] == pytest.approx(spearmanr(outputs.predictions, examples.labels)[0],
                                          abs=1e-6)
    error = outputs.predictions - examples.labels
    assert t["mae"] == pytest.approx(np.abs(error).mean(), abs=1e-6)
    bins = np.floor(examples.labels + 0.5)
    assert sum(r["examples"] for r in t["error_by_gold"]) == len(error)
    for row in t["error_by_gold"]:
        assert row["mae"] == pytest.approx(np.abs(error[bins == row["gold"]]).mean(), abs=1e-6)
    worst = [abs(item["error"]) for item in t["worst"]]
    assert worst == sorted(worst, reverse=True) and worst[0] == pytest.approx(
        np.abs(error).max(), abs=1e-6)


def test_analyze_notes_a_missing_file_and_defaults_to_model_dir(trained, task_dir, tmp_path):
    trained, task_dir = own_copy(trained, tmp_path), own_copy(task_dir, tmp_path)
    (task_dir / "quora-dev.csv").unlink()
    result = runner.invoke(app, ["analyze", str(trained), "--data-dir", str(task_dir),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = trained / "analysis"
    numbers = json.loads((out / "analysis.json").read_text())
    assert set(numbers["tasks"]) == {"sst", "sts"}
    assert numbers["missing"] == {"qqp": str(task_dir / "quora-dev.csv")}
    assert not (out / "qqp-confusion.png").exists()
    assert "sst/acc" in numbers["metrics"] and "overall/geometric" not in numbers["metrics"]
    assert f"no dev file at {task_dir / 'quora-dev.csv'}" in (out / "analysis.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["analyze", "/nonexistent/model"], "is not an mtbert model directory"),
    (["analyze", "{model}", "--data-dir", "/nonexistent"],
     "no labelled dev file of the model's tasks in /nonexistent"),
    (["predict", "{model}", "--all", "--task", "sst", "--output-dir", "x"],
     "--all predicts every file of the model's tasks; drop --task"),
    (["predict", "{model}", "--all"], "--all needs --output-dir DIR"),
    (["predict", "{model}", "--task", "sst"], "missing --input, --output"),
    (["predict", "{model}", "--all", "--data-dir", "/nonexistent", "--output-dir", "x"],
     "no dev or test file of the model's tasks in /nonexistent"),
])
def test_bad_input_is_one_line_exit_2(trained, args, message):
    result = runner.invoke(app, [a.replace("{model}", str(trained)) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_bad_split_is_one_line_from_the_console_command(tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "mtbert", "analyze", str(tmp_path),
                           "--split", "val"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("mtbert: error: Invalid value for '--split'")
    assert "'dev', 'test', 'train'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _write_test_files(task_dir):
    """Test-student files: no label column, as the CS224N ones."""
    (task_dir / "ids-sst-test-student.csv").write_text(
        "\tid\tsentence\n0\tt0\tgood movie\n1\tt1\tawful plot\n2\tt2\t\n")
    (task_dir / "sts-test-student.csv").write_text(
        "\tid\tsentence1\tsentence2\n0\tu0\tthe man plays\tthe dog runs\n")


def test_predict_all_writes_the_cs224n_files_that_have_inputs(trained, task_dir, tmp_path):
    task_dir = own_copy(task_dir, tmp_path)
    _write_test_files(task_dir)
    out = tmp_path / "predictions"
    result = runner.invoke(app, ["predict", str(trained), "--all", "--data-dir", str(task_dir),
                                 "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    names = ["sst-dev-output.csv", "sst-test-output.csv", "para-dev-output.csv",
             "sts-dev-output.csv", "sts-test-output.csv"]
    assert result.stdout.splitlines() == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert f"missing: qqp test file {task_dir / 'quora-test-student.csv'}" in result.stderr
    headers = {"sst": "id\tPredicted_Sentiment", "para": "id\tPredicted_Is_Paraphrase",
               "sts": "id\tPredicted_Similarity"}
    rows = {"sst-dev-output.csv": 24, "para-dev-output.csv": 24, "sts-dev-output.csv": 24,
            "sst-test-output.csv": 2, "sts-test-output.csv": 1}  # t2 has no text: skipped
    for name in names:
        lines = (out / name).read_text().splitlines()
        assert lines[0] == headers[name.split("-")[0]]
        assert len(lines) - 1 == rows[name]
    assert [line.split("\t")[0] for line in
            (out / "sst-test-output.csv").read_text().splitlines()[1:]] == ["t0", "t1"]


def test_predict_all_dev_files_agree_with_eval(trained, task_dir, tmp_path):
    out = tmp_path / "predictions"
    result = runner.invoke(app, ["-q", "predict", str(trained), "--all", "--data-dir",
                                 str(task_dir), "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3  # no test files in task_dir
    evaluated = runner.invoke(app, ["eval", str(trained), "--data-dir", str(task_dir),
                                    "--json", "--device", "cpu"])
    metrics = json.loads(evaluated.stdout)
    model = mtbert.load(trained)
    for name, stem in (("sst", "sst"), ("qqp", "para"), ("sts", "sts")):
        task = TASKS[name]
        gold = read_examples(task_dir / task.files["dev"], task)
        lines = (out / f"{stem}-dev-output.csv").read_text().splitlines()[1:]
        predicted = dict(line.split("\t") for line in lines)
        values = np.array([float(predicted[i]) for i in gold.ids])
        exact = model.predict_examples(gold)
        # The file holds what eval scores: class ids as they are, scores to 4 decimals.
        assert np.allclose(values, exact, atol=5e-5, rtol=0)
        assert task.score(exact, gold.labels) == pytest.approx(metrics[task.metric_key])
        if name != "sts":  # a tiny model's scores differ in the 4th decimal: Pearson of
            # the rounded file is not that of the model
            assert task.score(values, gold.labels) == pytest.approx(metrics[task.metric_key])


def test_predict_one_file_still_works_and_rejects_all_options_without_all(trained, task_dir,
                                                                          tmp_path):
    out = tmp_path / "one.csv"
    result = runner.invoke(app, ["predict", str(trained), "--task", "sst", "--input",
                                 str(task_dir / "ids-sst-dev.csv"), "--output", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 25
    result = runner.invoke(app, ["predict", str(trained), "--task", "sst", "--input",
                                 str(task_dir / "ids-sst-dev.csv"), "--output", str(out),
                                 "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data-dir and --output-dir go with --all" in result.stderr


@pytest.mark.parametrize("head", ["classes", "cosine"])
def test_analyze_and_predict_all_take_every_sts_head(head, tiny_encoder, tmp_path):
    task_dir = write_task_files(tmp_path / "data")
    result = runner.invoke(app, [
        "-q", "train", "--data-dir", str(task_dir), "--out", str(tmp_path / "run"),
        "--device", "cpu", "--set", f"model.encoder={tiny_encoder}",
        "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.tasks=sts",
        "--set", "train.select_metric=sts/pearson", "--set", "model.pair_encoding=siamese",
        "--set", f"model.sts_head={head}", "--set", "train.epochs=1",
        "--set", "train.steps_per_epoch=4", "--set", "train.batch_size=8"])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "run" / "model"
    result = runner.invoke(app, ["analyze", str(model_dir), "--data-dir", str(task_dir),
                                 "--out", str(tmp_path / "analysis"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    examples, outputs = _outputs(model_dir, task_dir, "sts")
    # Scores, not class ids: the expected score (classes) or 5 cos(u, v) (cosine).
    assert outputs.predictions.shape == (len(examples.ids),)
    assert len(np.unique(outputs.predictions)) > 2
    assert numbers["tasks"]["sts"]["pearson"] == pytest.approx(
        pearsonr(outputs.predictions.astype(np.float64), examples.labels)[0], abs=1e-5)
    assert set(numbers["figures"].values()) == {"sts-scatter.png", "sts-error-by-gold.png"}
    result = runner.invoke(app, ["predict", str(model_dir), "--all", "--data-dir",
                                 str(task_dir), "--output-dir", str(tmp_path / "preds"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "preds" / "sts-dev-output.csv").read_text().splitlines()[1:]
    written = np.array([float(line.split("\t")[1]) for line in lines])
    np.testing.assert_allclose(written, outputs.predictions, atol=5e-5)
