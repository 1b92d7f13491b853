"""The `mtbert` command line: thin commands over the library.

stdout carries results only (tables, JSON); logs, warnings, skip counts and
progress bars go to stderr. Exit codes: 0 success, 1 a run that failed,
2 bad input, with one line saying what and what would be valid.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

import mtbert
from mtbert.errors import MtbertError

app = typer.Typer(
    help="Multitask BERT (SST-5, QQP, STS-B): train, sweep and compare multitask strategies.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Task data: download the official CS224N files.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("mtbert")
_options = {"quiet": False}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class _TqdmHandler(logging.Handler):
    """Log lines on stderr that do not tear through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"mtbert: {self.format(record)}", file=sys.stderr)


def _setup_logging(quiet: bool) -> None:
    log.handlers[:] = [_TqdmHandler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def handle_errors(func):
    """Domain errors become one line on stderr and their exit code, never a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MtbertError as err:
            typer.echo(f"mtbert: error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:  # a path that cannot be read or written: bad input
            where = f": {err.filename}" if err.filename else ""
            typer.echo(f"mtbert: error: {err.strerror or err}{where}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("mtbert: interrupted", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtbert {mtbert.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Only warnings and errors on stderr; no "
                                             "progress bars.")] = False,
) -> None:
    _options["quiet"] = quiet
    _setup_logging(quiet)


SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config key, e.g. --set train.lr=2e-5 (repeatable; see "
                  "`mtbert config --show`).")]
DataDirOption = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Task files directory (same as --set data.dir=DIR).")]
DeviceOption = Annotated[Device, typer.Option("--device", help="Where to run.")]


@app.command()
@handle_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML file of config keys.")] = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Run directory (default ./mtbert-runs/train-<timestamp>).")] = None,
    device: DeviceOption = Device.auto,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue a killed run from its last finished epoch.")] = None,
) -> None:
    """Train one multitask model; writes config, metrics, summary and the best model."""
    from mtbert.config import load_config
    from mtbert.train import train as run_training

    if resume is not None:
        if not (resume / "config.yaml").exists():
            raise MtbertError(f"--resume {resume}: not a run directory (no config.yaml)")
        if config or set_ or data_dir:
            log.warning("--resume uses the config saved in %s; CONFIG, --set and --data-dir "
                        "are ignored", resume)
        run_config = load_config(resume / "config.yaml")
        run_dir = resume
    else:
        extra = {"data": {"dir": str(data_dir)}} if data_dir else None
        run_config = load_config(config, set_ or [], extra=extra)
        run_dir = out or Path("mtbert-runs") / f"train-{datetime.now():%Y%m%d-%H%M%S}"
    summary = run_training(run_config, run_dir=run_dir, device=device.value,
                           resume=resume is not None, progress=not _options["quiet"])
    best = summary["best"]
    typer.echo(f"run: {run_dir}")
    typer.echo(f"best: epoch {best['epoch']} step {best['step']} (by {summary['selection_metric']})")
    for key, value in best["metrics"].items():
        typer.echo(f"  {key:<20} {value:.4f}")
    typer.echo(f"model: {run_dir / 'model'}")


@app.command("eval")
@handle_errors
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="An exported model directory.")],
    data_dir: DataDirOption = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="Score one file of this task (with --file).")] = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", help="A labelled file of --task's format.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    device: DeviceOption = Device.auto,
) -> None:
    """Score a model on the dev files of its tasks, or on one labelled file."""
    from mtbert.data import read_examples
    from mtbert.predictor import load
    from mtbert.tasks import overall_scores
    from mtbert.train import resolve_device

    if (task is None) != (file is None):
        raise MtbertError("--task and --file go together (e.g. --task qqp --file pairs.csv)")
    model = load(model_dir, resolve_device(device.value))
    if task is not None:
        files = {task: file}
        model.task(task)
    else:
        root = _model_data_dir(model, data_dir)
        files = {name: root / model.config.data.files[name]["dev"] for name in model.tasks}
    metrics = {}
    for name, path in files.items():
        spec = model.task(name)
        examples = read_examples(path, spec)
        if not examples.ids:
            raise MtbertError(f"{path} has no valid {name} rows to score")
        predictions = model.predict_examples(examples)
        metrics[spec.metric_key] = spec.score(predictions, examples.labels)
        log.info("%s: %d examples scored, %d rows skipped", path, len(examples.ids),
                 examples.stats.skipped)
    if task is None:
        metrics.update(overall_scores(metrics))
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            typer.echo(f"{key:<20} {value:.4f}")


def _model_data_dir(model, data_dir: Optional[Path]) -> Path:
    """--data-dir, else $MTBERT_DATA_DIR, else the model's saved data.dir (it may come from
    another machine, so that is the last resort), else the default."""
    from mtbert.config import RunConfig
    from mtbert.config import data_dir as default_data_dir

    config = RunConfig() if os.environ.get("MTBERT_DATA_DIR") else model.config
    return data_dir or default_data_dir(config)


class Split(str, Enum):
    dev = "dev"
    test = "test"
    train = "train"


@app.command()
@handle_errors
def predict(
    model_dir: Annotated[Path, typer.Argument(help="An exported model directory.")],
    task: Annotated[Optional[str], typer.Option("--task", help="Task of the input file.")]
    = None,
    input: Annotated[Optional[Path], typer.Option(
        "--input", help="File of the task's format (labels not needed).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", help="Where to write predictions.")] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Predict every dev and test file of the model's tasks found in "
                      "--data-dir, into --output-dir under the CS224N names "
                      "(sst-dev-output.csv, para-test-output.csv, ...).")] = False,
    data_dir: DataDirOption = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", help="With --all: directory of the prediction files.")] = None,
    device: DeviceOption = Device.auto,
) -> None:
    """Write CS224N-format predictions: one file, or with --all every dev and test file.

    A file is a header, then id<TAB>prediction per example.
    """
    from mtbert.data import read_examples
    from mtbert.evaluate import write_predictions
    from mtbert.predictor import load
    from mtbert.train import resolve_device

    if all_:
        given = [name for name, value in (("--task", task), ("--input", input),
                                          ("--output", output)) if value is not None]
        if given:
            raise MtbertError(f"--all predicts every file of the model's tasks; drop "
                              f"{', '.join(given)} (or drop --all to predict one file)")
        if output_dir is None:
            raise MtbertError("--all needs --output-dir DIR for the prediction files")
    else:
        if data_dir is not None or output_dir is not None:
            raise MtbertError("--data-dir and --output-dir go with --all; one file is "
                              "--task TASK --input FILE --output FILE")
        missing = [name for name, value in (("--task", task), ("--input", input),
                                            ("--output", output)) if value is None]
        if missing:
            raise MtbertError(f"missing {', '.join(missing)}: predict one file with --task "
                              "TASK --input FILE --output FILE, or every file with --all "
                              "--data-dir DIR --output-dir DIR")
    # An unwritable destination fails now, not after the prediction pass.
    if not all_ and output.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(output))
    model = load(model_dir, resolve_device(device.value))
    progress = not _options["quiet"]
    if not all_:
        spec = model.task(task)
        examples = read_examples(input, spec, labelled=False)
        predictions = model.predict_examples(examples, progress=progress)
        write_predictions(output, spec, examples.ids, predictions)
        log.info("%d predictions written to %s (%d rows skipped)", len(examples.ids), output,
                 examples.stats.skipped)
        return
    root = _model_data_dir(model, data_dir)
    jobs, missing_files = [], []
    for name, spec in model.tasks.items():
        for split in ("dev", "test"):
            path = root / model.config.data.files[name][split]
            (jobs if path.is_file() else missing_files).append((spec, split, path))
    if not jobs:
        raise MtbertError(f"no dev or test file of the model's tasks in {root}; point "
                          "--data-dir at the task files")
    output_dir.mkdir(parents=True, exist_ok=True)
    for spec, split, path in missing_files:
        log.info("missing: %s %s file %s; no %s", spec.name, split, path,
                 spec.output_file(split))
    for spec, split, path in jobs:
        # Test files carry no labels; dev labels are not needed to predict either.
        examples = read_examples(path, spec, labelled=False)
        predictions = model.predict_examples(examples, progress=progress)
        target = output_dir / spec.output_file(split)
        write_predictions(target, spec, examples.ids, predictions)
        log.info("%s: %d predictions from %s (%d rows skipped)", target.name,
                 len(examples.ids), path.name, examples.stats.skipped)
        typer.echo(str(target))
    log.info("%d prediction files written to %s, %d missing inputs", len(jobs), output_dir,
             len(missing_files))


@app.command()
@handle_errors
def analyze(
    model_dir: Annotated[Path, typer.Argument(help="An exported model directory.")],
    data_dir: DataDirOption = None,
    split: Annotated[Split, typer.Option(
        "--split", help="Which labelled files to analyse (data.files names).")] = Split.dev,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Directory of the report (default MODEL_DIR/analysis).")] = None,
    examples: Annotated[int, typer.Option(
        "--examples", min=0, help="Examples listed per error table (most confident or "
                                  "largest errors first).")] = 10,
    device: DeviceOption = Device.auto,
) -> None:
    """Error analysis: confusion matrices, per-class metrics, STS scatter, worst examples.

    Writes PNG figures, analysis.md and analysis.json for the labelled files of a split.
    """
    from mtbert.analysis import analyze as run_analysis
    from mtbert.predictor import load
    from mtbert.train import resolve_device

    model = load(model_dir, resolve_device(device.value))
    written = run_analysis(model, data_dir=_model_data_dir(model, data_dir),
                           split=split.value, dest=out or model_dir / "analysis", top=examples,
                           progress=not _options["quiet"])
    for note in written.notes:
        log.info("%s", note)
    log.info("figures: %s", ", ".join(p.name for p in written.figures.values()))
    typer.echo(f"report: {written.report}")


@app.command()
@handle_errors
def pretrain(
    config: Annotated[Optional[Path], typer.Argument(
        help="YAML file of config keys (model.encoder, model.max_length, data.tasks, "
             "data.files, data.dir are used).")] = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Encoder directory to write, in Hugging Face BERT format (default "
                      "./mtbert-runs/pretrain-<timestamp>); --set model.encoder=DIR loads "
                      "it.")] = None,
    steps: Annotated[int, typer.Option(
        "--steps", min=0, help="Optimizer steps (0 = --epochs passes over the sentences).")] = 0,
    epochs: Annotated[float, typer.Option(
        "--epochs", help="Passes over the sentences when --steps is 0.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sentences per "
                                            "batch.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (10% warm-up, then "
                                      "linear decay).")] = 5e-5,
    mask_prob: Annotated[float, typer.Option(
        "--mask-prob", help="Share of tokens predicted (BERT's 80% [MASK], 10% random, "
                            "10% kept).")] = 0.15,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Longest sentence in tokens (default model.max_length).")] = None,
    splits: Annotated[str, typer.Option(
        "--splits", help="Comma-separated splits of the data.tasks files whose sentences "
                         "are used: train, dev, test.")] = "train",
    save_every: Annotated[int, typer.Option(
        "--save-every", min=1, help="Steps between resume states.")] = 200,
    log_every: Annotated[int, typer.Option(
        "--log-every", min=1, help="Steps per point of the loss curve in pretrain.json.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of masking and order.")] = 0,
    device: DeviceOption = Device.auto,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a killed pretraining in --out from its last state.")]
    = False,
) -> None:
    """Further pretrain the encoder with masked-LM on the task sentences (Sun et al. 2019)."""
    from mtbert.config import load_config
    from mtbert.pretrain import PretrainOptions
    from mtbert.pretrain import pretrain as run_pretrain

    extra = {"data": {"dir": str(data_dir)}} if data_dir else None
    run_config = load_config(config, set_ or [], extra=extra)
    options = PretrainOptions(
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, mask_prob=mask_prob,
        max_length=max_length or run_config.model.max_length,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
        save_every=save_every, log_every=log_every, seed=seed)
    out = out or Path("mtbert-runs") / f"pretrain-{datetime.now():%Y%m%d-%H%M%S}"
    run_pretrain(run_config, out=out, options=options, device=device.value, resume=resume,
                 progress=not _options["quiet"])
    typer.echo(str(out))


@app.command("config")
@handle_errors
def config_(
    config: Annotated[Optional[Path], typer.Argument(help="YAML file of config keys.")] = None,
    set_: SetOption = None,
    show: Annotated[bool, typer.Option("--show", help="List every key, its default and "
                                       "meaning.")] = False,
) -> None:
    """Print the resolved config as YAML, or with --show every key, default and meaning."""
    import yaml

    from mtbert.config import describe, load_config

    if show:
        rows = describe()
        width = max(len(key) for key, _, _ in rows)
        default_width = min(max(len(d) for _, d, _ in rows), 22)
        for key, default, meaning in rows:
            typer.echo(f"{key:<{width}}  {default:<{default_width}}  {meaning}")
        return
    typer.echo(yaml.safe_dump(load_config(config, set_ or []).to_dict(), sort_keys=False),
               nl=False)


@data_app.command("download")
@handle_errors
def data_download(
    data_dir: DataDirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even files that "
                                        "verify.")] = False,
    url: Annotated[Optional[str], typer.Option(
        "--url", help="Base URL of the files (default: the CS224N starter repository; "
                      "also $MTBERT_DATA_URL).")] = None,
) -> None:
    """Fetch the official task files, each verified by its git blob id."""
    from mtbert.config import RunConfig
    from mtbert.config import data_dir as default_data_dir
    from mtbert.download import download_data

    root = data_dir or default_data_dir(RunConfig())
    results = download_data(root, base_url=url, force=force, progress=not _options["quiet"])
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        typer.echo(f"{r.status:<10} {r.name}" + (f"  ({r.detail})" if r.status == "failed" else ""))
    if failed:
        typer.echo(f"mtbert: error: {len(failed)} of {len(results)} files failed; "
                   f"the others are in {root}", err=True)
        raise typer.Exit(1)
    log.info("all %d files verified in %s", len(results), root)


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


OutParent = Annotated[Path, typer.Option(
    "--out", help="Parent of the study storage (mtbert.db) and the trial run directories.")]
StorageOption = Annotated[Optional[str], typer.Option(
    "--storage", envvar="MTBERT_STORAGE", show_envvar=True,
    help="Optuna storage URL (default sqlite:///<out>/mtbert.db); postgresql://... lets "
         "many workers share one study. From the environment, a password stays off the "
         "command line.")]
StudyOption = Annotated[Optional[str], typer.Option(
    "--study", help="Study name (default: the spec's name for sweep; the storage's only "
                    "study otherwise).")]


@app.command()
@handle_errors
def sweep(
    spec: Annotated[Optional[str], typer.Argument(
        help="A shipped spec (see --list) or a path to a spec YAML file.")] = None,
    trials: Annotated[Optional[int], typer.Option(
        "--trials", min=1, help="Trials to run now, added to the study's earlier ones "
                                "(default 10, or unlimited with --timeout).")] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Stop starting new trials after this many seconds.")] = None,
    study: StudyOption = None,
    storage: StorageOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    out: OutParent = Path("mtbert-runs"),
    wandb_mode: Annotated[Optional[WandbMode], typer.Option(
        "--wandb-mode", help="W&B logging (default: online with an API key, else offline).")]
    = None,
    wandb_project: Annotated[str, typer.Option("--wandb-project", help="W&B project.")] = "mtbert",
    keep_top: Annotated[int, typer.Option(
        "--keep-top", min=0, help="Keep the model directories of this many best trials.")] = 3,
    heartbeat: Annotated[int, typer.Option(
        "--heartbeat", min=1, help="Seconds between a running trial's heartbeats.")] = 10,
    grace: Annotated[int, typer.Option(
        "--grace", min=1, help="Seconds without heartbeat before a trial counts as dead "
                               "(FAIL, retried once).")] = 30,
    device: DeviceOption = Device.auto,
    trials_per_gpu: Annotated[int, typer.Option(
        "--trials-per-gpu", min=1, help="Trials run at once, each its own process on the one "
                                        "device, so that small encoders fill a big GPU.")] = 1,
    print_spec: Annotated[bool, typer.Option(
        "--print", help="Print the resolved spec and exit.")] = False,
    list_specs: Annotated[bool, typer.Option("--list", help="List the shipped specs.")] = False,
    enqueue: Annotated[Optional[Path], typer.Option(
        "--enqueue", help="YAML list of parameter mappings (space keys to values) to run as "
                          "the first trials; a configuration the study holds is not "
                          "enqueued again.")] = None,
) -> None:
    """Run an Optuna study over a sweep spec: each trial a multitask training run."""
    from mtbert.spec import load_enqueue, load_spec, shipped_specs, spec_yaml
    from mtbert.sweep import SweepOptions, run_sweep, trials_table
    from mtbert.tracking import resolve_mode

    if list_specs:
        specs = sorted(shipped_specs().items())
        width = max(len(name) for name, _ in specs)
        for name, path in specs:
            typer.echo(f"{name:<{width}}  {load_spec(str(path)).description}")
        return
    if spec is None:
        raise MtbertError("name a sweep spec, e.g. `mtbert sweep loss-weights` "
                          "(see `mtbert sweep --list`)")
    overrides = list(set_ or [])
    if data_dir is not None:
        overrides.insert(0, f"data.dir={data_dir}")
    resolved = load_spec(spec, overrides)
    if enqueue is not None:
        resolved.enqueue = resolved.enqueue + load_enqueue(enqueue, resolved)
    if print_spec:
        typer.echo(spec_yaml(resolved), nl=False)
        return
    if trials is None and timeout is None:
        trials = 10
    options = SweepOptions(trials=trials, timeout=timeout, study=study, storage=storage,
                           out=out, wandb_mode=resolve_mode(wandb_mode.value if wandb_mode
                                                            else None),
                           wandb_project=wandb_project, keep_top=keep_top, heartbeat=heartbeat,
                           grace=grace, device=device.value, trials_per_gpu=trials_per_gpu)
    try:
        result, before = run_sweep(resolved, options)
    except KeyboardInterrupt:
        _print_interrupted(options, resolved.name)
        raise
    states = _state_counts(result)
    log.info("study %s: %s", result.study_name,
             ", ".join(f"{n} {s.lower()}" for s, n in states.items()))
    finished = [t for t in result.get_trials(deepcopy=False) if t.number >= before
                and t.state.name in ("COMPLETE", "PRUNED")]
    if not finished:
        typer.echo("mtbert: error: no trial could finish; see the trial.log files under "
                   f"{out / result.study_name}", err=True)
        raise typer.Exit(1)
    for row in trials_table(result):
        typer.echo(row)


def _print_interrupted(options, spec_name: str) -> None:
    """The table of an interrupted sweep's study, as far as it got (stdout stays results)."""
    import optuna

    from mtbert.sweep import default_storage, trials_table

    try:
        study = optuna.load_study(study_name=options.study or spec_name,
                                  storage=options.storage or default_storage(options.out))
        if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
            for row in trials_table(study):
                typer.echo(row)
    except Exception as err:  # noqa: BLE001 - the interruption is what gets reported
        log.debug("no table of the interrupted study: %s", err)


