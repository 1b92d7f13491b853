"""The documentation stays true: the references under docs/reference/ are what
docs/generate.py writes from the code now, the site builds with `mkdocs build --strict`
and every link and image of it resolves, `--help` shows flags as flags, and no source
names a document the repository does not have."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import optuna
import pytest
import typer.main
from typer.testing import CliRunner

from mtbert.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generator()


@pytest.mark.parametrize("page", sorted(generate.PAGES))
def test_each_reference_page_is_what_the_code_writes_now(page):
    committed = (ROOT / "docs" / "reference" / page).read_text()
    if page == "spec.md":
        named = re.search(r"as Optuna (\S+) names them", committed).group(1)
        if named != optuna.__version__:
            pytest.skip(f"spec.md lists Optuna {named}'s constructor arguments; this is "
                        f"Optuna {optuna.__version__}")
    assert generate.PAGES[page]() == committed, (
        f"docs/reference/{page} is out of date: run `{generate.COMMAND}` and commit it")


def test_the_cli_reference_names_every_command_and_option():
    text = generate.cli_reference()
    sweep = text[text.index("## `mtbert sweep`"):text.index("## `mtbert best`")]
    assert "| `--print` | flag |  |" in sweep
    assert "| `--trials` | int ≥ 1 |  |" in sweep
    assert "| `--device` | one of: auto, cpu, cuda | auto |" in sweep
    assert "(environment: $MTBERT_STORAGE)" in sweep
    commands = re.findall(r"^## `(mtbert[^`]*)`", text, flags=re.M)
    assert commands == ["mtbert", "mtbert train", "mtbert eval", "mtbert predict",
                        "mtbert analyze", "mtbert pretrain", "mtbert config", "mtbert sweep",
                        "mtbert best", "mtbert compare", "mtbert studies", "mtbert report",
                        "mtbert data download"]


def test_the_config_reference_has_every_key_of_the_schema():
    from mtbert.config import describe

    text = generate.config_reference()
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", text, flags=re.M)
    assert [(key, default.strip()) for key, default in rows] == [
        (key, generate._cell(default)) for key, default, _ in describe()]
    assert "| `train.lr` |" in text and "## optim" in text


def test_the_spec_reference_follows_the_code_lists(monkeypatch):
    from mtbert.studies import params, samplers, spec

    text = generate.spec_reference()
    for name in spec.SPEC_KEYS + params.PARAM_KEYS + params.PARAM_TYPES:
        assert f"| `{name}` |" in text
    for name in samplers.SAMPLERS:
        assert f"### sampler `{name}`" in text
    for name in samplers.PRUNERS:
        assert f"### pruner `{name}`" in text
    assert "| `n_startup_trials` | 5 |" in text  # MedianPruner's own default
    assert "| `search_space` | set by mtbert" in text
    # A key added to the code without a meaning written for it stops the generator.
    monkeypatch.setattr(spec, "SPEC_KEYS", spec.SPEC_KEYS + ("schedule",))
    with pytest.raises(SystemExit, match=r"SPEC_KEYS: no meaning written for \['schedule'\]"):
        generate.spec_reference()


def test_the_generator_writes_all_pages_and_says_which_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "REFERENCE", tmp_path / "docs" / "reference")
    (tmp_path / "docs" / "reference").mkdir(parents=True)
    (tmp_path / "docs" / "reference" / "cli.md").write_text(generate.cli_reference())
    generate.main()
    assert sorted(p.name for p in (tmp_path / "docs" / "reference").iterdir()) == [
        "cli.md", "config.md", "spec.md"]
    said = capsys.readouterr().err.splitlines()
    assert said == ["docs/reference/cli.md: unchanged", "docs/reference/config.md: written",
                    "docs/reference/spec.md: written"]


# ---------------------------------------------------------------- the site

class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)


def broken_links(site: Path) -> list[str]:
    """Every relative link or image of the built pages whose file is not in the site."""
    broken = []
    for page in sorted(site.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        for target in parser.targets:
            url = urlparse(target)
            if url.scheme or url.netloc or not url.path:
                continue  # another site, a mail address, or an anchor on this page
            base = site if url.path.startswith("/") else page.parent
            path = (base / unquote(url.path).lstrip("/")).resolve()
            if path.is_dir():
                path = path / "index.html"
            if not path.is_file():
                broken.append(f"{page.relative_to(site)}: {target}")
    return broken


def test_the_link_check_finds_a_missing_page_and_image(tmp_path):
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide" / "index.html").write_text(
        '<a href="../index.html">home</a><a href="#top">top</a><a href="https://x.org/a">x</a>'
        '<img src="fig.png"><a href="../gone/">gone</a>')
    (tmp_path / "index.html").write_text('<a href="guide/">guide</a><a href="/guide/x.css">')
    assert broken_links(tmp_path) == ["guide/index.html: fig.png",
                                      "guide/index.html: ../gone/", "index.html: /guide/x.css"]


@pytest.mark.slow
def test_the_site_builds_strictly_and_every_link_and_image_resolves(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                             str(ROOT / "mkdocs.yml"), "-d", str(site)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    pages = {str(p.relative_to(site)) for p in site.rglob("index.html")}
    assert {"index.html", "reference/cli/index.html", "reference/config/index.html",
            "reference/spec/index.html", "changes/index.html",
            "strategies-cpu-study/index.html"} <= pages
    assert (site / "strategies-cpu-study" / "curves.png").is_file()
    assert (site / "search" / "search_index.json").is_file()
    assert not (site / "generate.py").exists()
    assert broken_links(site) == []


# ---------------------------------------------------------------- --help

def _command_paths(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _command_paths(sub, (*path, name))


def test_help_shows_every_flag_without_a_value_and_every_option_with_one():
    runner = CliRunner()
    seen = 0
    for path, command in _command_paths(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0, (path, result.output)
        assert "bool" not in result.output.lower(), path
        for param in command.params:
            if not getattr(param, "opts", None) or not param.opts[0].startswith("-"):
                continue  # an argument
            line = next(line for line in result.output.splitlines()
                        if re.match(rf"│\s*{re.escape(param.opts[0])}[\s,]", line))
            # The column after the names: empty for a flag, the value's type otherwise.
            value = re.search(rf"{re.escape(param.opts[-1])}\s+(\S+)", line).group(1)
            if param.is_flag:
                assert value.lower() not in ("<bool>", "boolean"), (path, line)
            else:
                assert value.startswith("<") or value.isupper(), (path, line)  # <int>, TEXT
            seen += 1
    assert seen > 100  # every command's options were looked at


# ---------------------------------------------------------------- sources

def test_no_source_names_a_document_the_repository_lacks():
    """A docstring or comment that names a document (an upper-case name such as README.md,
    or a path under docs/) names one that exists."""
    named = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[A-Z][A-Z_-]*\.md|docs/[\w./-]+\.md)\b")
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.split()
    names = {Path(f).name for f in tracked}
    missing = []
    for path in sorted((ROOT / "mtbert").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for doc in named.findall(line):
                exists = (ROOT / doc).is_file() if "/" in doc else doc in names
                if not exists:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {doc}")
    assert missing == []
