"""The README's set-up commands stay true: CI runs the same test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("pip install ")]


def test_ci_runs_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    assert len(readme) >= 2
    assert readme[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest" in readme[1]


def test_readme_main_job_is_a_shipped_sweep_and_the_quickstart_exists():
    main_job = _commands((ROOT / "README.md").read_text())[0]
    assert "mtbert sweep loss-weights --trials 3 --seeds 1" in main_job
    assert (ROOT / "sweeps" / "loss-weights.yaml").exists()
    assert "mtbert train examples/quickstart.yaml" in (ROOT / "README.md").read_text()
    assert (ROOT / "examples" / "quickstart.yaml").exists()