def _state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _open_study(storage: Optional[str], out: Path, study: Optional[str]):
    import optuna

    from mtbert.sweep import default_storage, open_storage, select_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or default_storage(out)
    rdb = open_storage(url, must_exist=True)
    return optuna.load_study(study_name=select_study(rdb, study), storage=rdb), url


@app.command()
@handle_errors
def best(
    study: StudyOption = None,
    storage: StorageOption = None,
    out: OutParent = Path("mtbert-runs"),
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="Rank by this metric key instead of the study objective.")] = None,
    export: Annotated[Optional[Path], typer.Option(
        "--export", help="Copy the best trial's model into this directory.")] = None,
    trial: Annotated[Optional[int], typer.Option(
        "--trial", help="Use this trial number (needed to export from a multi-objective "
                        "study).")] = None,
    top: Annotated[Optional[int], typer.Option(
        "--top", min=1, help="Print the N best COMPLETE trials, ranked by the (first) "
                             "objective or --metric.")] = None,
    hf: Annotated[bool, typer.Option(
        "--hf", help="With --export: also write DIR/encoder/, the fine-tuned encoder in "
                     "Hugging Face format (transformers.AutoModel loads it).")] = False,
    reseed: Annotated[Optional[int], typer.Option(
        "--reseed", min=1, help="With --top N: re-run the N best original trials with K new "
                                "seeds each (new trials of the study, never pruned; seeds "
                                "already run are skipped), then rank by the mean over seeds.")
    ] = None,
    by_trial: Annotated[bool, typer.Option(
        "--by-trial", help="Rank single trials even when the study holds reseeds (default "
                           "then: configurations by their mean over seeds).")] = False,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    device: DeviceOption = Device.auto,
    wandb_mode: Annotated[Optional[WandbMode], typer.Option(
        "--wandb-mode", help="With --reseed: W&B logging of the new trials (default: online "
                             "with an API key, else offline).")] = None,
    wandb_project: Annotated[str, typer.Option("--wandb-project", help="W&B project.")]
    = "mtbert",
    keep_top: Annotated[int, typer.Option(
        "--keep-top", min=0, help="With --reseed: keep the model directories of this many "
                                  "best trials and of as many best configurations by mean.")
    ] = 3,
) -> None:
    """Print the best trial (or Pareto front); --export its model; --reseed more seeds.

    --reseed K --top N re-runs the N best trials with K more seeds each and ranks the
    configurations by their mean.

    --set, --data-dir, --device and the W&B options apply to the trials of --reseed only;
    the spec, with the sweep's --set, is read from the study.
    """
    from optuna.trial import TrialState

    from mtbert.modeldir import export_hf_encoder
    from mtbert.studies.export import export_trial
    from mtbert.sweep import RESEED_OF, RESEED_SEED, groups_table, mask_url, seed_groups
    from mtbert.sweep import trials_table
    from mtbert.tasks import METRIC_KEYS

    if metric is not None and metric not in METRIC_KEYS:
        raise MtbertError(f"unknown metric '{metric}'; valid: {', '.join(METRIC_KEYS)}")
    if hf and export is None:
        raise MtbertError("--hf goes with --export DIR (it writes DIR/encoder/)")
    if top is not None and (export is not None or trial is not None):
        raise MtbertError("--top prints a ranking; export one trial with --export "
                          "(and --trial N)")
    if reseed is not None and top is None:
        raise MtbertError("--reseed K goes with --top N, the number of best trials to re-run "
                          "(e.g. --reseed 3 --top 5)")
    if reseed is None and (set_ or data_dir):
        raise MtbertError("--set and --data-dir apply to the trials of --reseed only")
    if reseed is not None:
        _reseed(study=study, storage=storage, out=out, metric=metric, top=top, seeds=reseed,
                set_=set_, data_dir=data_dir, device=device, wandb_mode=wandb_mode,
                wandb_project=wandb_project, keep_top=keep_top)
        return
    loaded, url = _open_study(storage, out, study)
    done = loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise MtbertError(f"study {loaded.study_name} has no COMPLETE trial yet")
    multi = len(loaded.directions) > 1
    objectives = loaded.user_attrs.get("objectives") or ["the first objective"]
    by = metric or objectives[0]
    # A study with reseeds ranks its configurations by their mean over seeds; those with
    # one seed only are left out (their single score is the noisy one).
    groups = [] if by_trial or (multi and metric is None) or trial is not None else \
        seed_groups(loaded, metric, reseeded_only=True)
    if groups and top is not None:
        singles = len(seed_groups(loaded, metric)) - len(groups)
        typer.echo(f"study {loaded.study_name}: top {min(top, len(groups))} of {len(groups)} "
                   f"reseeded configurations by mean {by} over their seeds (mean ± std)")
        for row in groups_table(groups[:top]):
            typer.echo(row)
        if singles:
            log.info("%d configuration%s ran with one seed only, not ranked here "
                     "(`--by-trial` ranks single trials)", singles, "s" * (singles != 1))
        return
    if top is not None:
        rows = trials_table(loaded, limit=top, metric=metric, front=False)
        objectives = loaded.user_attrs.get("objectives") or ["the first objective"]
        typer.echo(f"study {loaded.study_name}: top {len(rows) - 1} of {len(done)} complete "
                   f"trials by {metric or objectives[0]}")
        for row in rows:
            typer.echo(row)
        return
    if trial is not None:
        chosen = next((t for t in loaded.get_trials(deepcopy=False) if t.number == trial), None)
        if chosen is None:
            raise MtbertError(f"study {loaded.study_name} has no trial {trial}")
    elif groups:
        chosen = groups[0].representative()
    elif metric is not None:
        chosen = max((t for t in done if metric in t.user_attrs),
                     key=lambda t: t.user_attrs[metric])
    elif multi:
        chosen = None
    else:
        chosen = loaded.best_trial
    if chosen is None:
        typer.echo(f"study {loaded.study_name}: Pareto front of {len(loaded.best_trials)} trials")
        for row in trials_table(loaded, limit=len(loaded.best_trials)):
            typer.echo(row)
        if export is not None:
            raise MtbertError("a multi-objective study has no single best trial; pick one "
                              "from the front with --trial N")
        return
    selection = None
    if groups:
        group = groups[0]
        seed = chosen.user_attrs.get(RESEED_SEED)
        typer.echo(f"study {loaded.study_name}: best configuration trial {group.number} by "
                   f"mean {by} over {len(group.trials)} seeds: {group.mean():.4f} ± "
                   f"{group.std():.4f}")
        typer.echo(f"  its seed run closest to the mean: trial {chosen.number}"
                   + (f" (seed {seed})" if seed is not None else " (the original seed)")
                   + f", {by} {group.values()[group.trials.index(chosen)]:.4f}")
        selection = {"chosen": f"configuration of trial {group.number}, best mean {by} over "
                               f"{len(group.trials)} seeds ({group.mean():.4f} ± "
                               f"{group.std():.4f}); this is its seed run closest to the mean",
                     "seed runs": ", ".join(str(t.number) for t in group.trials)}
    else:
        typer.echo(f"study {loaded.study_name}: best trial {chosen.number}"
                   + (f" by {metric}" if metric else ""))
    if RESEED_OF in chosen.user_attrs:
        typer.echo(f"  seed   {chosen.user_attrs.get(RESEED_SEED)} (reseed of trial "
                   f"{chosen.user_attrs[RESEED_OF]})")
    for key, value in chosen.params.items():
        typer.echo(f"  param  {key:<22} {value}")
    for key in METRIC_KEYS:
        if key in chosen.user_attrs:
            typer.echo(f"  metric {key:<22} {chosen.user_attrs[key]:.4f}")
    typer.echo(f"  run    {chosen.user_attrs.get('run_dir', '?')}")
    if export is not None:
        path = export_trial(chosen, study=loaded.study_name, storage=mask_url(url), dest=export,
                            selection=selection)
        typer.echo(f"exported: {path}")
        if hf:
            typer.echo(f"encoder (Hugging Face format): {export_hf_encoder(path)}")


