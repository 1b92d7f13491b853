"""The `mtbert` command line: thin commands over the library.

Each command turns its options into one library call and prints the result.
stdout carries results only (tables, JSON); logs, warnings, skip counts,
progress bars and the sweep's display go to stderr. Exit codes: 0 success, 1 a run that failed,
2 bad input, with one line saying what and what would be valid, 130 when
interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm
from typer.core import TyperCommand, TyperGroup

from mtbert.errors import MtbertError
from mtbert.rundir import RUNS_DIR
from mtbert.studies.options import SweepOptions
from mtbert.version import __version__

DEFAULTS = SweepOptions()  # the sweep options' defaults, declared once there


class _FlagsTakeNoValue:
    """Help that shows a flag (`--print`, `--json`, `--help`) bare: Typer 0.2x prints a
    flag's type after it (`--print <bool>`) as if it took a value."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


class _Typer(typer.Typer):
    """The app's command groups: their commands' help shows flags bare (_Command)."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _Typer(
    help="Multitask BERT (SST-5, QQP, STS-B): train, sweep and compare multitask strategies.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, cls=_Group)
data_app = _Typer(help="Task data: download the official CS224N files.",
                  no_args_is_help=True, cls=_Group)
app.add_typer(data_app, name="data")

log = logging.getLogger("mtbert")
SHOWN_FINDINGS = 10  # inert settings named at the start of a sweep (all: --check)
MAX_STORAGE_TIMEOUT_S = 3600  # a connection that takes longer is no connection


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Split(str, Enum):
    dev = "dev"
    test = "test"
    train = "train"


# ---------------------------------------------------------------- options shared by commands

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config key, e.g. --set train.lr=2e-5 (repeatable; see "
                  "`mtbert config --show`).")]
DataDirOption = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Task files directory (same as --set data.dir=DIR).")]
DeviceOption = Annotated[Device, typer.Option("--device", help="Where to run.")]
SweepDeviceOption = Annotated[Device, typer.Option(
    "--device", help="Where the trials train; cuda where PyTorch sees no GPU is refused at "
                     "once (exit 2, before any trial).")]
ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML file of config keys.")]
ModelDirArg = Annotated[Path, typer.Argument(help="An exported model directory.")]
OutParent = Annotated[Path, typer.Option(
    "--out", help="Parent of the study storage (mtbert.db) and the trial run directories.")]
StorageOption = Annotated[Optional[str], typer.Option(
    "--storage", envvar="MTBERT_STORAGE", show_envvar=True,
    help="Optuna storage URL (default sqlite:///<out>/mtbert.db); postgresql://... lets "
         "many workers share one study. From the environment, a password stays off the "
         "command line.")]
StudyOption = Annotated[Optional[str], typer.Option(
    "--study", help="Study name (default: the spec's name for sweep; the storage's only "
                    "study otherwise). Letters, digits, '.', '_' and '-'.")]
WandbProjectOption = Annotated[str, typer.Option("--wandb-project", help="W&B project.")]
SweepWandbMode = Annotated[Optional[WandbMode], typer.Option(
    "--wandb-mode", help="W&B logging (default: online with an API key, else offline).")]
KeepTopOption = Annotated[int, typer.Option(
    "--keep-top", min=0, help="Keep the model directories of this many best trials (with "
                              "--reseed: and of as many best configurations by mean).")]
ExportWandbOption = Annotated[bool, typer.Option(
    "--wandb", help="With --export: also log the model directory as a W&B model artifact "
                    "(aliases best and trial-N) in a run of the study's group; offline, "
                    "under $WANDB_DIR, else --out, for `wandb sync`.")]
MetricOption = Annotated[Optional[str], typer.Option(
    "--metric", help="Rank by this metric key instead of the study objective.")]
MaxRetriesOption = Annotated[int, typer.Option(
    "--max-retries", min=0, help="Queue a trial whose worker died (or was stopped) again up "
                                 "to R times; the retry resumes from its last finished epoch "
                                 "where its run directory is reachable.")]
GpusOption = Annotated[Optional[str], typer.Option(
    "--gpus", help="Run trials on these GPUs (PyTorch's indices, e.g. 0,1,2,3, or all), "
                   "--trials-per-gpu at a time on each, each trial pinned to its GPU with "
                   "CUDA_VISIBLE_DEVICES.")]
BaselineOption = Annotated[Optional[Path], typer.Option(
    "--baseline", help="The compare.json of `mtbert compare`: `baseline` in the spec's "
                       "constraints is its baseline config's mean per metric.")]
WarmStartOption = Annotated[Optional[str], typer.Option(
    "--warm-start", help="An earlier study whose best COMPLETE, feasible configurations run "
                         "first (parameters outside the space dropped, misfits skipped; "
                         "never queued twice).")]
WarmStorageOption = Annotated[Optional[str], typer.Option(
    "--warm-storage", help="Storage URL of the --warm-start study (default: the sweep's).")]
WarmTopOption = Annotated[int, typer.Option(
    "--warm-top", min=1, help="How many of the --warm-start study's best configurations.")]
TopOption = Annotated[Optional[int], typer.Option(
    "--top", min=1, help="Print the N best COMPLETE trials, ranked by the (first) objective "
                         "or --metric.")]

# The options of `mtbert sweep`, one line each in its signature.
SpecArg = Annotated[Optional[str], typer.Argument(
    help="A shipped spec (see --list) or a path to a spec YAML file.")]
TrialsOption = Annotated[Optional[int], typer.Option(
    "--trials", min=1, help="Trials to run now, added to the study's earlier ones (default 10, "
                            "or unlimited with --timeout; with the grid sampler, the rest of "
                            "the grid); with --seeds: new configurations.")]
TimeoutOption = Annotated[Optional[float], typer.Option(
    "--timeout", min=0, help="Stop starting new trials after this many seconds.")]
HeartbeatOption = Annotated[int, typer.Option(
    "--heartbeat", min=1, max=3600, help="Seconds between a running trial's heartbeats.")]
GraceOption = Annotated[int, typer.Option(
    "--grace", min=2, max=7 * 86400, help="Seconds without heartbeat before a trial counts as dead (FAIL, "
                           "queued again; see --max-retries).")]
TrialsPerGpuOption = Annotated[int, typer.Option(
    "--trials-per-gpu", min=1, max=256, help="Trials run at once on each device (each GPU of --gpus), "
                                    "each its own process, so that small encoders fill a big "
                                    "GPU.")]
SizeOption = Annotated[str, typer.Option(
    "--size", help="The spec's size (its `sizes:`): cpu, gpu or another it names; auto: gpu "
                   "where the trials train on CUDA, else cpu (a spec without that size runs "
                   "as written). A study keeps the size it was made with.")]
PrintSpecOption = Annotated[bool, typer.Option(
    "--print", help="Print the resolved spec, its size folded into the base (a file sweep "
                    "runs the same anywhere), and exit.")]
ListSpecsOption = Annotated[bool, typer.Option("--list", help="List the shipped specs.")]
StorageOutageOption = Annotated[float, typer.Option(
    "--storage-outage", min=0, envvar="MTBERT_STORAGE_OUTAGE",
    help="Seconds a worker rides out an unreachable study storage (retrying, said on "
         "stderr) before it ends with one line, exit 1; its running trial is resumed by "
         "the next worker.")]
StorageTimeoutOption = Annotated[Optional[float], typer.Option(
    "--storage-timeout", min=1, envvar="MTBERT_STORAGE_TIMEOUT", show_default="10",
    help="Seconds a connection to the study storage may take (every command reads "
         "$MTBERT_STORAGE_TIMEOUT).")]
CheckSpecOption = Annotated[bool, typer.Option(
    "--check", help="Name every searched setting that cannot change the model in some "
                    "reachable combination (ignored, clipped away, two names of one model), "
                    "one line each, and exit: 1 when there is any, 0 when none.")]
CheckJsonOption = Annotated[bool, typer.Option(
    "--json", help="With --check: the findings as a JSON list.")]
EnqueueOption = Annotated[Optional[Path], typer.Option(
    "--enqueue", help="YAML list of parameter mappings (space keys to values) to run as the "
                      "first trials; a configuration the study holds is not enqueued again.")]
BudgetHoursOption = Annotated[Optional[float], typer.Option(
    "--budget-hours", help="Start no new trial once the study's hours (wall time × GPU share, "
                           "all workers, running trials too) reach this many; stored in the "
                           "study, so every worker obeys it; a later --budget-hours replaces "
                           "it.")]
SeedsOption = Annotated[Optional[int], typer.Option(
    "--seeds", min=1, help="Race each configuration over up to N seeds (train.seed s, s+1, "
                           "...): the sampler learns from its mean, and it gets no more seeds "
                           "once worse than the incumbent on their shared seeds (spec key "
                           "seeds).")]
RaceAlphaOption = Annotated[Optional[float], typer.Option(
    "--race-alpha", help="With --seeds: the level at which a configuration is raced out "
                         "(default 0.1; spec key race_alpha).")]
ByTrialOption = Annotated[bool, typer.Option(
    "--by-trial", help="Rank single trials even when the study holds reseeds or races "
                       "(default then: configurations by their mean over seeds).")]
RankingJsonOption = Annotated[bool, typer.Option(
    "--json", help="Print the ranking (every configuration, or the first N of --top N) as a "
                   "JSON array, best first: params, n_seeds, seeds, trials, mean, std, state, "
                   "raced_out, feasible, representative_trial.")]
StopAfterFlatOption = Annotated[Optional[int], typer.Option(
    "--stop-after-flat", help="End the study once M finished configurations in a row did not "
                              "beat the incumbent by more than its seed std (with --seeds) or "
                              "--min-delta; stored in the study, every worker stops.")]
MinDeltaOption = Annotated[Optional[float], typer.Option(
    "--min-delta", help="With --stop-after-flat: the improvement that counts (default 0; "
                        "with --seeds the larger of it and the incumbent's seed std).")]


# ---------------------------------------------------------------- plumbing

class _TqdmHandler(logging.Handler):
    """Log lines on stderr that do not tear through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"mtbert: {self.format(record)}", file=sys.stderr)


