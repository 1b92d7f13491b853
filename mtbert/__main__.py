"""`python -m mtbert ...` is the `mtbert` command."""

from mtbert.cli import run

run()