@app.command()
@handle_errors
def compare(
    configs: Annotated[Optional[list[str]], typer.Argument(
        help="Configs to compare: presets (individual, multitask) or run-config YAML files "
             "(named by their stem).", show_default=False)] = None,
    seeds: Annotated[int, typer.Option(
        "--seeds", min=1, help="Train each config with seeds 0..K-1 (the same for all, so "
                               "that differences are paired by seed).")] = 3,
    seed_list: Annotated[Optional[str], typer.Option(
        "--seed-list", help="Comma-separated seeds instead of 0..K-1, e.g. 3,7,11.")] = None,
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="The config the others are tested against (default: the "
                           "first).")] = None,
    metric: Annotated[str, typer.Option(
        "--metric", help="Metric of the Δ and p columns of the main table (the paired "
                         "table lists every metric).")] = "overall/geometric",
    set_: SetOption = None,
    set_for: Annotated[Optional[list[str]], typer.Option(
        "--set-for", help="Override a key for one config only, after --set: "
                          "CONFIG:KEY=VALUE, e.g. multitask:train.steps_per_epoch=120 "
                          "(repeatable).", show_default=False)] = None,
    data_dir: DataDirOption = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Comparison directory: OUT/<config>/seed<k>/ per run, compare.json, "
                      "compare.md; default: mtbert-runs/compare-A-vs-B for configs A, B.")
    ] = None,
    markdown_file: Annotated[Optional[Path], typer.Option(
        "--markdown", help="Where to write the table as Markdown (default "
                           "OUT/compare.md).")] = None,
    device: DeviceOption = Device.auto,
    wandb_mode: Annotated[WandbMode, typer.Option(
        "--wandb-mode", help="W&B: one run per training, grouped by the name of OUT, "
                             "written under $WANDB_DIR, else OUT.")] = WandbMode.disabled,
    wandb_project: Annotated[str, typer.Option("--wandb-project", help="W&B project.")]
    = "mtbert",
) -> None:
    """Train configs over the same seeds: mean ± std per metric, paired test vs a baseline.

    The table also goes to Markdown; finished runs are not trained again.
    """
    from mtbert.compare import (markdown, plot_comparison, resolve_candidates, run_compare,
                                text_table)
    from mtbert.tracking import resolve_mode

    seed_values = list(range(seeds))
    if seed_list is not None:
        try:
            seed_values = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise MtbertError(f"bad --seed-list {seed_list!r}; expected integers such as "
                              "0,1,2") from None
    extra = {"data": {"dir": str(data_dir)}} if data_dir else None
    candidates = resolve_candidates(configs or [], list(set_ or []), extra,
                                    per_config=list(set_for or []))
    names = [c.name for c in candidates]
    mode = resolve_mode(wandb_mode.value)
    out = out or Path("mtbert-runs") / f"compare-{'-vs-'.join(names)}"
    result = run_compare(candidates, seeds=seed_values, out=out,
                         baseline=baseline or names[0], metric=metric, device=device.value,
                         progress=not _options["quiet"], wandb_mode=mode,
                         wandb_project=wandb_project)
    md = markdown_file or out / "compare.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    figure = plot_comparison(result, out / "compare.png")
    link = Path(os.path.relpath(figure.resolve(), md.parent.resolve())) if figure else None
    md.write_text(markdown(result, link))
    for line in text_table(result):
        typer.echo(line)
    log.info("table: %s; per-seed numbers: %s%s", md, out / "compare.json",
             f"; figure: {figure}" if figure else "")
    failed = sum(r.status == "failed" for runs in result.runs.values() for r in runs.values())
    if failed:
        typer.echo(f"mtbert: error: {failed} of {len(names) * len(seed_values)} seed runs "
                   "failed (see above); run the same command again to retry them", err=True)
        raise typer.Exit(1)


