"""The package's shape: its import graph has no cycle and points one way, the commands
that only use a model import neither the study stack nor the training loop, the CLI stays
thin, the README's layout is the tree, and a built wheel holds every package."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtbert"

# Lower layers never import higher ones, lazily or not. Strategy registries sit below the
# config, which names their entries; the model modules sit below the training loop, which
# sits below everything that runs trainings (studies, compare) and the CLI on top.
LAYERS = [
    {"version", "errors", "tasks", "formatting", "schedules", "balancing", "rundir", "live",
     "safeyaml"},
    {"config", "runtime", "tokenize", "encoder", "contrastive"},
    {"data", "heads", "optim", "fastpath", "evaluate", "modeldir", "predictor", "download",
     "analysis"},
    {"train", "pretrain"},
    {"tracking", "compare", "studies"},
    {"cli", "__main__", ""},  # "" is the package itself: mtbert.load
]
TRAINING_AND_STUDIES = {"mtbert.train", "mtbert.pretrain", "mtbert.compare", "mtbert.tracking"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere (functions included), leaving
    out `if TYPE_CHECKING:` blocks, which never run."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(parts[:len(parts) - node.level + 1] + [base] * bool(base))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            for child in ast.iter_child_nodes(node):
                visit([child])

    visit(tree.body)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_graph_has_no_cycle(graph):
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def _layer(module: str) -> int:
    top = module.removeprefix("mtbert").removeprefix(".").split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module} is in no layer of tests/test_architecture.py")


def test_no_module_imports_one_above_it(graph):
    upward = [f"{m} -> {n}" for m, targets in graph.items() for n in targets
              if _layer(n) > _layer(m)]
    assert upward == []


@pytest.mark.parametrize("module", ["mtbert.predictor", "mtbert.analysis", "mtbert.runtime",
                                    "mtbert.evaluate"])
def test_eval_predict_and_analyze_need_no_training_or_study_stack(graph, module):
    reached = _reachable(graph, module) | {module}
    assert not {m for m in reached if m in TRAINING_AND_STUDIES or m.startswith("mtbert.studies")}


@pytest.mark.slow
def test_mtbert_eval_loads_neither_the_training_loop_nor_the_studies(tiny_model_dir, tmp_path):
    """The real command, in a fresh interpreter: which mtbert modules did it import?"""
    code = ("import sys\nfrom mtbert.cli import run\n"
            f"sys.argv = ['mtbert', '--quiet', 'eval', {str(tiny_model_dir)!r}, '--json', "
            "'--device', 'cpu']\n"
            "try:\n    run()\nexcept SystemExit as done:\n    code = done.code\n"
            "print(repr(sorted(m for m in sys.modules if m.startswith('mtbert'))))\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    metrics_line, modules_line = result.stdout.strip().splitlines()[-2:]
    assert set(json.loads(metrics_line)) >= {"sst/acc", "qqp/acc", "sts/pearson"}
    loaded = set(ast.literal_eval(modules_line))
    assert "mtbert.predictor" in loaded
    assert not loaded & TRAINING_AND_STUDIES
    # The sweep options' dataclass, whose defaults the CLI's options take when it starts,
    # is the one module of the study package it may load (it imports nothing more).
    assert {m for m in loaded if m.startswith("mtbert.studies")} <= {
        "mtbert.studies", "mtbert.studies.options"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import write_task_files, write_tiny_encoder

    from mtbert.config import build_config
    from mtbert.train import train

    root = tmp_path_factory.mktemp("arch")
    config = build_config({
        "model": {"encoder": str(write_tiny_encoder(root / "enc")), "max_length": 32},
        "data": {"dir": str(write_task_files(root / "data")), "cache_dir": str(root / "c")},
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}})
    train(config, run_dir=root / "run", device="cpu", progress=False)
    return root / "run" / "model"


def test_no_cli_function_is_longer_than_70_lines():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    lengths = {node.name: node.end_lineno - min([node.lineno] +
                                                [d.lineno for d in node.decorator_list]) + 1
               for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert len(lengths) > 20  # every command and helper was measured
    assert {name: n for name, n in lengths.items() if n > 70} == {}


def test_the_readme_layout_lists_every_module_of_the_tree():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    listed, prefix = set(), ""
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, entry = len(match.group(1)), match.group(2)
        if indent == 2 and entry.endswith("/"):
            prefix = entry
        elif indent == 2:
            prefix = ""
        if entry.endswith(".py") and indent in (2, 4):
            listed.add((prefix if indent == 4 else "") + entry)
    on_disk = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert listed == on_disk


@pytest.mark.slow
def test_a_built_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    """Users and Docker install a wheel: it must hold every package, shipped specs too."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    wheel = next(dist.glob("mtbert-*.whl"))
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = next(env_dir.glob("lib/python*/site-packages"))
    # The fresh environment borrows this one's dependencies (read-only, after its own
    # site-packages), never its mtbert: the editable install's hook is not loaded there.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", "import mtbert, sys; print(mtbert.__file__); "
         "from mtbert.cli import run; sys.argv = ['mtbert', 'sweep', 'loss-weights', "
         "'--print']; run()"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    first, *spec = result.stdout.splitlines()
    assert first.startswith(str(site))
    assert "name: loss-weights" in spec
    listing = subprocess.run([str(python), "-c", "import mtbert.studies.runner, "
                              "mtbert.studies.trial; print('ok')"], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=60)
    assert listing.stdout.strip() == "ok", listing.stderr


# Optuna's private names: the worker and everything else use its public API; the few
# reaches past it live in studies/optuna_api.py, each exercised by tests/test_optuna_api.py.
OPTUNA_PRIVATE = re.compile(
    r"_pop_waiting_trial_id|\._get_trials\b|\._storage\b|\._study_id\b|\._trial_id\b"
    r"|_cached_frozen_trial|\._thread_local\b|\bget_storage\b|_CachedStorage"
    r"|\boptuna(\.\w+)*\._\w+")


def test_no_optuna_private_name_outside_the_one_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "studies" / "optuna_api.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if OPTUNA_PRIVATE.search(code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_private_name_check_finds_each_kind():
    for line in ("study._pop_waiting_trial_id = take", "s._storage.get_trial(1)",
                 "x = trial._trial_id", "study._study_id", "view._get_trials()",
                 "from optuna.storages._heartbeat import is_heartbeat_enabled",
                 "study._thread_local.cached_all_trials = None"):
        assert OPTUNA_PRIVATE.search(line), line
    assert not OPTUNA_PRIVATE.search("storage.get_trial(trial_id(t))")


def test_no_module_of_the_studies_package_is_over_400_lines():
    long = {path.name: n for path in (PACKAGE / "studies").glob("*.py")
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
