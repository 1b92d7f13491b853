"""Known configurations queued before a study samples: a spec's `enqueue:`, `sweep
--enqueue FILE.yaml` and a warm start's configurations, each checked against the
spec's space like the space itself (keys, ranges, choices, grids, conditions) and
its values returned in their parameter's type."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mtbert.errors import ConfigError
from mtbert.safeyaml import load_yaml
from mtbert.studies.conditions import describe_when, when_alternatives, when_holds

if TYPE_CHECKING:
    from mtbert.studies.spec import Param, SweepSpec


def check_enqueue(items: Any, space: dict[str, Param], base_values: dict[str, Any],
                  fail) -> list[dict[str, Any]]:
    """Known configurations to run first, checked against the space like the space itself.

    Each item maps space keys to values (keys left out are sampled). Values are
    returned in their parameter's type, so that Optuna's skip_if_exists
    recognises a configuration it already holds (1 and 1.0 differ to it).
    """
    if not isinstance(items, list) or not all(isinstance(e, dict) for e in items):
        raise fail("enqueue must be a list of mappings of space keys to values")
    return [check_configuration(item, space, base_values, fail, where=f"enqueue[{i}]")
            for i, item in enumerate(items)]


def check_configuration(item: dict[str, Any], space: dict[str, Param],
                        base_values: dict[str, Any], fail, *, where: str = "") -> dict[str, Any]:
    """One configuration (space keys to values) that fits the space: every key in it,
    every value in its range or choices, every condition met; values in their
    parameter's type. `where` names it in the error."""
    params: dict[str, Any] = {}
    head = f"{where}: " if where else ""
    for key, value in item.items():
        if key not in space:
            raise fail(f"{head}'{key}' is not a key of the space; valid: {', '.join(space)}")
        params[key] = _enqueued_value(space[key], value, f"{where}.{key}" if where else key,
                                      fail)
    for key in params:
        when = space[key].when
        if not when_holds(when, lambda k: params.get(k, base_values.get(k))):
            here = ", ".join(f"{k} is {params.get(k, base_values.get(k))!r}"
                             for alternative in when_alternatives(when) for k in alternative)
            raise fail(f"{head}'{key}' is only sampled when {describe_when(when)}; here "
                       f"{here}")
    return params


def _enqueued_value(p: Param, value: Any, where: str, fail) -> Any:
    if p.type == "categorical":
        if value not in p.choices:
            raise fail(f"{where}: {value!r} is not a choice; valid: "
                       f"{', '.join(map(str, p.choices))}")
        return value
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise fail(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"{where}: {value!r} is not a number")
    if p.type == "int" and value != int(value):
        raise fail(f"{where}: {value!r} is not an integer")
    if not p.low <= value <= p.high:
        raise fail(f"{where}: {value!r} is outside [{p.low}, {p.high}]")
    if p.step is not None and abs((value - p.low) / p.step - round((value - p.low) / p.step)) \
            > 1e-9:
        raise fail(f"{where}: {value!r} is not on the grid {p.low} + k * {p.step}")
    return int(value) if p.type == "int" else float(value)


def load_enqueue(path: Path, spec: SweepSpec) -> list[dict[str, Any]]:
    """`--enqueue FILE.yaml`: a list of mappings of the spec's space keys to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"enqueue file {path} does not exist")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), f"enqueue file {path}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"enqueue file {path} is not valid YAML"
                          + (f" (line {mark.line + 1})" if mark else "")) from None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"enqueue file {path}: {message}")

    # A bare list, or the `enqueue:` section of a spec-like file.
    items = raw.get("enqueue") if isinstance(raw, dict) and "enqueue" in raw else raw
    return check_enqueue(items, spec.space, spec.base_values, fail)