def _reseed(*, study, storage, out, metric, top, seeds, set_, data_dir, device, wandb_mode,
            wandb_project, keep_top) -> None:
    import optuna

    from mtbert.spec import make_pruner, make_sampler
    from mtbert.sweep import (SweepOptions, default_storage, groups_table, open_storage,
                              reseed, select_study, study_spec)
    from mtbert.tracking import resolve_mode

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = list(set_ or [])
    if data_dir is not None:
        overrides.insert(0, f"data.dir={data_dir}")
    mode = resolve_mode(wandb_mode.value if wandb_mode else None)
    options = SweepOptions(study=study, storage=storage, out=out, wandb_mode=mode,
                           wandb_project=wandb_project, keep_top=keep_top, device=device.value)
    url = storage or default_storage(out)
    rdb = open_storage(url, heartbeat=options.heartbeat, grace=options.grace, must_exist=True)
    name = select_study(rdb, study)
    spec = study_spec(optuna.load_study(study_name=name, storage=rdb), overrides)
    loaded = optuna.load_study(study_name=name, storage=rdb, sampler=make_sampler(spec.sampler),
                               pruner=make_pruner(spec.pruner))
    groups = reseed(loaded, spec, options, url, top=top, seeds=seeds, metric=metric)
    by = metric or spec.objectives[0]
    short = [g for g in groups if len(g.trials) < seeds + 1]
    for g in short:
        log.warning("trial %d: %d of %d seeds complete%s; run the command again to retry the "
                    "others", g.number, len(g.trials), seeds + 1,
                    f" ({g.pending} queued or running)" if g.pending else "")
    typer.echo(f"study {name}: the {len(groups)} best trials, each with {seeds} more seeds, "
               f"ranked by mean {by} (mean ± std over seeds)")
    for row in groups_table(groups):
        typer.echo(row)