def _setup_logging(quiet: bool) -> None:
    log.handlers[:] = [_TqdmHandler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _progress() -> bool:
    """Progress bars unless --quiet, which raised the log level."""
    return log.getEffectiveLevel() <= logging.INFO


def handle_errors(func):
    """Domain errors become one line on stderr and their exit code, never a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MtbertError as err:
            _error(str(err))
            raise typer.Exit(err.exit_code) from None
        except OSError as err:  # a path that cannot be read or written
            _error(_os_error(err))
            # A full disk is a run that failed, not bad input.
            raise typer.Exit(1 if err.errno in (errno.ENOSPC, errno.EDQUOT) else 2) from None
        except RuntimeError as err:  # pathlib before Python 3.13 on a loop of symlinks
            if not str(err).startswith(_SYMLINK_LOOP):
                raise
            path = str(err)[len(_SYMLINK_LOOP):].strip().strip("'\"")
            _error(f"{os.strerror(errno.ELOOP)}: {path}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("mtbert: interrupted", err=True)
            raise typer.Exit(130) from None
    return wrapper


_SYMLINK_LOOP = "Symlink loop from"


def _os_error(err: OSError) -> str:
    """An OSError in words; a directory made where a file (or a loop of symbolic links)
    is in the way says so rather than "File exists"."""
    where = f": {err.filename}" if err.filename else ""
    if isinstance(err, FileExistsError) and err.filename and not os.path.isdir(err.filename):
        if os.path.islink(err.filename) and not os.path.exists(err.filename):
            return f"{os.strerror(errno.ELOOP)}{where}"
        return f"{err.filename} is not a directory (a file is in its place)"
    return f"{err.strerror or err}{where}"


def _error(message: str) -> None:
    """An error line: one line whatever the message quotes (a study name with a newline)."""
    from mtbert.formatting import one_line

    typer.echo(f"mtbert: error: {one_line(message)}", err=True)


def _overrides(set_: Optional[list[str]], data_dir: Optional[Path]) -> list[str]:
    """--data-dir as the first --set (a quoted YAML string: any path stays a path), then
    --set in order, so that an explicit --set data.dir=... wins."""
    first = [f"data.dir={json.dumps(str(data_dir))}"] if data_dir is not None else []
    return first + list(set_ or [])


def _wandb_mode(mode: Optional[WandbMode]) -> str:
    from mtbert.tracking import resolve_mode

    return resolve_mode(mode.value if mode else None)


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtbert {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Only warnings and errors on stderr; no "
                                             "progress bars, no sweep or compare "
                                             "display.")] = False,
) -> None:
    from mtbert.formatting import mask_url, safe_streams

    safe_streams()
    _setup_logging(quiet)
    # The command line is parsed; what stays in sys.argv is only read by others, such as
    # W&B, which records it with every run: no storage password goes there.
    sys.argv[:] = [mask_url(arg) for arg in sys.argv]


# ---------------------------------------------------------------- one model

@app.command()
@handle_errors
def train(
    config: ConfigArg = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Run directory (default ./mtbert-runs/train-<timestamp>).")] = None,
    device: DeviceOption = Device.auto,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue a killed run from its last finished epoch.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the run that --out holds (refused without it).")]
    = False,
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
        run_config, run_dir = load_config(resume / "config.yaml"), resume
    else:
        run_config = load_config(config, _overrides(set_, data_dir))
        run_dir = out or RUNS_DIR / f"train-{datetime.now():%Y%m%d-%H%M%S}"
    summary = run_training(run_config, run_dir=run_dir, device=device.value,
                           resume=resume is not None, progress=_progress(),
                           existing="replace" if overwrite else "refuse")
    best = summary["best"]
    typer.echo(f"run: {run_dir}")
    typer.echo(f"best: epoch {best['epoch']} step {best['step']} (by {summary['selection_metric']})")
    _echo_lines([f"  {key:<20} {value:.4f}" for key, value in best["metrics"].items()])
    typer.echo(f"model: {run_dir / 'model'}")


def _load_model(model_dir: Path, device: Device):
    from mtbert.predictor import load
    from mtbert.runtime import resolve_device

    return load(model_dir, resolve_device(device.value))


@app.command("eval")
@handle_errors
def eval_(
    model_dir: ModelDirArg,
    data_dir: DataDirOption = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="Score one file of this task (with --file).")] = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", help="A labelled file of --task's format.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    device: DeviceOption = Device.auto,
) -> None:
    """Score a model on the dev files of its tasks, or on one labelled file."""
    from mtbert.predictor import dev_files, score_files

    if (task is None) != (file is None):
        raise MtbertError("--task and --file go together (e.g. --task qqp --file pairs.csv)")
    model = _load_model(model_dir, device)
    files = {model.task(task).name: file} if task else dev_files(model, data_dir)
    metrics = score_files(model, files, overall=task is None)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        _echo_lines([f"{key:<20} {value:.4f}" for key, value in metrics.items()])


def _check_predict_options(task, input, output, all_, data_dir, output_dir) -> None:
    """One file (--task --input --output) or every file (--all --output-dir), not both."""
    one = (("--task", task), ("--input", input), ("--output", output))
    if all_:
        given = [name for name, value in one if value is not None]
        if given:
            raise MtbertError(f"--all predicts every file of the model's tasks; drop "
                              f"{', '.join(given)} (or drop --all to predict one file)")
        if output_dir is None:
            raise MtbertError("--all needs --output-dir DIR for the prediction files")
        return
    if data_dir is not None or output_dir is not None:
        raise MtbertError("--data-dir and --output-dir go with --all; one file is "
                          "--task TASK --input FILE --output FILE")
    missing = [name for name, value in one if value is None]
    if missing:
        raise MtbertError(f"missing {', '.join(missing)}: predict one file with --task "
                          "TASK --input FILE --output FILE, or every file with --all "
                          "--data-dir DIR --output-dir DIR")
    # An unwritable destination fails now, not after the prediction pass.
    if output.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(output))
    if output.exists() and input.exists() and output.resolve() == input.resolve():
        raise MtbertError(f"--output {output} is the input file; write the predictions "
                          "elsewhere")


@app.command()
@handle_errors
def predict(
    model_dir: ModelDirArg,
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
    from mtbert.predictor import predict_all, predict_file

    _check_predict_options(task, input, output, all_, data_dir, output_dir)
    model = _load_model(model_dir, device)
    if all_:
        _echo_lines([str(p) for p in predict_all(model, data_dir, output_dir,
                                                  progress=_progress())])
    else:
        predict_file(model, task, input, output, progress=_progress())


@app.command()
@handle_errors
def analyze(
    model_dir: ModelDirArg,
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
    from mtbert.predictor import model_data_dir

    model = _load_model(model_dir, device)
    written = run_analysis(model, data_dir=model_data_dir(model, data_dir),
                           split=split.value, dest=out or model_dir / "analysis", top=examples,
                           progress=_progress())
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
    max_grad_norm: Annotated[float, typer.Option(
        "--max-grad-norm", help="Clip the gradient norm of every step to this (0: no "
                                "clipping).")] = 1.0,
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

    run_config = load_config(config, _overrides(set_, data_dir))
    options = PretrainOptions(
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, mask_prob=mask_prob,
        max_length=max_length or run_config.model.max_length,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
        save_every=save_every, log_every=log_every, max_grad_norm=max_grad_norm, seed=seed)
    out = out or RUNS_DIR / f"pretrain-{datetime.now():%Y%m%d-%H%M%S}"
    run_pretrain(run_config, out=out, options=options, device=device.value, resume=resume,
                 progress=_progress())
    typer.echo(str(out))


@app.command("config")
@handle_errors
def config_(
    config: ConfigArg = None,
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
        _echo_lines([f"{key:<{width}}  {default:<{default_width}}  {meaning}"
                     for key, default, meaning in rows])
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
    results = download_data(root, base_url=url, force=force, progress=_progress())
    failed = [r for r in results if r.status == "failed"]
    _echo_lines([f"{r.status:<10} {r.name}" + (f"  ({r.detail})" if r.status == "failed" else "")
                 for r in results])
    if failed:
        typer.echo(f"mtbert: error: {len(failed)} of {len(results)} files failed; "
                   f"the others are in {root}", err=True)
        raise typer.Exit(1)
    log.info("all %d files verified in %s", len(results), root)


# ---------------------------------------------------------------- studies

@app.command()
@handle_errors
def sweep(
    spec: SpecArg = None,
    trials: TrialsOption = None,
    timeout: TimeoutOption = None,
    study: StudyOption = None,
    storage: StorageOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    out: OutParent = DEFAULTS.out,
    wandb_mode: SweepWandbMode = None,
    wandb_project: WandbProjectOption = DEFAULTS.wandb_project,
    keep_top: KeepTopOption = DEFAULTS.keep_top,
    heartbeat: HeartbeatOption = DEFAULTS.heartbeat,
    grace: GraceOption = DEFAULTS.grace,
    device: SweepDeviceOption = Device(DEFAULTS.device),
    max_retries: MaxRetriesOption = DEFAULTS.max_retries,
    gpus: GpusOption = None,
    trials_per_gpu: TrialsPerGpuOption = DEFAULTS.trials_per_gpu,
    size: SizeOption = "auto",
    print_spec: PrintSpecOption = False,
    list_specs: ListSpecsOption = False,
    check: CheckSpecOption = False,
    as_json: CheckJsonOption = False,
    enqueue: EnqueueOption = None,
    budget_hours: BudgetHoursOption = None,
    seeds: SeedsOption = None,
    race_alpha: RaceAlphaOption = None,
    stop_after_flat: StopAfterFlatOption = None,
    min_delta: MinDeltaOption = None,
    baseline: BaselineOption = None,
    warm_start: WarmStartOption = None,
    warm_storage: WarmStorageOption = None,
    warm_top: WarmTopOption = DEFAULTS.warm_top,
    storage_outage: StorageOutageOption = DEFAULTS.storage_outage,
    storage_timeout: StorageTimeoutOption = None,
) -> None:
    """Run an Optuna study over a sweep spec: each trial a multitask training run.

    A budget spent or a stop (`mtbert studies --stop`) ends the sweep after its running
    trials, exit 0, with the reason on stderr."""
    from mtbert.studies.sizes import trials_on_cuda
    from mtbert.studies.spec import spec_list
    from mtbert.studies.storage import check_study_name

    if list_specs:
        return _echo_lines(spec_list())
    overrides = _overrides(set_, data_dir)
    # Whether the trials train on CUDA: asked only where --size auto has to look.
    on_cuda = functools.partial(trials_on_cuda, device.value, gpus is not None)
    if print_spec or check or as_json:
        resolved, chosen = _resolve_spec(spec, overrides, enqueue, seeds, race_alpha,
                                         size=size, on_cuda=on_cuda)
        return _show_spec(resolved, chosen, print_spec=print_spec, check=check,
                          as_json=as_json)
    _check_timing(timeout, heartbeat, grace, storage_outage)
    options = SweepOptions(
        trials=trials, timeout=timeout, storage=storage, out=out,
        study=None if study is None else check_study_name(study), keep_top=keep_top,
        wandb_mode=_wandb_mode(wandb_mode), wandb_project=wandb_project,
        heartbeat=heartbeat, grace=grace, device=device.value, trials_per_gpu=trials_per_gpu,
        max_retries=max_retries, gpus=_gpus(gpus),
        budget_hours=budget_hours, stop_after_flat=stop_after_flat, min_delta=min_delta,
        baseline=baseline, warm_start=warm_start, warm_storage=warm_storage, warm_top=warm_top,
        storage_outage=storage_outage, progress=_progress())
    _set_storage_timeout(storage_timeout)
    resolved, chosen = _resolve_spec(spec, overrides, enqueue, seeds, race_alpha, size=size,
                                     on_cuda=on_cuda, options=options)
    _run_sweep(resolved, options, size=chosen if resolved.sizes else None)


def _set_storage_timeout(seconds: Optional[float]) -> None:
    """`--storage-timeout`: for this process's connections and its trial processes'."""
    if seconds is not None:
        if not math.isfinite(seconds) or seconds > MAX_STORAGE_TIMEOUT_S:
            raise MtbertError(f"bad --storage-timeout {seconds:g}; valid: 1 to "
                              f"{MAX_STORAGE_TIMEOUT_S} seconds")
        os.environ["MTBERT_STORAGE_TIMEOUT"] = f"{seconds:g}"


def _check_timing(timeout: Optional[float], heartbeat: int, grace: int,
                  outage: float) -> None:
    """The sweep's seconds: each a finite number a run can use, the grace longer than a
    heartbeat (else a live trial counts as dead between two of its heartbeats)."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise MtbertError(f"bad --timeout {timeout:g}: no trial could start; give the "
                          "seconds after which no new trial starts (> 0), or leave "
                          "--timeout out")
    if not math.isfinite(outage):
        raise MtbertError(f"bad --storage-outage {outage:g}; valid: a finite number of "
                          "seconds >= 0")
    if grace <= heartbeat:
        raise MtbertError(f"--grace {grace} must be longer than --heartbeat {heartbeat}: a "
                          "running trial would count as dead between its heartbeats")


