"""docker/: checked statically (no Docker engine here): the compose file parses, its workers
run a command the CLI accepts, one GPU each, and the clusters guide shows the same recipe."""

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from mtbert.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = re.compile(r"\$\{(\w+):-((?:[^{}]|\$\{[^}]*\})*)\}")


def _defaults(text: str) -> str:
    """Compose's ${VAR:-default} interpolation with nothing set: the defaults."""
    while DEFAULT.search(text):
        text = DEFAULT.sub(lambda m: m.group(2), text)
    return text


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def _instructions():
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1]) for ln in lines]


def _parse(args: list[str]):
    """Parse `mtbert ARGS` as the console command would, without running it."""
    group = typer.main.get_command(app)
    ctx = group.make_context("mtbert", list(args), resilient_parsing=False)
    # The subcommand's name and arguments: Click 8.2 renamed protected_args.
    protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
    name, command, rest = group.resolve_command(ctx, [*protected, *ctx.args])
    return command.make_context(name, rest, parent=ctx)


def _workers(compose):
    return {name: s for name, s in compose["services"].items() if name.startswith("worker")}


def test_dockerfile_installs_the_package_and_its_entrypoint_is_the_cli():
    steps = _instructions()
    kinds = [k for k, _ in steps]
    assert kinds[0] == "ARG" and steps[1] == ("FROM", "${PYTORCH_IMAGE}")
    assert re.search(r"ARG PYTORCH_IMAGE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime",
                     (ROOT / "docker" / "Dockerfile").read_text())
    for kind, rest in steps:
        if kind == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    run = " ".join(rest for kind, rest in steps if kind == "RUN")
    assert "pip install --no-cache-dir ." in run and "mtbert --version" in run
    entry = yaml.safe_load(dict(steps)["ENTRYPOINT"])
    assert entry == ["mtbert"]
    assert 'mtbert = "mtbert.cli:run"' in (ROOT / "pyproject.toml").read_text()
    assert yaml.safe_load(dict(steps)["CMD"]) == ["--help"]
    env = dict(kv.split("=") for kv in dict(steps)["ENV"].split())
    assert env == {"MTBERT_DATA_DIR": "/data", "MTBERT_CACHE_DIR": "/cache", "WANDB_DIR": "/runs"}


def test_compose_runs_postgres_and_one_worker_per_gpu(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    workers = _workers(compose)
    assert len(workers) >= 2
    gpus = []
    for name, worker in workers.items():
        assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        gpus += device["device_ids"]
        mounts = {v.split(":")[1] for v in (_defaults(v) for v in worker["volumes"])}
        assert {"/data", "/runs", "/cache"} <= mounts
        assert worker["build"]["dockerfile"] == "docker/Dockerfile"
        assert (ROOT / "docker" / worker["build"]["context"] / "docker" / "Dockerfile").exists()
    assert len(set(gpus)) == len(gpus), "two workers share a GPU"


def test_every_worker_runs_the_same_sweep_against_the_database(compose):
    postgres = compose["services"]["postgres"]["environment"]
    commands = set()
    for worker in _workers(compose).values():
        url = _defaults(worker["environment"]["MTBERT_STORAGE"])
        password = _defaults(postgres["POSTGRES_PASSWORD"])
        assert url == (f"postgresql://{postgres['POSTGRES_USER']}:{password}@postgres:5432/"
                       f"{postgres['POSTGRES_DB']}")
        commands.add(tuple(worker["command"]))
    (command,) = commands
    # The CLI accepts it, and takes the storage from the environment.
    ctx = _parse(list(command))
    assert ctx.command.name == "sweep"
    assert ctx.params["spec"] == "loss-weights" and ctx.params["device"].value == "cuda"
    assert ctx.params["out"] == Path("/runs") and ctx.params["data_dir"] == Path("/data")
    storage = next(p for p in ctx.command.params if p.name == "storage")
    assert storage.envvar == "MTBERT_STORAGE"


def test_the_clusters_guide_shows_the_compose_command_and_the_recipes(compose):
    readme = (ROOT / "docs" / "guides" / "clusters.md").read_text()
    (command,) = {tuple(w["command"]) for w in _workers(compose).values()}
    assert f"mtbert {shlex.join(command)}" in readme
    assert "docker compose -f docker/compose.yaml up --build" in readme
    assert "docker build -f docker/Dockerfile -t mtbert ." in readme
    # Single GPU and another machine's worker use the image as the compose workers do.
    for line in readme.splitlines():
        if line.startswith("docker run "):
            args = shlex.split(line.split(" mtbert ", 1)[1].rstrip("\\ "))
            assert _parse(args).command.name in ("sweep", "best", "report")


def test_storage_from_the_environment_reaches_the_commands(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    monkeypatch.setenv("MTBERT_STORAGE", "postgresql://mtbert:s3cret@127.0.0.1:1/none")
    result = CliRunner().invoke(app, ["studies", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "cannot reach the study storage postgresql://mtbert:***@127.0.0.1:1/none" in \
        result.stderr
    assert "s3cret" not in result.output


def test_the_static_check_rejects_what_the_cli_would():
    from mtbert.cli import _click_exceptions

    errors = _click_exceptions()
    with pytest.raises(errors.NoSuchOption):
        _parse(["sweep", "loss-weights", "--trials-per-gpux", "2"])
    with pytest.raises(errors.BadParameter):
        _parse(["sweep", "loss-weights", "--device", "gpu"])
