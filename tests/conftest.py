"""Shared fixtures: a tiny random BERT checkpoint and tiny task files written per test.

The tiny encoder (hidden 32, 2 layers, a 60-word vocabulary) and the toy data
make a full multitask run take about a second on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtbert.config import build_config
from mtbert.encoder import BertConfig, BertEncoder, to_hf_state_dict
from mtbert.studies.job import TRIAL_PROGRAM_ENV
from stub_trial import STUB_ENV

# Tiny models gain nothing from threads, and 2 threads per test process oversubscribe
# a 2-core machine as soon as anything else runs.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cs224n-qqp16k"

WORDS = ("good great fine fun bad awful dull poor movie film plot actor scene story "
         "man woman dog cat plays runs eats sings guitar piano food fast slow big small "
         "what how why is are the a an do does can you i it").split()
TINY = dict(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)


def write_tiny_encoder(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random BERT checkpoint in Hugging Face format: config.json, weights, vocab.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(**{**TINY, **overrides})
    model = BertEncoder(config)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(to_hf_state_dict(model), str(directory / "model.safetensors"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_task_files(directory: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """Tiny SST/QQP/STS train and dev files in the CS224N format, with a learnable signal."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        sst = ["\tid\tsentence\tsentiment"]
        qqp = ["\tid\tsentence1\tsentence2\tis_duplicate"]
        sts = ["\tid\tsentence1\tsentence2\tsimilarity"]
        for i in range(n):
            label = i % 5
            mood = ["awful", "bad", "fine", "good", "great"][label]
            sst.append(f"{i}\tsst{split}{i}\t{mood} {_sentence(rng, rng.randint(2, 6))}\t{label}")
            a = _sentence(rng, rng.randint(3, 7))
            dup = i % 2
            b = a if dup else _sentence(rng, rng.randint(3, 7))
            qqp.append(f"{i}\tqqp{split}{i}\t{a}\t{b}\t{float(dup)}")
            score = round(rng.uniform(0, 5), 1)
            c = a if score > 2.5 else _sentence(rng, 4)
            sts.append(f"{i}\tsts{split}{i}\t{a}\t{c}\t{score}")
        (directory / f"ids-sst-{split}.csv").write_text("\n".join(sst) + "\n")
        (directory / f"quora-{split}.csv").write_text("\n".join(qqp) + "\n")
        (directory / f"sts-{split}.csv").write_text("\n".join(sts) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def task_dir(tmp_path) -> Path:
    return write_task_files(tmp_path / "data")


@pytest.fixture
def tiny_config(tiny_encoder, task_dir, tmp_path):
    """A run config over the tiny encoder and data: 2 epochs of 6 steps."""
    def make(**sections):
        data = {
            "model": {"encoder": str(tiny_encoder), "max_length": 32},
            "data": {"dir": str(task_dir), "cache_dir": str(tmp_path / "cache")},
            "train": {"epochs": 2, "steps_per_epoch": 6, "batch_size": 8, "lr": 1e-3,
                      "eval_batch_size": 16, "log_every": 2},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return build_config(data)
    return make


class ConfigReads:
    """A config section (TrainConfig, LossConfig) that records the dotted key of every
    field read from it, to check a schedule's or loss method's declared `reads`."""

    def __init__(self, section: str, config):
        self._section, self._config = section, config
        self.read: set[str] = set()

    def __getattr__(self, name):
        value = getattr(self._config, name)
        self.read.add(f"{self._section}.{name}")
        return value


def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a storage or
    W&B server that hangs); close it to stop."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed
                return

    threading.Thread(target=accept, daemon=True).start()
    return listener


def wait_for(condition, *, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition()` until it returns a true value, and return that value; fail the
    test naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


STUB_TRIAL = Path(__file__).with_name("stub_trial.py")
NOT_SLOW_TRIAL = Path(__file__).with_name("not_slow_trial.py")


def pytest_runtest_setup(item):
    """The fast tier trains no model in a trial process: before a test that is not marked
    `slow` (and its fixtures, module-scoped ones included) the trial program is one that
    fails at once, naming the marker; a `slow` test's trials are real."""
    if item.get_closest_marker("slow") is None:
        os.environ[TRIAL_PROGRAM_ENV] = str(NOT_SLOW_TRIAL)
    else:
        os.environ.pop(TRIAL_PROGRAM_ENV, None)


def pytest_runtest_teardown(item):
    os.environ.pop(TRIAL_PROGRAM_ENV, None)


_TIER_SECONDS: dict[str, list[float]] = {}


def _tier(item) -> str:
    if item.get_closest_marker("outside") is not None:
        return "outside systems"
    return "slow" if item.get_closest_marker("slow") is not None else "fast"


def pytest_collection_modifyitems(items):
    for item in items:  # an outside system is slow too: -m "not slow" leaves it out
        if item.get_closest_marker("outside") is not None:
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    """Test time (setup, call and teardown) by tier, for the summary below."""
    tier = report.user_properties and dict(report.user_properties).get("tier")
    if tier:
        _TIER_SECONDS.setdefault(tier, []).append(report.duration)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    if ("tier", _tier(item)) not in item.user_properties:
        item.user_properties.append(("tier", _tier(item)))


def pytest_terminal_summary(terminalreporter):
    """One line per tier: how long its tests took, so that CI shows each tier's cost."""
    if not _TIER_SECONDS:
        return
    parts = [f"{tier} {sum(seconds):.0f} s" for tier, seconds in sorted(_TIER_SECONDS.items())]
    terminalreporter.write_line(f"test time by tier: {', '.join(parts)}")


def use_stub_trials(monkeypatch, **settings) -> None:
    """Every sweep started from here on, in this process or in a child that inherits the
    environment, runs its trials with the stand-in trial program (tests/stub_trial.py):
    the real worker and trial-process contract, no model; `settings` steer it (its
    docstring lists them). Processes make a test slow: in the fast tier this fails."""
    if os.environ.get(TRIAL_PROGRAM_ENV) == str(NOT_SLOW_TRIAL):
        pytest.fail("a test that starts stand-in trial processes starts processes: mark it "
                    "@pytest.mark.slow", pytrace=False)
    monkeypatch.setenv(TRIAL_PROGRAM_ENV, str(STUB_TRIAL))
    monkeypatch.setenv(STUB_ENV, json.dumps(settings))


@pytest.fixture
def stub_trials(monkeypatch):
    """The test's sweeps run stand-in trials (`use_stub_trials`); returns
    `behave(**settings)`, which changes their settings."""
    use_stub_trials(monkeypatch)

    def behave(**settings) -> None:
        use_stub_trials(monkeypatch, **settings)

    return behave


def tiny_sweep_args(spec, tiny_encoder, task_dir, out, trials, *extra) -> list[str]:
    """`mtbert sweep` arguments for short trials of the tiny encoder on the tiny files."""
    return ["-q", "sweep", str(spec), "--trials", str(trials), "--out", str(out),
            "--data-dir", str(task_dir), "--wandb-mode", "disabled", "--device", "cpu",
            "--set", f"model.encoder={tiny_encoder}", "--set", f"data.cache_dir={out}/cache",
            "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
            "--set", "train.batch_size=8", "--set", "model.max_length=32",
            "--set", "data.max_train_examples=0", "--set", "data.max_eval_examples=0", *extra]


POSTGRES_URL = os.environ.get("MTBERT_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def new_database(prefix: str, url: str = POSTGRES_URL):
    """The URL of a new, empty PostgreSQL database on the server of `url`, dropped (its
    connections closed) afterwards."""
    import sqlalchemy

    from mtbert.studies.storage import with_driver

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(with_driver(url), isolation_level="AUTOCOMMIT",
                                     poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def parse_cli(args: list[str]):
    """Parse `mtbert ARGS` as the console command would, without running it: an unknown
    option or a bad choice raises (subcommand groups such as `data` resolved too)."""
    import typer

    from mtbert.cli import app

    command = typer.main.get_command(app)
    ctx = command.make_context("mtbert", list(args), resilient_parsing=False)
    while hasattr(command, "resolve_command"):
        # The subcommand's name and arguments: Click 8.2 renamed protected_args.
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
        name, command, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def one_line_error(result, code: int) -> str:
    """The one `mtbert: error:` line of a CliRunner result that exited `code`, with no
    traceback anywhere."""
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mtbert: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def postgres_unreachable(url: str = POSTGRES_URL) -> str | None:
    """None where a server accepts connections on the URL's host and port, else the
    connection error (password masked), the reason to skip. Past that, any failure
    (driver, login, database) fails the tests that use it: a broken setup must not skip."""
    import socket

    import sqlalchemy

    address = sqlalchemy.engine.make_url(url)
    host, port = address.host or "localhost", address.port or 5432
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        shown = address.render_as_string(hide_password=True)
        return f"no PostgreSQL server reachable at {host}:{port} ({shown}): {err}"
    return None


class Killed(Exception):
    """Raised from an on_eval callback: the run dies as a killed process would."""


def timeless_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records without their wall seconds (`time/...`), which no
    two runs share: what a resumed run must reproduce exactly."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def train_killed_and_resumed(config, root: Path, kill_epoch: int = 0,
                             before_resume=None) -> tuple[dict, dict]:
    """Summaries of an uninterrupted run (root/full) and of the same run killed after
    epoch `kill_epoch` (0-based) then resumed (root/killed); `before_resume(run_dir)`
    may rewrite the killed run's files in between."""
    from mtbert.train import train

    full = train(config, run_dir=root / "full", device="cpu", progress=False)

    def kill(epoch, step, metrics):
        if epoch == kill_epoch:
            raise Killed

    with pytest.raises(Killed):
        train(config, run_dir=root / "killed", device="cpu", progress=False, on_eval=kill)
    assert not (root / "killed" / "summary.json").exists()
    if before_resume is not None:
        before_resume(root / "killed")
    resumed = train(config, run_dir=root / "killed", device="cpu", progress=False,
                    resume=True)
    return full, resumed


def rng_states_across_a_resume(config, root: Path, device: str, read_state,
                               before_resume=None) -> tuple[dict, dict]:
    """`read_state()` after every epoch of an uninterrupted run (root/full), of the same
    run killed after epoch 1 and of its resumption (root/killed), keyed (run, epoch); and
    the killed run's resume.pt, read before it resumed. `before_resume()` runs between."""
    from mtbert.rundir import RESUME_FILE
    from mtbert.train import train

    states = {}

    def record(run):
        def on_eval(epoch, step, metrics):
            states[run, epoch] = read_state()
            if run == "killed":
                raise Killed
        return on_eval

    train(config, run_dir=root / "full", device=device, progress=False, on_eval=record("full"))
    with pytest.raises(Killed):
        train(config, run_dir=root / "killed", device=device, progress=False,
              on_eval=record("killed"))
    saved = torch.load(root / "killed" / RESUME_FILE, weights_only=True)
    if before_resume is not None:
        before_resume()
    train(config, run_dir=root / "killed", device=device, progress=False, resume=True,
          on_eval=record("resumed"))
    return states, saved


@pytest.fixture(autouse=True)
def _reset_mtbert_logger():
    """CLI tests install mtbert's stderr handler; later tests read logs through caplog."""
    import logging
    logger = logging.getLogger("mtbert")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = state[0], state[1], state[2]