def _gpus(text: Optional[str]) -> Optional[list[str]]:
    """`--gpus`: the GPUs' CUDA_VISIBLE_DEVICES values; None without the option."""
    from mtbert.studies.slots import parse_gpus

    if text is None:
        return None
    if not text.strip():
        raise MtbertError("--gpus is empty; e.g. --gpus 0,1 or --gpus all (leave it out to "
                          "run on one device)")
    return parse_gpus(text)


def _show_spec(spec, size, *, print_spec: bool, check: bool, as_json: bool) -> None:
    """`mtbert sweep SPEC --print` or `--check`: the spec at its size, said on stderr."""
    from mtbert.studies.spec import spec_yaml

    if spec.sizes:  # a spec without sizes runs as written, as it always did
        log.info("%s", size.line(spec.name))
    if print_spec:
        return typer.echo(spec_yaml(spec), nl=False)
    return _check_spec(spec, as_json=as_json, check=check)


def _check_spec(spec, *, as_json: bool, check: bool) -> None:
    """`mtbert sweep SPEC --check [--json]`: the spec's inert settings; exit 1 if any."""
    from mtbert.studies.inert import check_spec

    if not check:
        raise MtbertError("--json goes with --check (the findings as a list)")
    findings, combinations = check_spec(spec)
    if as_json:
        typer.echo(json.dumps([f.to_dict() for f in findings], indent=2, default=str))
    else:
        _echo_lines([f.line() for f in findings])
        typer.echo(f"spec {spec.name}: {len(findings) or 'no'} finding"
                   f"{'' if len(findings) == 1 else 's'} in {combinations} reachable "
                   f"combination{'' if combinations == 1 else 's'}", err=True)
    if findings:
        raise typer.Exit(1)