@app.command()
@handle_errors
def studies(
    storage: StorageOption = None,
    out: OutParent = Path("mtbert-runs"),
    delete: Annotated[Optional[str], typer.Option(
        "--delete", help="Delete this study from the storage (asks first).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    runs: Annotated[bool, typer.Option(
        "--runs", help="With --delete: also remove the study's run directories "
                       "(<out>/<study>/ and every trial's run_dir on this machine).")] = False,
) -> None:
    """List the studies of a storage: trials by state and best values; --delete one."""
    import optuna

    from mtbert.sweep import default_storage, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or default_storage(out)
    rdb = open_storage(url, must_exist=True)
    if runs and delete is None:
        raise MtbertError("--runs goes with --delete NAME")
    if delete is not None:
        _delete_study(rdb, url, delete, out=out, yes=yes, runs=runs)
        return
    names = optuna.study.get_all_study_names(rdb)
    typer.echo(f"{'study':<24} {'trials':>6} {'complete':>8} {'pruned':>6} {'fail':>4} "
               f"{'running':>7}  best")
    for name in names:
        loaded = optuna.load_study(study_name=name, storage=rdb)
        counts = _state_counts(loaded)
        try:
            bests = (f"{loaded.best_value:.4f} (trial {loaded.best_trial.number})"
                     if len(loaded.directions) == 1 else f"{len(loaded.best_trials)} on the front")
        except ValueError:
            bests = "-"
        typer.echo(f"{name:<24} {sum(counts.values()):>6} {counts.get('COMPLETE', 0):>8} "
                   f"{counts.get('PRUNED', 0):>6} {counts.get('FAIL', 0):>4} "
                   f"{counts.get('RUNNING', 0):>7}  {bests}")


