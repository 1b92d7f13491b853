"""A live block at the bottom of a terminal: a few lines redrawn in place (a sweep's
running trials and its study line), while every other line, a log line or a finished
trial's result, scrolls above it.

Plain ANSI, the two sequences every terminal emulator since the VT100 knows: cursor up
N lines, then erase to the end of the screen. Each line is cut to the terminal's width
and the block to its height, both read at every redraw, so that a line never wraps and
the cursor never has to climb above the screen: a resize or a narrow terminal costs at
worst one stale frame, never an error. `is_live` says where a block goes at all; a log
file, Slurm or Kubernetes get plain lines and no control character from the commands.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TextIO

# A size when the stream's own cannot be read (it stopped being a terminal).
FALLBACK_SIZE = os.terminal_size((80, 24))


def is_live(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that redraws: a TTY whose TERM is not "dumb"."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def terminal_size(stream: TextIO) -> os.terminal_size:
    """The terminal's size now; FALLBACK_SIZE's for what it does not say (a pseudo-terminal
    nobody sized says 0 x 0)."""
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return FALLBACK_SIZE
    return os.terminal_size((columns or FALLBACK_SIZE.columns, lines or FALLBACK_SIZE.lines))


def duration(seconds: float) -> str:
    """41s, 2m31s, 1h02m."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def eta(since: tuple[float, int] | None, now: float, step: int, steps: int) -> float | None:
    """Seconds left of a training at `step` of `steps`, at its rate since (time, step)
    `since`, its first step (loading left out, evaluations included); None before a
    step was taken since."""
    if since is None or step <= since[1]:
        return None
    return round((now - since[0]) / (step - since[1]) * max(steps - step, 0), 1)


def position_line(label: str, where: str, *, epoch: int, epochs: int, step: int, steps: int,
                  elapsed_s: float, eta_s: float | None, loss: float | None,
                  dev: str = "") -> str:
    """One training's line: `label  where  epoch 2/3  step 140/300  2m31s, ~2m10s left
    loss 0.8123  dev ...`, the same for a sweep's trials and `mtbert compare`'s runs."""
    line = (f"{label}  {where}  epoch {epoch}/{epochs}  step {step}/{steps}  "
            f"{duration(elapsed_s)}")
    if eta_s is not None:
        line += f", ~{duration(eta_s)} left"
    if loss is not None:
        line += f"  loss {loss:.4f}"
    return f"{line}  dev {dev}" if dev else line


def fit(lines: list[str], size: os.terminal_size) -> list[str]:
    """`lines` cut to `size`: each to its width less one column (a line as wide as the
    terminal wraps on some), and to its height less one row, the last line kept (the
    study's) and a count of the lines left out in their place."""
    width, rows = max(size.columns - 1, 1), max(size.lines - 1, 1)
    if len(lines) > rows:
        more = [f"... {len(lines) - rows + 1} more"] if rows > 1 else []
        lines = [*lines[:max(rows - 2, 0)], *more, lines[-1]]
    return [line if len(line) <= width else
            line[:width - 3] + "..." if width > 3 else line[:width] for line in lines]


class LiveBlock:
    """The lines at the bottom of a terminal stream. `update` redraws them; inside
    `above()` whatever is written to the stream lands above them; `close` erases them.
    Thread-safe: a display thread redraws while trial threads log."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.RLock()
        self._lines: list[str] = []
        self._drawn = 0  # rows of the block on screen, below which the cursor stands

    def update(self, lines: list[str]) -> None:
        with self.lock:
            self._lines = list(lines)
            self._erase()
            self._draw()

    @contextlib.contextmanager
    def above(self):
        """Write lines above the block: it is erased, then drawn again below them."""
        with self.lock:
            self._erase()
            try:
                yield
            finally:
                self._draw()

    def close(self) -> None:
        with self.lock:
            self._erase()
            self._lines = []

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        lines = fit(self._lines, terminal_size(self.stream))
        if lines:
            self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)


class _Above(logging.Handler):
    """Hands each record to a logger's own handlers with the block out of their way."""

    def __init__(self, block: LiveBlock, handlers: list[logging.Handler]):
        super().__init__()
        self.block, self.handlers = block, handlers

    def emit(self, record: logging.LogRecord) -> None:
        with self.block.above():
            for handler in self.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


@contextlib.contextmanager
def logging_above(block: LiveBlock, logger: logging.Logger):
    """While the block is drawn, `logger`'s lines go above it, as its handlers write them."""
    handlers = logger.handlers[:]
    logger.handlers[:] = [_Above(block, handlers)]
    try:
        yield
    finally:
        logger.handlers[:] = handlers
