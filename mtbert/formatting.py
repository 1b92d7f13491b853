"""How results are shown: numbers, mean ± std, text and Markdown tables, error lines, PNG
figures, URLs with their credentials masked, and streams that never fail on a character
their locale cannot encode. One home for each, shared by the
commands that print or write them."""

from __future__ import annotations

import codecs
import math
import re
import sys
from pathlib import Path
from typing import Any


# user:password@ in a URL (SQLAlchemy reads the password up to the first '@'), and
# password-like query or keyword arguments (?password=..., sslpassword=...).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")
_KEY_PASSWORD = re.compile(r"(\b(?:password|passwd|pwd|sslpassword|sslkey|secret)=)"
                           r"[^&\s'\"]*", re.IGNORECASE)


def mask_url(text: str) -> str:
    """`text` (a URL, or a message quoting one) with every credential replaced by ***."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def _escape(err: UnicodeError):
    """A path's undecodable bytes (surrogates, as Python reads them under LC_ALL=C) go out
    as those bytes; any other character the encoding lacks as a backslash escape."""
    if isinstance(err, UnicodeEncodeError):
        text = err.object[err.start:err.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in text):
            return bytes(ord(c) - 0xDC00 for c in text), err.end
        return codecs.backslashreplace_errors(err)
    raise err


codecs.register_error("mtbert.escape", _escape)


def safe_streams() -> None:
    """stdout and stderr never fail on a character their locale cannot encode (a `×` or
    an accented path under LC_ALL=C): `_escape`."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="mtbert.escape")


def first_line(err: BaseException | str | None, default: str = "") -> str:
    """The first non-empty line of an error (or a message), else its type's name."""
    text = str(err).strip() if err is not None else ""
    if text:
        return text.splitlines()[0]
    if isinstance(err, BaseException):
        return type(err).__name__
    return default


def one_line(text: str) -> str:
    """`text` with every character that is not printable (a newline, a tab, an escape)
    written as its escape, so that an error quoting a user's value stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_value(value: Any) -> str:
    """A parameter value: floats to 4 significant digits, the rest as is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items())


def format_mean_std(mean: float, std: float) -> str:
    """"mean ± std", "mean" without a std (one seed), "-" without a value."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"


def markdown_table(header: list[str], rows: list[list[str]], *,
                   right_from: int | None = None) -> list[str]:
    """A Markdown table's lines; columns from `right_from` on are right-aligned."""
    align = ["---:" if right_from is not None and i >= right_from else "---"
             for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def aligned_table(header: list[str], rows: list[list[str]], *, left: int = 1) -> list[str]:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]]


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG and close it."""
    # No "Software" text chunk: the PNGs carry nothing but the picture.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