@app.command()
@handle_errors
def report(
    study: StudyOption = None,
    storage: StorageOption = None,
    out: OutParent = Path("mtbert-runs"),
    to: Annotated[Optional[Path], typer.Option(
        "--to", help="Report directory (default <out>/<study>/report).")] = None,
    top: Annotated[int, typer.Option(
        "--top", min=1, help="Draw the dev curves of this many best trials.")] = 5,
    wandb: Annotated[bool, typer.Option(
        "--wandb", help="Also log the trials table and figures as one W&B run in the "
                        "study's group.")] = False,
    wandb_mode: Annotated[Optional[WandbMode], typer.Option(
        "--wandb-mode", help="W&B mode for --wandb (default: online with an API key, else "
                             "offline).")] = None,
    wandb_project: Annotated[str, typer.Option("--wandb-project", help="W&B project.")]
    = "mtbert",
) -> None:
    """Write a study report: index.html (opens offline) and the figures as PNG files."""
    from mtbert.report import build_report
    from mtbert.sweep import mask_url
    from mtbert.tracking import log_study_report, resolve_mode

    mode = resolve_mode(wandb_mode.value if wandb_mode else None) if wandb else "disabled"
    loaded, url = _open_study(storage, out, study)
    dest = to or out / loaded.study_name / "report"
    written = build_report(loaded, dest=dest, storage=mask_url(url), top=top)
    for note in written.notes:
        log.info("%s", note)
    log.info("figures: %s", ", ".join(p.name for p in written.figures.values()) or "none")
    if wandb:
        directory = Path(os.environ.get("WANDB_DIR") or out).resolve()
        run_id = log_study_report(written, mode=mode, project=wandb_project,
                                  directory=directory)
        if run_id:
            log.info("W&B: report run %s in group %s (%s)", run_id, loaded.study_name, mode)
    typer.echo(f"report: {written.index}")