def _warn_inert(spec, name: str) -> None:
    """The start of a sweep names, as warnings, what `--check` would find."""
    from mtbert.studies.inert import check_spec

    findings, _ = check_spec(spec)
    for finding in findings[:SHOWN_FINDINGS]:
        log.warning("spec %s: %s", spec.name, finding.line())
    if len(findings) > SHOWN_FINDINGS:
        log.warning("spec %s: %d more settings that cannot act; `mtbert sweep %s --check` "
                    "lists them all", spec.name, len(findings) - SHOWN_FINDINGS, name)


def _run_sweep(spec, options, size=None) -> None:
    """Run the sweep, say why it stopped early, print its table (exit 1: nothing finished)."""
    from mtbert.studies.job import RUNS_FOLDER
    from mtbert.studies.results import state_counts, sweep_table
    from mtbert.studies.runner import interrupted_table, run_sweep

    try:
        run = run_sweep(spec, options, size=size)
    except KeyboardInterrupt:
        _echo_lines(interrupted_table(options, spec.name))
        raise
    name = run.study.study_name
    log.info("study %s: %s", name,
             ", ".join(f"{n} {s.lower()}" for s, n in state_counts(run.study).items()))
    if run.stopped:
        typer.echo(f"mtbert: {run.stopped}", err=True)
    if run.failed:
        folder = run.study.user_attrs.get(RUNS_FOLDER, name)
        typer.echo("mtbert: error: no trial could finish; see the trial.log files under "
                   f"{options.out / folder}", err=True)
        raise typer.Exit(1)
    _echo_lines(sweep_table(run.study))


