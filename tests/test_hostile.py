"""Hostile input: every bad file, value or model directory is one line and exit 2, never a
traceback, and no row of a task file goes unaccounted for."""

import json
import shutil

import pytest
from typer.testing import CliRunner

import mtbert
from mtbert.cli import app
from mtbert.config import build_config
from mtbert.data import read_examples
from mtbert.errors import MtbertError
from mtbert.tasks import TASKS

from conftest import write_task_files

runner = CliRunner()

SST_HEADER = "\tid\tsentence\tsentiment"


def sst_lines(n: int) -> list[str]:
    return [f"{i}\tr{i}\tgood movie {i}\t{i % 5}" for i in range(n)]


def error_line(result, code: int = 2) -> str:
    """The one `mtbert: error:` line of a failed command (log lines may come before it)."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("mtbert: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def trained(tiny_encoder, tmp_path_factory):
    """One short training whose training files are hostile: sst-train.csv opens a quote on
    line 6 that never closes, quora-train.csv has a line of Latin-1 bytes."""
    from mtbert.train import train

    root = tmp_path_factory.mktemp("hostile")
    data = write_task_files(root / "data")
    sst = (data / "ids-sst-train.csv").read_text().splitlines()
    fields = sst[6].split("\t")
    fields[2] = '"' + fields[2]  # the sentence of line 6 opens a quote
    sst[6] = "\t".join(fields)
    (data / "ids-sst-train.csv").write_text("\n".join(sst) + "\n")
    qqp = (data / "quora-train.csv").read_bytes().split(b"\n")
    qqp[3] = qqp[3].replace(b"\tqqptrain2\t", b"\tqqptrain2\tcaf\xe9 ")
    (data / "quora-train.csv").write_bytes(b"\n".join(qqp))
    config = build_config({
        "model": {"encoder": str(tiny_encoder), "max_length": 32},
        "data": {"dir": str(data), "cache_dir": str(root / "cache")},
        "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "lr": 1e-3,
                  "eval_batch_size": 16, "log_every": 2}})
    train(config, run_dir=root / "run", device="cpu", progress=False)
    return root / "run"


# 1. An unclosed quote never swallows the lines after it --------------------------------

def _unclosed(lines, at, text):
    lines[at] = text
    return lines


READER_CASES = {
    # name: (data lines, ids kept, skip reasons, lines with an unclosed quote)
    "never closes (the 61-row report)": (
        _unclosed(sst_lines(61), 4, '4\tr4\t"good movie 4\t4'), 61, {}, 1),
    "closed by a stray quote 4 lines later": (
        _unclosed(_unclosed(sst_lines(10), 2, '2\tr2\t"good movie\t2'),
                  6, '6\tr6\tgood movie"\t1'), 10, {}, 1),
    "on the last line, no final newline": (
        _unclosed(sst_lines(5), 4, '4\tr4\t"good movie\t4'), 5, {}, 1),
    "in the label": (
        _unclosed(sst_lines(5), 1, '1\tr1\tgood movie\t"1'), 4, {"label out of range": 1}, 1),
    "two unclosed": (
        _unclosed(_unclosed(sst_lines(8), 1, '1\tr1\t"a\t1'), 5, '5\tr5\t"b\t0'), 8, {}, 2),
    "quoted fields that close parse as before": (
        _unclosed(sst_lines(5), 1, '1\tr1\t"a ""fine""\tfilm"\t1'), 5, {}, 0),
    "a blank line and a row with an extra field": (
        _unclosed(_unclosed(sst_lines(6), 1, ""), 2, "2\tr2\tgood\t2\textra"), 4,
        {"blank line": 1, "too many fields": 1}, 0),
}


@pytest.mark.parametrize("name", list(READER_CASES))
def test_every_line_is_a_row_kept_or_skipped(tmp_path, name):
    lines, kept, reasons, unclosed = READER_CASES[name]
    path = tmp_path / "sst.csv"
    final = "" if "no final newline" in name else "\n"
    path.write_text("\n".join([SST_HEADER, *lines]) + final)
    examples = read_examples(path, TASKS["sst"])
    stats = examples.stats
    assert (stats.rows, len(examples.ids), stats.skipped) == (len(lines), kept, len(lines) - kept)
    assert stats.reasons == reasons
    assert stats.unclosed_quotes == unclosed
    assert stats.to_json()["unclosed_quotes"] == unclosed
    if unclosed and not reasons:  # the quote is read as a character of the text
        assert any(text[0].startswith('"') for text in examples.texts)
    if "close parse as before" in name:
        assert examples.texts[1] == ('a "fine"\tfilm',)


@pytest.mark.parametrize("name", ["never closes (the 61-row report)",
                                  "closed by a stray quote 4 lines later",
                                  "on the last line, no final newline"])
def test_predict_writes_one_prediction_per_line(trained, tmp_path, name):
    lines = READER_CASES[name][0]
    path = tmp_path / "test.csv"
    path.write_text("\n".join(["\tid\tsentence", *(line.rsplit("\t", 1)[0] for line in lines)])
                    + "\n")
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(trained / "model"), "--task", "sst", "--input",
                                 str(path), "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = out.read_text().splitlines()[1:]
    assert [line.split("\t")[0] for line in written] == [f"r{i}" for i in range(len(lines))]
    assert "open a quote that never closes" in result.stderr


def test_summary_counts_every_line_of_the_training_files(trained):
    data = json.loads((trained / "summary.json").read_text())["data"]
    assert data["sst/train"]["rows"] == 48 and data["sst/train"]["skipped"] == 0
    assert data["sst/train"]["unclosed_quotes"] == 1
    assert data["qqp/train"]["rows"] == 48 and data["qqp/train"]["skipped"] == 1
    assert data["qqp/train"]["skip_reasons"] == {"not UTF-8": 1}


# 2. Bytes that are not UTF-8 are counted, never replaced ------------------------------

@pytest.mark.parametrize("bad", [b"\xff", b"caf\xe9", b"\xe2\x82", b"\xed\xa0\x80", b"\x80\x80"])
@pytest.mark.parametrize("column", ["sentence", "id"])
def test_lines_that_are_not_utf8_are_skipped_and_counted(tmp_path, bad, column):
    rows = [line.encode() for line in sst_lines(4)]
    rows[2] = (b"2\tr2\tgood " + bad + b" movie\t2" if column == "sentence"
               else b"2\tr" + bad + b"\tgood movie\t2")
    path = tmp_path / "sst.csv"
    path.write_bytes(b"\n".join([SST_HEADER.encode(), *rows]) + b"\n")
    examples = read_examples(path, TASKS["sst"])
    assert examples.ids == ["r0", "r1", "r3"]
    assert (examples.stats.rows, examples.stats.skipped) == (4, 1)
    assert examples.stats.reasons == {"not UTF-8": 1}
    assert not any("\ufffd" in text[0] for text in examples.texts)


def test_predict_reports_lines_that_are_not_utf8(trained, tmp_path):
    path = tmp_path / "test.csv"
    path.write_bytes(b"\tid\tsentence\n0\ta\tgood movie\n1\tb\tcaf\xe9 film\n2\tc\tthe plot\n")
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(trained / "model"), "--task", "sst", "--input",
                                 str(path), "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in out.read_text().splitlines()[1:]] == ["a", "c"]
    assert "skipped 1 of 3 rows (1 not UTF-8)" in result.stderr


# 3. An error that quotes a header quotes a short printable prefix ---------------------

@pytest.mark.parametrize("content", [
    b"x" * 5_000_000,  # one 5 MB line
    bytes(range(256)) * 64,  # binary
    b"\x1f\x8b\x08\x00" + bytes(range(255, 0, -1)) * 8,  # a gzip file
    b'\tid\t"sentence\tsentiment\n' + b"0\ta\tgood\t1\n" * 20_000,  # a quote opened in it
    "\tid\u2028\tphrase\x00\tsentiment\n0\ta\tgood\t1\n".encode(),
], ids=["5MB", "binary", "gzip", "open-quote", "control-chars"])
def test_missing_column_error_quotes_a_short_printable_header(trained, tmp_path, content):
    path = tmp_path / "sst.csv"
    path.write_bytes(content)
    result = runner.invoke(app, ["eval", str(trained / "model"), "--task", "sst", "--file",
                                 str(path), "--device", "cpu"])
    line = error_line(result)
    assert f"{path}: missing column '" in line
    assert len(line) < 400 and line.isprintable()


# 4. A directory or a missing file as a task file --------------------------------------

@pytest.mark.parametrize("kind, message", [("directory", "is a directory"),
                                           ("missing", "does not exist")])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_task_file_that_is_a_directory_or_missing(trained, tmp_path, kind, message, command):
    target = tmp_path / "sst.csv"
    if kind == "directory":
        target.mkdir()
    args = (["--input", str(target), "--output", str(tmp_path / "p.csv")] if command == "predict"
            else ["--file", str(target)])
    result = runner.invoke(app, [command, str(trained / "model"), "--task", "sst", *args,
                                 "--device", "cpu"])
    line = error_line(result)
    assert line.startswith(f"mtbert: error: data file {target} {message}")


# 5. Config values: finite floats, 32-bit seeds, no duplicates, upper bounds -----------

@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "bad value 'nan' for train.lr; expected a finite number"),
    ("train.alpha=nan", "bad value 'nan' for train.alpha; expected a finite number"),
    ("optim.warmup=inf", "bad value 'inf' for optim.warmup; expected a finite number, valid "
                         "range: 0.0..1.0"),
    ("train.lr=-.inf", "bad value -inf for train.lr; expected a finite number, valid range: "
                       "0.0..inf"),
    ("loss.weights.sst=nan", "bad value 'nan' for loss.weights.sst; expected a finite number"),
    ("optim.head_lr.qqp=inf", "bad value 'inf' for optim.head_lr.qqp; expected a finite number"),
    ("train.epochs=inf", "bad value 'inf' for train.epochs; expected an integer, valid range: "
                         "1..10000"),
    ("train.seed=-1", "bad value -1 for train.seed; valid range: 0..4294967295"),
    ("train.seed=4294967296", "bad value 4294967296 for train.seed; valid range: 0..4294967295"),
    ("data.tasks=sst,sst", "bad value 'sst,sst' for data.tasks; 'sst' is listed more than once "
                           "(each at most once; valid: sst, qqp, sts)"),
    ("loss.contrastive_tasks=qqp,sts,qqp", "bad value 'qqp,sts,qqp' for loss.contrastive_tasks; "
                                           "'qqp' is listed more than once"),
    ("model.head_hidden=65537", "bad value 65537 for model.head_hidden; valid range: 0..65536"),
    ("train.batch_size=100000", "bad value 100000 for train.batch_size; valid range: 1..65536"),
    ("train.eval_batch_size=1e9", "bad value '1e9' for train.eval_batch_size; valid range: "
                                  "1..65536"),
    ("train.steps_per_epoch=100000000", "bad value 100000000 for train.steps_per_epoch; valid "
                                        "range: 0..10000000"),
    ("data.max_train_examples=99999999999", "bad value 99999999999 for "
                                            "data.max_train_examples; valid range: "
                                            "0..1000000000"),
    ("model.max_length=513", "bad value 513 for model.max_length; valid range: 8..512"),
    ("optim.train_layers=1,-1", "bad value '-1' for optim.train_layers; valid range: 0..inf"),
])
def test_bad_config_values_name_key_value_and_range(override, message):
    line = error_line(runner.invoke(app, ["config", "--set", override]))
    assert line.startswith(f"mtbert: error: {message}")


def test_bad_values_in_a_yaml_file_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: .nan\n")
    line = error_line(runner.invoke(app, ["config", str(path)]))
    assert line == ("mtbert: error: bad value nan for train.lr; expected a finite number, "
                    "valid range: 0.0..inf")


@pytest.mark.parametrize("override", ["train.seed=4294967295", "model.head_hidden=65536",
                                      "train.seed=0", "data.tasks=sts,sst"])
def test_limits_themselves_are_valid(override):
    result = runner.invoke(app, ["config", "--set", override])
    assert result.exit_code == 0, result.output


def test_config_show_names_the_limits():
    result = runner.invoke(app, ["config", "--show"])
    assert result.exit_code == 0
    shown = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert shown["model.head_hidden"].endswith("Range: 0..65536.")
    assert shown["train.seed"].endswith("Range: 0..4294967295.")
    assert "Each at most once." in shown["data.tasks"]


# 6. pretrain and compare options ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["pretrain", "--lr", "nan"], "bad --lr nan; valid: a finite number > 0"),
    (["pretrain", "--lr", "inf"], "bad --lr inf; valid: a finite number > 0"),
    (["pretrain", "--epochs", "inf"], "bad --epochs inf; valid: a number > 0 and <= 10000"),
    (["pretrain", "--mask-prob", "nan"], "bad --mask-prob nan; valid: between 0 and 1"),
    (["pretrain", "--seed", "-1"], "bad --seed -1; valid range: 0..4294967295"),
    (["pretrain", "--seed", "4294967296"], "bad --seed 4294967296; valid range: 0..4294967295"),
    (["pretrain", "--batch-size", "100000"], "bad --batch-size 100000; valid range: 1..65536"),
    (["compare", "multitask", "--seed-list", "-1"],
     "bad seed -1 in [-1]; valid range: 0..4294967295"),
    (["compare", "multitask", "individual", "--seed-list", "0,4294967296"],
     "bad seed 4294967296 in [0, 4294967296]; valid range: 0..4294967295"),
])
def test_pretrain_and_compare_options(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert error_line(result) == f"mtbert: error: {message}"
    assert not (tmp_path / "out").exists()


# 7. Broken model directories ----------------------------------------------------------

def _truncate(d):
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _edit_json(**changes):
    def edit(d):
        path = d / "encoder_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _write(name, content: bytes):
    return lambda d: (d / name).write_bytes(content)


BROKEN = {
    "weights truncated": (_truncate, "model.safetensors is not a readable safetensors file"),
    "weights empty": (_write("model.safetensors", b""),
                      "model.safetensors is not a readable safetensors file"),
    "weights garbage": (_write("model.safetensors", b"\x00\xff" * 4096),
                        "model.safetensors is not a readable safetensors file"),
    "config.yaml not YAML": (_write("config.yaml", b"model: [1\n"),
                             "config.yaml is not valid YAML (line 2)"),
    "config.yaml a list": (_write("config.yaml", b"- 1\n- 2\n"),
                           "config.yaml must hold a mapping of config keys"),
    "config.yaml binary": (_write("config.yaml", b"\xff\xfe\x00\x01"),
                           "config.yaml is not UTF-8 text"),
    "config.yaml empty": (_write("config.yaml", b""), "config.yaml is empty"),
    "config.yaml bad value": (_write("config.yaml", b"train: {lr: .nan}\n"),
                              "config.yaml: bad value nan for train.lr"),
    "config.yaml other heads": (_write("config.yaml", b"model: {head_hidden: 7}\n"),
                                "model.safetensors does not fit encoder_config.json and "
                                "config.yaml: missing heads.sst.mlp.4.weight"),
    "encoder_config.json not JSON": (_write("encoder_config.json", b"{hidden_size: 32"),
                                     "encoder_config.json is not valid JSON (line 1"),
    "encoder_config.json a list": (_write("encoder_config.json", b"[32, 2]"),
                                   "encoder_config.json must hold a JSON object"),
    "encoder wider than the weights": (_edit_json(hidden_size=64),
                                       "model.safetensors does not fit encoder_config.json and "
                                       "config.yaml: misshaped encoder.word_emb.weight (48, 32) "
                                       "(expected (48, 64))"),
    "encoder deeper than the weights": (_edit_json(num_hidden_layers=3),
                                        "model.safetensors does not fit encoder_config.json and "
                                        "config.yaml: missing encoder.layers.2."),
    "encoder of a billion layers": (_edit_json(num_hidden_layers=10**9),
                                    "encoder_config.json has num_hidden_layers 1000000000; "
                                    "valid: an integer in 0..1024"),
    "encoder size a string": (_edit_json(hidden_size="32"),
                              "encoder_config.json has hidden_size '32'; valid: an integer"),
    "encoder heads do not divide": (_edit_json(num_attention_heads=5),
                                    "encoder_config.json: hidden size 32 is not a multiple of 5 "
                                    "attention heads"),
    "tokenizer garbage": (lambda d: ((d / "vocab.txt").unlink(),
                                     (d / "tokenizer.json").write_bytes(b"\x00garbage")),
                          "has tokenizer files that cannot be read"),
    "metrics.json not JSON": (_write("metrics.json", b"{"), "metrics.json is not valid JSON"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_model_directory_is_one_line(trained, tmp_path, name):
    breaks, message = BROKEN[name]
    model = shutil.copytree(trained / "model", tmp_path / "model")
    breaks(model)
    with pytest.raises(MtbertError) as err:
        mtbert.load(model)
    assert message in str(err.value) and str(model) in str(err.value)
    assert "\n" not in str(err.value)
    result = runner.invoke(app, ["eval", str(model), "--task", "sst", "--file",
                                 str(trained.parent / "data" / "ids-sst-dev.csv"),
                                 "--device", "cpu"])
    assert message in error_line(result)


@pytest.mark.parametrize("kind, message", [
    ("missing", "is not an mtbert model directory: it is not there"),
    ("file", "is not an mtbert model directory: it is a file"),
    ("empty", "is not an mtbert model directory (no config.yaml)")])
def test_model_directory_that_is_not_one(tmp_path, kind, message):
    path = tmp_path / kind
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    line = error_line(runner.invoke(app, ["predict", str(path), "--task", "sst", "--input", "x",
                                          "--output", str(tmp_path / "p.csv")]))
    assert str(path) in line and message in line
