"""`mtbert report` on small studies built through Optuna's API: files, figures, table, notes."""

import json
import re
from html.parser import HTMLParser

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from mtbert.cli import app

runner = CliRunner()
DISTRIBUTIONS = {"train.lr": FloatDistribution(1e-5, 1e-3, log=True),
                 "train.schedule": CategoricalDistribution(["round_robin_batch", "annealed"])}


def _run_dir(tmp_path, number, epochs=2, base=0.5):
    run = tmp_path / "runs" / "s" / f"trial-{number:04d}"
    run.mkdir(parents=True)
    lines = [json.dumps({"step": 10 * e, "epoch": e, "sst/acc": base * 0.6 + 0.01 * e,
                         "qqp/acc": base + 0.02 * e, "sts/pearson": base + 0.05 * e,
                         "overall/arithmetic": base, "overall/geometric": base + 0.01 * e})
             for e in range(1, epochs + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return str(run)


def _metrics(value):
    return {"sst/acc": value * 0.6, "qqp/acc": value, "sts/pearson": value,
            "overall/arithmetic": value, "overall/geometric": value}


def make_study(tmp_path, values, *, pruned=True, failed=True, missing_run=None,
               directions=("maximize",)):
    """A study as `mtbert sweep` leaves it: objectives attribute, metric and run_dir attrs."""
    storage = f"sqlite:///{tmp_path}/runs/mtbert.db"
    (tmp_path / "runs").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="s", storage=storage, directions=list(directions))
    objectives = ["overall/geometric", "sts/pearson"][:len(directions)]
    study.set_user_attr("objectives", objectives)
    lrs = [1e-5, 3e-4, 1e-4, 5e-5, 8e-4, 2e-5]
    for i, value in enumerate(values):
        run_dir = (str(tmp_path / "elsewhere" / f"trial-{i}") if i == missing_run
                   else _run_dir(tmp_path, i, base=value if not isinstance(value, list)
                                 else value[0]))
        vals = value if isinstance(value, list) else [value]
        study.add_trial(create_trial(
            params={"train.lr": lrs[i % len(lrs)],
                    "train.schedule": ["round_robin_batch", "annealed"][i % 2]},
            distributions=DISTRIBUTIONS, values=vals,
            user_attrs={**_metrics(vals[0]), "run_dir": run_dir}))
    n = len(values)
    if pruned:
        study.add_trial(create_trial(
            state=TrialState.PRUNED, params={"train.lr": 2e-4, "train.schedule": "annealed"},
            distributions=DISTRIBUTIONS, intermediate_values={1: 0.2},
            user_attrs={"run_dir": _run_dir(tmp_path, n, epochs=1, base=0.2)}))
        (tmp_path / "runs" / "s" / f"trial-{n:04d}" / "trial.json").write_text(
            json.dumps({"reason": "pruned after epoch 1: overall/geometric 0.2000"}))
        n += 1
    if failed:
        study.add_trial(create_trial(
            state=TrialState.FAIL, params={"train.lr": 9e-4, "train.schedule": "annealed"},
            distributions=DISTRIBUTIONS,
            user_attrs={"fail_reason": "the loss became nan at step 3"}))
    return study


class _Table(HTMLParser):
    """The cells of the trials table, row by row, and every src/href of an HTML page."""

    def __init__(self):
        super().__init__()
        self.rows, self.links, self._in, self._cell = [], [], False, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href")]
        if tag == "table" and attrs.get("id") == "trials":
            self._in = True
        elif self._in and tag == "tr":
            self.rows.append([])
        elif self._in and tag in ("td", "th"):
            self.rows[-1].append("")
            self._cell = True

    def handle_endtag(self, tag):
        self._in = self._in and tag != "table"
        self._cell = self._cell and tag not in ("td", "th")

    def handle_data(self, data):
        if self._cell:
            self.rows[-1][-1] += data


def _parse(path):
    parser = _Table()
    parser.feed(path.read_text())
    return parser


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_of_a_small_study_writes_every_figure_and_the_table(tmp_path):
    make_study(tmp_path, [0.41, 0.55, 0.47, 0.30], missing_run=3)
    dest = tmp_path / "report"
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to", str(dest)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"report: {dest / 'index.html'}"
    for name in ("history", "importances", "parallel", "curves"):
        width, height = _png_size(dest / f"{name}.png")
        assert width >= 600 and height >= 250, name
    assert not (dest / "pareto.png").exists()
    page = _parse(dest / "index.html")
    # Offline: every image is inline, nothing is fetched.
    assert len(page.links) == 4 and all(v.startswith("data:image/png;base64,")
                                        for v in page.links)
    assert not re.search(r"(src|href)=\"?(https?:|//)", (dest / "index.html").read_text())
    header, *rows = page.rows
    assert header[:4] == ["trial", "state", "overall/geometric", "duration (s)"]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/runs/mtbert.db")
    assert [(int(r[0]), r[1]) for r in rows] == [(t.number, t.state.name) for t in study.trials]
    assert rows[1][2] == "0.5500"
    assert rows[4][-1] == "pruned after epoch 1: overall/geometric 0.2000"
    assert rows[5][-1] == "the loss became nan at step 3"
    text = (dest / "index.html").read_text()
    assert "best: trial <b>1</b>" in text
    assert "Trial 3: no metrics.jsonl at" in text and "elsewhere" in text


def test_default_report_directory_is_under_the_study(tmp_path):
    make_study(tmp_path, [0.4, 0.5], pruned=False, failed=False)
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "s" / "report" / "index.html").exists()


