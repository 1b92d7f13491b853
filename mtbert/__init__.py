"""mtbert: one BERT, three tasks, and the sweeps that tell which multitask strategy works."""

__version__ = "0.1.0"


def load(directory, device="cpu"):
    """Load an exported model directory; see `mtbert.export.MultitaskPredictor`."""
    from mtbert.export import load as _load

    return _load(directory, device)


__all__ = ["__version__", "load"]
