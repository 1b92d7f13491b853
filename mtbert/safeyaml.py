"""YAML read safely: every spec, run config, `--set` value and `--enqueue` file.

YAML aliases let a few hundred bytes stand for billions of values ("billion
laughs"); loading keeps them shared and cheap, but anything that walks, copies or
prints the result expands them. So a document is bounded when it is read: its
size, how deep it nests, and how many values it holds with every alias expanded.
Past a bound it is one line naming it, never a hang.
"""

from __future__ import annotations

from typing import Any

import yaml

from mtbert.errors import ConfigError

MAX_BYTES = 1_000_000  # a spec or a run config is a few kilobytes
MAX_VALUES = 100_000  # values, aliases expanded
MAX_DEPTH = 50  # nesting of mappings and lists


def load_yaml(text: str, where: str) -> Any:
    """The YAML document `text`, checked against the bounds; `where` names it in an
    error. A syntax error propagates as PyYAML's `YAMLError`."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where} is {len(text):,} characters; a YAML document here holds "
                          f"at most {MAX_BYTES:,}")
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    check_bounds(data, where)
    return data


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
