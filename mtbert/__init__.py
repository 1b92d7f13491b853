"""mtbert: one BERT, three tasks, and the sweeps that tell which multitask strategy works."""

from mtbert.version import __version__


def load(directory, device="cpu"):
    """Load an exported model directory; see `mtbert.predictor.MultitaskPredictor`."""
    from mtbert.predictor import load as _load

    return _load(directory, device)


__all__ = ["__version__", "load"]