def _resolve_spec(spec: Optional[str], overrides: list[str], enqueue: Optional[Path],
                  seeds: Optional[int], race_alpha: Optional[float], *, size: str, on_cuda,
                  options: Optional[SweepOptions] = None):
    """The spec at its size (the study's, when `options` join one that exists), with --set,
    --enqueue and the racing options, and the size chosen."""
    from mtbert.runtime import require_device
    from mtbert.studies.enqueue import load_enqueue
    from mtbert.studies.runner import sized_spec
    from mtbert.studies.spec import with_racing

    if spec is None:
        raise MtbertError("name a sweep spec, e.g. `mtbert sweep loss-weights` "
                          "(see `mtbert sweep --list`)")
    if options is not None:  # a sweep starts: its device is there, before any storage
        require_device(options.device)
    resolved, chosen = sized_spec(spec, overrides, size, on_cuda=on_cuda, options=options)
    if enqueue is not None:
        resolved.enqueue = resolved.enqueue + load_enqueue(enqueue, resolved)
    if race_alpha is not None and (seeds or resolved.seeds) < 2:
        raise MtbertError("--race-alpha goes with --seeds N (N >= 2), or a spec with seeds")
    if options is not None:  # a sweep starts: it says what --check would
        _warn_inert(resolved, spec)
        if options.trials is None and options.timeout is None and resolved.sampler["name"] != "grid":
            options.trials = 10  # the default --trials; a grid runs to its end
    return with_racing(resolved, seeds, race_alpha), chosen