def _delete_study(rdb, url: str, name: str, *, out: Path, yes: bool, runs: bool) -> None:
    import shutil

    import optuna

    from mtbert.sweep import mask_url, select_study

    name = select_study(rdb, name)
    trials = optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False)
    # Only directories that a sweep wrote: a trial's run_dir holds its job.json.
    folders = [Path(t.user_attrs["run_dir"]) for t in trials if t.user_attrs.get("run_dir")
               and (Path(t.user_attrs["run_dir"]) / "job.json").is_file()] if runs else []
    what = f"study {name} ({len(trials)} trials) from {mask_url(url)}"
    if runs:
        what += f", the run directories of {len(folders)} trial{'s' * (len(folders) != 1)}"
        if (out / name).is_dir():
            folders.append(out / name)
            what += f" and {out / name}"
    if not yes and not typer.confirm(f"Delete {what}?", default=False, err=True):
        typer.echo("mtbert: nothing deleted", err=True)
        raise typer.Exit(1)
    optuna.delete_study(study_name=name, storage=rdb)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    typer.echo(f"deleted {what}")


def _click_exceptions():
    try:
        from typer._click import exceptions  # Typer 0.2x vendors its own Click
    except ImportError:
        from click import exceptions
    return exceptions


def run() -> None:
    """Console-script entry point: usage errors are one line too (exit 2)."""
    exceptions = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except exceptions.NoArgsIsHelpError as err:
        if err.format_message():  # Rich prints the help itself; plain Click returns it
            typer.echo(err.format_message())
        sys.exit(0)
    except exceptions.ClickException as err:
        ctx = getattr(err, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"mtbert: error: {err.format_message()}{hint}", err=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("mtbert: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
