"""`mtbert compare`: runs per config and seed, the table's numbers, the paired test,
resuming, failures and bad input."""

import io
import json
import os
import re
import statistics

import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.compare import CompareDisplay
from mtbert.tasks import METRIC_KEYS, overall_scores

from conftest import write_task_files

runner = CliRunner()


def _args(tiny_encoder, data, out, *extra):
    return ["compare", *extra, "--out", str(out), "--data-dir", str(data), "--device", "cpu",
            "--set", f"model.encoder={tiny_encoder}", "--set", f"data.cache_dir={out}/cache",
            "--set", "train.epochs=1", "--set", "train.steps_per_epoch=3",
            "--set", "train.batch_size=8", "--set", "model.max_length=32",
            "--set", "train.eval_batch_size=16", "--set", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def compared(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = write_task_files(root / "data")
    result = runner.invoke(app, ["-q", *_args(tiny_encoder, data, root / "out", "individual",
                                              "multitask", "--seeds", "2")])
    assert result.exit_code == 0, result.output
    return root, result


def _summary(path):
    return json.loads((path / "summary.json").read_text())["best"]["metrics"]


def _per_seed(out):
    """Per config, per seed: the metrics computed here from the runs' summary.json files."""
    numbers = {"individual": {}, "multitask": {}}
    for seed in (0, 1):
        scores = {"sst/acc": _summary(out / "individual" / f"seed{seed}" / "sst")["sst/acc"],
                  "qqp/acc": _summary(out / "individual" / f"seed{seed}" / "qqp")["qqp/acc"],
                  "sts/pearson": _summary(out / "individual" / f"seed{seed}" / "sts")
                  ["sts/pearson"]}
        numbers["individual"][seed] = {**scores, **overall_scores(scores)}
        numbers["multitask"][seed] = _summary(out / "multitask" / f"seed{seed}")
    return numbers


def test_individual_trains_one_single_task_model_per_task_and_seed(compared):
    root, _ = compared
    out = root / "out"
    for seed in (0, 1):
        for task in ("sst", "qqp", "sts"):
            config = yaml.safe_load((out / "individual" / f"seed{seed}" / task /
                                     "config.yaml").read_text())
            assert config["data"]["tasks"] == [task] and config["train"]["seed"] == seed
            assert set(_summary(out / "individual" / f"seed{seed}" / task)) >= {
                {"sst": "sst/acc", "qqp": "qqp/acc", "sts": "sts/pearson"}[task]}
        config = yaml.safe_load((out / "multitask" / f"seed{seed}" / "config.yaml").read_text())
        assert config["data"]["tasks"] == ["sst", "qqp", "sts"]
        assert config["train"]["seed"] == seed
    saved = json.loads((out / "compare.json").read_text())
    numbers = _per_seed(out)
    for name in ("individual", "multitask"):
        for seed in (0, 1):
            got = saved["runs"][name][str(seed)]["metrics"]
            assert got == pytest.approx({k: numbers[name][seed][k] for k in METRIC_KEYS})


def test_table_shows_mean_std_and_the_paired_t_test_of_the_seed_numbers(compared):
    root, result = compared
    numbers = _per_seed(root / "out")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("compare out: individual vs multitask: seeds 0, 1;")
    assert lines[1].split()[:7] == ["config", "seeds", *METRIC_KEYS]
    rows = {line.split()[0]: line for line in lines[2:4]}
    for name, row in rows.items():
        for key in METRIC_KEYS:
            values = [numbers[name][s][key] for s in (0, 1)]
            cell = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (2)"
            assert cell in row, (name, key, row)
    assert rows["individual"].split()[-1] == "baseline"
    a = [numbers["multitask"][s]["overall/geometric"] for s in (0, 1)]
    b = [numbers["individual"][s]["overall/geometric"] for s in (0, 1)]
    diff = statistics.mean(x - y for x, y in zip(a, b))
    p = stats.ttest_rel(a, b).pvalue
    assert rows["multitask"].split()[-2:] == [f"{diff:+.4f}", f"{p:.3g}"]
    saved = json.loads((root / "out" / "compare.json").read_text())
    assert saved["paired"]["multitask"]["overall/geometric"]["p_ttest"] == pytest.approx(p)
    start = lines.index("paired differences vs individual:") + 2  # past the header
    paired = {line.split()[1]: line.split() for line in lines[start:start + len(METRIC_KEYS)]}
    assert list(paired) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        a = [numbers["multitask"][s][key] for s in (0, 1)]
        b = [numbers["individual"][s][key] for s in (0, 1)]
        diffs = [x - y for x, y in zip(a, b)]
        cells = paired[key]
        assert cells[2] == f"{statistics.mean(diffs):+.4f}" and cells[-1] == "2"
        if key in ("sst/acc", "qqp/acc"):
            # The tiny models predict one class whatever the seed: the same accuracy
            # everywhere, a difference without variance and so no test.
            assert diffs == [0.0, 0.0] and cells[3] == "n/a"
        else:  # continuous scores differ seed by seed: the test has its p-value
            assert diffs[0] != diffs[1]
            assert cells[3] == f"{stats.ttest_rel(a, b).pvalue:.3g}"
    assert ("n/a (multitask: sst/acc, qqp/acc): the difference is the same on every seed "
            "(no variance to test)") in lines
    md = (root / "out" / "compare.md").read_text()
    assert "| config | seeds | sst/acc |" in md and "almost no power" in md
    assert f"| {rows['multitask'].split()[0]} | 2/2 |" in md
    # The per-seed figure sits beside the table and the Markdown links it.
    assert "![per-seed dev metrics](compare.png)" in md
    assert (root / "out" / "compare.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_second_run_reads_finished_runs_instead_of_training(compared, tiny_encoder):
    root, first = compared
    out = root / "out"
    before = (out / "multitask" / "seed1" / "summary.json").stat().st_mtime_ns
    again = runner.invoke(app, _args(tiny_encoder, root / "data", out, "individual",
                                     "multitask", "--seeds", "2"))
    assert again.exit_code == 0, again.output
    assert again.stderr.count("finished earlier") == 8 and ": training in" not in again.stderr
    assert (out / "multitask" / "seed1" / "summary.json").stat().st_mtime_ns == before
    assert again.stdout == first.stdout
    # A run saved before a config key existed trained with its default: still the same config.
    saved = out / "multitask" / "seed1" / "config.yaml"
    written = yaml.safe_load(saved.read_text())
    del written["loss"]["contrastive"]
    saved.write_text(yaml.safe_dump(written))
    older = runner.invoke(app, _args(tiny_encoder, root / "data", out, "individual",
                                     "multitask", "--seeds", "2"))
    assert older.exit_code == 0, older.output
    assert older.stdout == first.stdout
    # Other --set values would mix two configs under one name: refused before training.
    changed = runner.invoke(app, [*_args(tiny_encoder, root / "data", out, "individual",
                                         "multitask", "--seeds", "2"),
                                  "--set", "train.lr=2e-3"])
    assert changed.exit_code == 2
    assert "holds a run of another config (train.lr differ)" in changed.stderr


def _multitask_against(tiny_encoder, root, name: str, config: str, *seeds: str):
    """`compare multitask NAME.yaml` with `config` as the YAML text; the result and the
    table row of NAME."""
    data = write_task_files(root / "data")
    (root / f"{name}.yaml").write_text(config)
    result = runner.invoke(app, _args(tiny_encoder, data, root / "out", "multitask",
                                      str(root / f"{name}.yaml"), *seeds))
    row = next(line for line in result.stdout.splitlines() if line.startswith(name))
    return result, row


def test_a_failed_run_is_reported_and_the_others_finish(tiny_encoder, tmp_path):
    result, row = _multitask_against(tiny_encoder, tmp_path, "broken",
                                     "data:\n  files:\n    sst: {train: missing.csv}\n",
                                     "--seeds", "1")
    assert result.exit_code == 1
    assert "1 of 2 seed runs failed" in result.stderr
    assert "broken seed 0: FAILED:" in result.stderr and "missing.csv" in result.stderr
    # Not a terminal: plain lines, the training's one per evaluation, and no progress bar's
    # carriage returns or any other control character.
    assert "mtbert: epoch 1/1: sst/acc " in result.stderr
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", result.stderr)
    assert row.split()[1] == "0/1" and row.split()[2] == "-"
    assert (tmp_path / "out" / "multitask" / "seed0" / "summary.json").exists()
    # One seed: no test, and the table says why.
    assert "n/a (broken: every metric): no seed finished for both" in result.stdout


def test_set_for_overrides_one_config_after_set(tiny_encoder, tmp_path):
    result, _ = _multitask_against(tiny_encoder, tmp_path, "wide", "model: {head_hidden: 16}\n",
                                   "--seed-list", "0", "--set-for",
                                   "multitask:train.steps_per_epoch=2")
    assert result.exit_code == 0, result.output
    saved = {name: yaml.safe_load((tmp_path / "out" / name / "seed0" / "config.yaml")
                                  .read_text()) for name in ("multitask", "wide")}
    # --set gives both 3 steps per epoch; --set-for gives multitask 2.
    assert saved["multitask"]["train"]["steps_per_epoch"] == 2
    assert saved["wide"]["train"]["steps_per_epoch"] == 3
    assert saved["wide"]["model"]["head_hidden"] == 16
    assert saved["multitask"]["model"]["head_hidden"] == 0


def test_one_seed_gives_no_p_value_and_says_why(tiny_encoder, tmp_path):
    result, row = _multitask_against(tiny_encoder, tmp_path, "wide",
                                     "model: {head_hidden: 16}\n", "--seed-list", "5")
    assert result.exit_code == 0, result.output
    assert row.split()[-1] == "n/a"
    assert "n/a (wide: every metric): 1 pair; a paired test needs 2 or more seeds" in result.stdout
    assert (tmp_path / "out" / "wide" / "seed5" / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["individual", "singletask"], "unknown config or preset 'singletask'; presets: "
                                   "individual, multitask, or a path to a run-config YAML file"),
    (["individual", "multitask", "--baseline", "mt"], "baseline 'mt' is not one of the "
                                                      "configs: individual, multitask"),
    (["multitask", "multitask"], "two configs are named 'multitask'"),
    (["multitask", "nothere.yaml"], "config file nothere.yaml does not exist"),
    (["multitask", "--metric", "acc"], "unknown metric 'acc'; valid: sst/acc"),
    (["multitask", "--seed-list", "1,x"], "bad --seed-list '1,x'; expected integers"),
    ([], "name the configs to compare"),
    (["individual", "multitask", "--set-for", "mt:train.lr=1e-3"],
     "--set-for 'mt:train.lr=1e-3' names no config of this comparison; configs: individual, "
     "multitask"),
    (["multitask", "--set-for", "multitask=train.lr"], "bad --set-for 'multitask=train.lr'; "
                                                        "expected CONFIG:KEY=VALUE"),
    (["multitask", "--set-for", "multitask:train.nothing=1"],
     "unknown config key 'train.nothing'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["compare", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_wandb_offline_logs_one_run_per_training(tiny_encoder, tmp_path, monkeypatch):
    import wandb  # noqa: F401 - a core dependency, never skipped
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_task_files(tmp_path / "data")
    result = runner.invoke(app, ["-q", *_args(tiny_encoder, data, tmp_path / "out",
                                              "multitask", "--seeds", "2",
                                              "--wandb-mode", "offline")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))) == 2


def test_a_killed_run_continues_from_its_last_epoch(tiny_encoder, tmp_path, monkeypatch):
    import mtbert.train

    real = mtbert.train.train

    def killed_after_first_epoch(config, **kwargs):
        def on_eval(epoch, step, metrics):
            raise KeyboardInterrupt  # as Ctrl-C right after the first epoch's state is saved
        return real(config, **{**kwargs, "on_eval": on_eval})

    data = write_task_files(tmp_path / "data")
    args = [*_args(tiny_encoder, data, tmp_path / "out", "multitask", "--seeds", "1"),
            "--set", "train.epochs=2"]
    monkeypatch.setattr(mtbert.train, "train", killed_after_first_epoch)
    killed = runner.invoke(app, args)
    assert killed.exit_code == 130
    run = tmp_path / "out" / "multitask" / "seed0"
    first = (run / "metrics.jsonl").read_text().splitlines()
    assert len(first) == 1 and (run / "resume.pt").exists()
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(mtbert.train, "train", real)
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert "multitask seed 0: resuming in" in resumed.stderr
    assert f"resuming {run} after epoch 1 of 2" in resumed.stderr  # the training's own line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == first[0] and [json.loads(x)["epoch"] for x in lines] == [1, 2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_terminal_the_running_training_and_the_comparison_are_redrawn(monkeypatch):
    terminal, now = _Terminal(), [100.0]
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("mtbert.compare.time.time", lambda: now[0])
    monkeypatch.setattr("mtbert.live.FALLBACK_SIZE", os.terminal_size((120, 24)))

    def at(seconds, call, *args, **kwargs):
        now[0] = seconds
        call(*args, **kwargs)

    display = CompareDisplay(live=True, name="a-vs-b", total=2, device="cpu")
    with display.shown():
        at(100.0, display.start, "a seed 0", "overall/geometric")
        at(100.5, display.step, epoch=0, epochs=2, step=0, steps=10, loss=None)  # too soon
        at(101.0, display.step, epoch=0, epochs=2, step=2, steps=10, loss=0.9)
        at(101.5, display.step, epoch=0, epochs=2, step=3, steps=10, loss=None)  # too soon
        at(102.5, display.step, epoch=0, epochs=2, step=5, steps=10, loss=None)
        at(104.0, display.evaluated, 0, 5, {"overall/geometric": 0.41, "train/loss": 0.8})
        at(104.5, display.end, failed=True)
    # What each redraw wrote after erasing the last (cursor up, erase below).
    drawn = [f.split("\x1b[")[0].rstrip("\n").split("\n")
             for f in terminal.getvalue().split("\x1b[J")]
    assert drawn == [
        ["a seed 0  starting  0s", "compare a-vs-b: 0/2 runs done"],
        ["a seed 0  cpu  epoch 1/2  step 2/10  1s, ~2s left  loss 0.9000",
         "compare a-vs-b: 0/2 runs done"],
        ["a seed 0  cpu  epoch 1/2  step 5/10  2s, ~2s left  loss 0.9000",
         "compare a-vs-b: 0/2 runs done"],
        ["a seed 0  cpu  epoch 1/2  step 5/10  4s, ~3s left  loss 0.9000  "
         "dev overall/geometric 0.4100 (epoch 1)", "compare a-vs-b: 0/2 runs done"],
        ["compare a-vs-b: 1/2 runs done, 1 failed"],
        [""]]  # erased at the end