def _check_best_options(*, metric, export, trial, top, hf, wandb, reseed, set_, data_dir,
                        as_json) -> None:
    from mtbert.studies.results import check_metric

    check_metric(metric)
    if as_json and (export is not None or trial is not None or reseed is not None):
        raise MtbertError("--json prints the ranking (with --top N: its first N); it does not "
                          "go with --export, --trial or --reseed")
    if hf and export is None:
        raise MtbertError("--hf goes with --export DIR (it writes DIR/encoder/)")
    if wandb and export is None:
        raise MtbertError("--wandb goes with --export DIR (it logs the exported model)")
    if top is not None and (export is not None or trial is not None):
        raise MtbertError("--top prints a ranking; export one trial with --export "
                          "(and --trial N)")
    if reseed is not None and top is None:
        raise MtbertError("--reseed K goes with --top N, the number of best trials to re-run "
                          "(e.g. --reseed 3 --top 5)")
    if reseed is None and (set_ or data_dir):
        raise MtbertError("--set and --data-dir apply to the trials of --reseed only")


@app.command()
@handle_errors
def best(
    study: StudyOption = None,
    storage: StorageOption = None,
    out: OutParent = RUNS_DIR,
    metric: MetricOption = None,
    export: Annotated[Optional[Path], typer.Option(
        "--export", help="Copy the best trial's model into this directory.")] = None,
    trial: Annotated[Optional[int], typer.Option(
        "--trial", help="Use this trial number (needed to export from a multi-objective "
                        "study).")] = None,
    top: TopOption = None,
    hf: Annotated[bool, typer.Option(
        "--hf", help="With --export: also write DIR/encoder/, the fine-tuned encoder in "
                     "Hugging Face format (transformers.AutoModel loads it).")] = False,
    wandb: ExportWandbOption = False,
    reseed: Annotated[Optional[int], typer.Option(
        "--reseed", min=1, help="With --top N: re-run the N best original trials with K new "
                                "seeds each (new trials of the study, never pruned; seeds "
                                "already run are skipped), then rank by the mean over seeds.")
    ] = None,
    by_trial: ByTrialOption = False,
    as_json: RankingJsonOption = False,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    device: DeviceOption = Device.auto,
    wandb_mode: SweepWandbMode = None,
    wandb_project: WandbProjectOption = DEFAULTS.wandb_project,
    keep_top: KeepTopOption = DEFAULTS.keep_top,
) -> None:
    """Print the best trial (or Pareto front); --export its model; --reseed more seeds.

    --reseed K --top N re-runs the N best trials with K more seeds each and ranks the
    configurations by their mean.

    --set, --data-dir and --device apply to the trials of --reseed only, the W&B options
    to them and to --export --wandb; the spec, with the sweep's --set, is read from the
    study.
    """
    from mtbert.studies.results import choose, rank
    from mtbert.studies.storage import open_study, storage_errors

    _check_best_options(metric=metric, export=export, trial=trial, top=top, hf=hf,
                        wandb=wandb, reseed=reseed, set_=set_, data_dir=data_dir,
                        as_json=as_json)
    if reseed is not None:
        return _reseed(study=study, storage=storage, out=out, metric=metric, top=top,
                       seeds=reseed, overrides=_overrides(set_, data_dir), device=device,
                       wandb_mode=wandb_mode, wandb_project=wandb_project, keep_top=keep_top)
    loaded, url = open_study(storage, out, study, read_only=True)
    with storage_errors(url):
        if top is not None or as_json:
            ranking = rank(loaded, top=top or len(loaded.trials), metric=metric,
                           by_trial=by_trial)
            _echo_lines([ranking.to_json()] if as_json else ranking.lines)
            for note in ranking.notes:
                log.info("%s", note)
            return
        choice = choose(loaded, metric=metric, trial=trial, by_trial=by_trial)
    _echo_lines(choice.lines())
    if export is not None:
        _export(choice, url=url, dest=export, hf=hf, wandb=wandb, out=out,
                wandb_mode=wandb_mode, wandb_project=wandb_project)