def test_one_complete_trial_says_importances_need_two(tmp_path):
    make_study(tmp_path, [0.4])
    dest = tmp_path / "report"
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to", str(dest)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dest.glob("*.png")) == ["curves.png", "history.png",
                                                          "parallel.png"]
    assert "Parameter importances need at least 2 complete trials; this study has 1." in \
        (dest / "index.html").read_text()


def test_no_complete_trial_still_lists_the_failures(tmp_path):
    make_study(tmp_path, [])
    dest = tmp_path / "report"
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to", str(dest)])
    assert result.exit_code == 0, result.output
    assert list(dest.glob("*.png")) == []
    page = _parse(dest / "index.html")
    assert [r[1] for r in page.rows[1:]] == ["PRUNED", "FAIL"]
    assert "No trial is COMPLETE yet" in (dest / "index.html").read_text()


def test_empty_study_is_one_line_exit_2(tmp_path):
    (tmp_path / "runs").mkdir()
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/runs/mtbert.db")
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("mtbert: error: study s has no trials yet; run "
                                     "`mtbert sweep` first")


def test_multi_objective_report_draws_the_pareto_front(tmp_path):
    make_study(tmp_path, [[0.4, 0.7], [0.5, 0.6], [0.3, 0.5]], directions=("maximize",
                                                                           "maximize"))
    dest = tmp_path / "report"
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to", str(dest)])
    assert result.exit_code == 0, result.output
    assert (dest / "pareto.png").exists() and (dest / "history.png").exists()
    text = (dest / "index.html").read_text()
    assert "Pareto front: trials 0, 1" in text
    assert "no single best trial" in text
    assert _parse(dest / "index.html").rows[0][2:4] == ["overall/geometric", "sts/pearson"]


@pytest.mark.slow
def test_wandb_report_run_logs_the_table_and_figures_offline(tmp_path, monkeypatch):
    import wandb  # noqa: F401 - a core dependency, never skipped
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    make_study(tmp_path, [0.41, 0.55, 0.47])
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to",
                                 str(tmp_path / "report"), "--wandb", "--wandb-mode", "offline"])
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    tables = list(files.glob("media/table/trials_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[:2] for row in table["data"]] == [[0, "COMPLETE"], [1, "COMPLETE"],
                                                  [2, "COMPLETE"], [3, "PRUNED"], [4, "FAIL"]]
    images = sorted(p.name.split("_")[0] for p in files.glob("media/images/report/*.png"))
    assert images == ["curves", "history", "importances", "parallel"]


def test_wandb_failure_is_a_warning_and_the_report_is_written(tmp_path, monkeypatch):
    import wandb

    def broken(**kwargs):
        raise RuntimeError("network is down")

    monkeypatch.setattr(wandb, "init", broken)
    make_study(tmp_path, [0.41, 0.55])
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to",
                                 str(tmp_path / "report"), "--wandb", "--wandb-mode", "offline"])
    assert result.exit_code == 0, result.output
    assert "W&B: could not log the report (RuntimeError: network is down)" in result.stderr
    assert (tmp_path / "report" / "index.html").exists()


def test_a_report_being_written_into_a_directory_holds_it(tmp_path):
    """Two reports into one --to at once: the second is one line, exit 2."""
    import filelock

    make_study(tmp_path, [0.4, 0.5], pruned=False, failed=False)
    dest = tmp_path / "shared-report"
    with filelock.FileLock(tmp_path / ".shared-report.lock"):  # a first report writing
        result = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to",
                                     str(dest)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"mtbert: error: another `mtbert report` is writing "
                                     f"into {dest}; wait for it, or pick another --to")
    assert not (dest / "index.html").exists()
    written = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to", str(dest)])
    assert written.exit_code == 0 and (dest / "index.html").exists()
    again = runner.invoke(app, ["report", "--out", str(tmp_path / "runs"), "--to", str(dest)])
    assert again.exit_code == 2 and "exists and is not empty" in again.stderr
