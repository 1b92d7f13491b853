"""YAML (and JSON) read safely: every spec, run config, `--set` value, `--enqueue`
file and `--baseline` JSON.

YAML aliases let a few hundred bytes stand for billions of values ("billion
laughs"); loading keeps them shared and cheap, but anything that walks, copies or
prints the result expands them. So a document is bounded when it is read: its
size, how deep it nests, and how many values it holds with every alias expanded.
Past a bound it is one line naming it, never a hang.

A key given twice in one mapping is refused with both lines: PyYAML keeps the last
silently, so a spec that lists `train.lr` twice would search only the second. A
file is read only when it is a regular file (a directory or a device is named as
such, and /dev/zero is never read to the end), at most a bounded number of bytes,
as UTF-8.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from mtbert.errors import ConfigError

MAX_BYTES = 1_000_000  # a spec or a run config is a few kilobytes
MAX_VALUES = 100_000  # values, aliases expanded
MAX_DEPTH = 50  # nesting of mappings and lists
MAX_FILE_BYTES = 4 * MAX_BYTES  # MAX_BYTES characters of UTF-8 take at most 4 bytes each
_MERGE = "tag:yaml.org,2002:merge"  # `<<: *base`: keys it brings in may be overridden


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}  # key -> its line
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class names it
                    continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str) -> Any:
    """The YAML document `text`, checked against the bounds; `where` names it in an
    error. A syntax error propagates as PyYAML's `YAMLError`; a key given twice in one
    mapping is a ConfigError naming it and its lines."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where} is {len(text):,} characters; a YAML document here holds "
                          f"at most {MAX_BYTES:,}")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    except _DuplicateKey as dup:
        lines = (f"line {dup.again}" if dup.first == dup.again
                 else f"lines {dup.first} and {dup.again}")
        raise ConfigError(f"{where}: key {shown(dup.key)} is given twice ({lines}); each key "
                          "at most once in a mapping") from None
    check_bounds(data, where)
    return data


def load_json(text: str, where: str) -> Any:
    """The JSON document `text`, bounded as YAML is; `where` names it in an error."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not JSON ({err})") from None
    check_bounds(data, where)
    return data


def file_problem(path: Path) -> str | None:
    """Why `path` is no file to read ("does not exist", "is a directory", "is not a
    regular file", ...), or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        if err.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be read ({err.strerror or type(err).__name__})"
    except ValueError:  # a NUL byte in the name
        return "does not exist"
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, a pipe or a socket)"
    return None


def read_text(path: Path, where: str, limit: int = MAX_FILE_BYTES) -> str:
    """The text of the regular file `path`, UTF-8, at most `limit` bytes; else one
    ConfigError starting with `where` (e.g. "config file x.yaml is a directory")."""
    problem = file_problem(path)
    if problem:
        raise ConfigError(f"{where} {problem}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or type(err).__name__})") \
            from None
    if len(data) > limit:
        raise ConfigError(f"{where} is larger than {limit:,} bytes; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte {err.start}); a binary file?") \
            from None


def shown(value: Any, limit: int = 60) -> str:
    """`value` quoted for an error line: its repr, cut to `limit` characters (a value
    of a user's file may be a thousand-item list or nest fifty levels)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deep to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_bounds(data: Any, where: str) -> None:
    """`data` holds at most MAX_VALUES values (aliases expanded) at most MAX_DEPTH deep."""
    stack, seen = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_VALUES:,} values (YAML "
                              "aliases repeating themselves?)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for pair in value.items() for v in pair)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