def _export(choice, *, url, dest, hf, wandb, out, wandb_mode, wandb_project) -> None:
    from mtbert.runtime import wandb_dir
    from mtbert.studies.export import export_trial
    from mtbert.studies.job import WandbSettings
    from mtbert.studies.storage import mask_url

    if choice.trial is None:
        raise MtbertError("a multi-objective study has no single best trial; pick one "
                          "from the front with --trial N")
    settings = WandbSettings(_wandb_mode(wandb_mode), wandb_project,
                             str(wandb_dir(out))) if wandb else None
    path = export_trial(choice.trial, study=choice.study.study_name, storage=mask_url(url),
                        dest=dest, selection=choice.selection(), hf=hf, seeds=choice.seeds,
                        wandb=settings)
    typer.echo(f"exported: {path}")
    if hf:
        typer.echo(f"encoder (Hugging Face format): {path / 'encoder'}")


def _reseed(*, study, storage, out, metric, top, seeds, overrides, device, wandb_mode,
            wandb_project, keep_top) -> None:
    from mtbert.studies.configurations import groups_table
    from mtbert.studies.runner import reseed_study

    options = SweepOptions(study=study, storage=storage, out=out,
                           wandb_mode=_wandb_mode(wandb_mode), wandb_project=wandb_project,
                           keep_top=keep_top, device=device.value, progress=_progress())
    name, by, groups = reseed_study(options, top=top, seeds=seeds, metric=metric,
                                    overrides=overrides)
    typer.echo(f"study {name}: the {len(groups)} best trials, each with {seeds} more seeds, "
               f"ranked by mean {by} (mean ± std over seeds)")
    _echo_lines(groups_table(groups))


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
    wandb_project: WandbProjectOption = "mtbert",
) -> None:
    """Train configs over the same seeds: mean ± std per metric, paired test vs a baseline.

    The table also goes to Markdown; finished runs are not trained again.
    """
    from mtbert.compare import (failed_runs, parse_seeds, resolve_candidates, run_compare,
                                text_table, write_reports)

    seed_values = parse_seeds(seeds, seed_list)
    candidates = resolve_candidates(configs or [], _overrides(set_, data_dir), None,
                                    per_config=list(set_for or []))
    names = [c.name for c in candidates]
    out = out or RUNS_DIR / f"compare-{'-vs-'.join(names)}"
    result = run_compare(candidates, seeds=seed_values, out=out,
                         baseline=baseline or names[0], metric=metric, device=device.value,
                         progress=_progress(), wandb_mode=_wandb_mode(wandb_mode),
                         wandb_project=wandb_project)
    md, figure = write_reports(result, out, markdown_file)
    _echo_lines(text_table(result))
    log.info("table: %s; per-seed numbers: %s%s", md, out / "compare.json",
             f"; figure: {figure}" if figure else "")
    failed = failed_runs(result)
    if failed:
        typer.echo(f"mtbert: error: {failed} of {len(names) * len(seed_values)} seed runs "
                   "failed (see above); run the same command again to retry them", err=True)
        raise typer.Exit(1)


def _confirm(question: str) -> bool:
    """A yes/no question on stderr, answered on stdin; no answer (EOF) is one line, exit 1."""
    typer.echo(f"{question} [y/N]: ", err=True, nl=False)
    answer = sys.stdin.readline()
    if not answer:
        typer.echo("\nmtbert: error: no answer on stdin; nothing deleted (pass --yes to "
                   "delete without asking)", err=True)
        raise typer.Exit(1)
    return answer.strip().lower() in ("y", "yes")


