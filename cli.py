"""Run the mtbert CLI from a checkout without installing: `python cli.py train ...`."""

from mtbert.cli import run

if __name__ == "__main__":
    run()