@app.command()
@handle_errors
def studies(
    storage: StorageOption = None,
    out: OutParent = RUNS_DIR,
    delete: Annotated[Optional[str], typer.Option(
        "--delete", help="Delete this study from the storage (asks first).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    runs: Annotated[bool, typer.Option(
        "--runs", help="With --delete: also remove the study's run directories "
                       "(<out>/<study>/ and every trial's run_dir under --out on this "
                       "machine).")] = False,
    stop: Annotated[Optional[str], typer.Option(
        "--stop", help="Ask every worker of this study to start no new trial: running "
                       "trials finish, then each worker exits 0; a new sweep of it runs "
                       "nothing until --resume.")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Lift --stop: workers started afterwards run trials of this "
                         "study again.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the list as a JSON array, one object per study.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="With --delete: delete a study whose trials are RUNNING (a worker "
                        "may be training them).")] = False,
) -> None:
    """List the studies of a storage: trials by state, hours, budget, best values.

    --json for scripts; --delete one, --stop its workers after their running trials,
    --resume it.
    """
    from mtbert.studies.budget import set_stop
    from mtbert.studies.listing import studies_table, study_summaries
    from mtbert.studies.retention import plan_deletion
    from mtbert.studies.storage import open_storage, select_study, storage_errors, storage_url

    given = [o for o, v in (("--delete", delete), ("--stop", stop), ("--resume", resume),
                            ("--json", as_json)) if v]
    if len(given) > 1:
        raise MtbertError(f"{' and '.join(given)} do not go together; pick one")
    if (runs or force) and delete is None:
        raise MtbertError(f"{'--runs' if runs else '--force'} goes with --delete NAME")
    if stop or resume:
        return typer.echo(set_stop(storage, out, stop or resume, requested=bool(stop)))
    url = storage_url(storage, out)
    rdb = open_storage(url, must_exist=True, read_only=delete is None)
    if delete is None:
        with storage_errors(url):
            summaries = study_summaries(rdb)
        if as_json:
            return typer.echo(json.dumps([s.to_dict() for s in summaries], indent=2))
        return _echo_lines(studies_table(summaries))
    plan = plan_deletion(rdb, select_study(rdb, delete), url=url, out=out, runs=runs)
    if plan.running and not force:
        raise MtbertError(f"study {plan.study} has {plan.running} RUNNING trial(s): a worker "
                          "may be training them; stop its sweep first (`mtbert studies --stop "
                          f"{plan.study}`, or Ctrl-C), or pass --force (a dead worker's "
                          "trials stay RUNNING until the next worker fails them)")
    for note in plan.left:
        log.warning("%s", note)
    if not yes and not _confirm(f"Delete {plan.describe()}?"):
        typer.echo("mtbert: nothing deleted", err=True)
        raise typer.Exit(1)
    plan.execute(rdb)
    typer.echo(f"deleted {plan.describe()}")


@app.command()
@handle_errors
def report(
    study: StudyOption = None,
    storage: StorageOption = None,
    out: OutParent = RUNS_DIR,
    to: Annotated[Optional[Path], typer.Option(
        "--to", help="Report directory (default <out>/<study>/report).")] = None,
    top: Annotated[int, typer.Option(
        "--top", min=1, help="Draw the dev curves of this many best trials.")] = 5,
    wandb: Annotated[bool, typer.Option(
        "--wandb", help="Also log the trials table and figures as one W&B run in the "
                        "study's group (files under $WANDB_DIR, else the report's "
                        "directory).")] = False,
    wandb_mode: Annotated[Optional[WandbMode], typer.Option(
        "--wandb-mode", help="W&B mode for --wandb (default: online with an API key, else "
                             "offline).")] = None,
    wandb_project: WandbProjectOption = "mtbert",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Write over a non-empty --to directory (refused without it; "
                            "the default report directory is always rewritten).")] = False,
) -> None:
    """Write a study report: index.html (opens offline) and the figures as PNG files."""
    from mtbert.runtime import wandb_dir
    from mtbert.studies.report import build_report, check_destination, destination
    from mtbert.studies.report import log_study_report
    from mtbert.studies.storage import mask_url, open_study, storage_errors

    mode = _wandb_mode(wandb_mode) if wandb else "disabled"
    if to is not None:
        check_destination(to, overwrite=overwrite)  # before the storage is opened
    loaded, url = open_study(storage, out, study, read_only=True)
    with storage_errors(url), destination(to or out / loaded.study_name / "report",
                                          overwrite=overwrite, given=to is not None) as dest:
        written = build_report(loaded, dest=dest, storage=mask_url(url), top=top)
    for note in written.notes:
        log.info("%s", note)
    log.info("figures: %s", ", ".join(p.name for p in written.figures.values()) or "none")
    if wandb:
        run_id = log_study_report(written, mode=mode, project=wandb_project,
                                  directory=wandb_dir(dest))
        if run_id:
            log.info("W&B: report run %s in group %s (%s)", run_id, loaded.study_name, mode)
    typer.echo(f"report: {written.index}")


def _click_exceptions():
    try:
        from typer._click import exceptions  # Typer 0.2x vendors its own Click
    except ImportError:
        from click import exceptions
    return exceptions


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler's stop) ends a command like Ctrl-C


def run() -> None:
    """Console-script entry point: usage errors are one line too (exit 2); SIGTERM and
    Ctrl-C end a command with exit 130, its resume state intact."""
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
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
        _error(f"{err.format_message()}{hint}")
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("mtbert: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
