"""A spec's search space, one entry at a time: `{type: float|int|categorical, low,
high, log, step, choices, grid, when}`, checked strictly, so that what is searched is
what the spec says and `sweep --print` writes a spec the same command accepts.

Strict where YAML and Optuna are lenient: `log: "false"` is a string, not a
boolean (read as a truth value it once meant log scale on); an int distribution
takes whole numbers (bounds 1.5..2.5 would silently become 1..2); a number must
fit (`1e400` is no bound); a step must fit its range (Optuna would cut the range
to the last whole step, or to `low` alone when the step is larger than it); a
field that does not go with the type (`step` on a categorical) is refused rather
than ignored; and a `when:` on the entry's own key would never hold.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass, field
from typing import Any

from mtbert.config import build_config, mapping_keys, set_key
from mtbert.errors import ConfigError
from mtbert.safeyaml import shown
from mtbert.studies.conditions import when_alternatives
from mtbert.studies.grid import check_grid_values

PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "grid", "when")
PARAM_TYPES = ("float", "int", "categorical")
NUMERIC_FIELDS = ("low", "high", "log", "step", "grid")
# Values on a step grid: past 10^15 a float grid has no exact points left (floats
# carry about 15.9 significant digits), and Optuna's Decimal arithmetic fails at 10^28.
MAX_GRID = 10**15


@dataclass
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    # Sampled only where this holds: {key: value} (a list of values: any of them), or a
    # list of such mappings (any of them); keys not sampled read the base.
    when: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    grid: list[Any] | None = None  # an int or float parameter's values for the grid sampler


def check_param(key: str, entry: Any, base: dict[str, Any], leaves: set[str], fail) -> Param:
    """The space entry `entry` of config key `key`, checked against the run config over
    `base` (`leaves`: its dotted keys); `fail(message)` makes the error."""
    if key not in leaves and key.rpartition(".")[0] not in mapping_keys():
        close = sorted(k for k in leaves if k.split(".")[0] == key.split(".")[0])
        raise fail(f"space: unknown config key {shown(key)}; valid keys include: "
                   f"{', '.join(close or sorted(leaves)[:12])}")
    if not isinstance(entry, dict):
        raise fail(f"space.{key} must be a mapping with a type")
    for k in entry:
        if k not in PARAM_KEYS:
            raise fail(f"space.{key}: unknown field {shown(k)}; valid: {', '.join(PARAM_KEYS)}")
    kind = entry.get("type")
    if kind not in PARAM_TYPES:
        raise fail(f"space.{key}: type {shown(kind)}; valid: {', '.join(PARAM_TYPES)}")
    when = entry.get("when")
    when = {} if when is None or when == [] else when
    if not (isinstance(when, dict) or (
            isinstance(when, list) and when and all(isinstance(w, dict) and w for w in when))):
        raise fail(f"space.{key}.when must map keys to values, or be a list of such "
                   "mappings (any of them holds)")
    if kind == "categorical":
        misplaced = [f for f in NUMERIC_FIELDS if f in entry]
        if misplaced:
            raise fail(f"space.{key}: {', '.join(misplaced)} do not go with a categorical "
                       "(it takes choices)")
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"space.{key}: categorical needs a non-empty list of choices")
        values = choices
        param = Param(key, kind, choices=choices, when=when)
    else:
        param = _numeric(key, kind, entry, fail)
        param.when = when
        values = param.grid or [param.low, param.high]
    for value in values:
        try:
            build_config(set_key(base, key, value))
        except ConfigError as err:
            raise fail(f"space.{key}: value {shown(value)} is invalid ({err})") from None
    return param


def _numeric(key: str, kind: str, entry: dict[str, Any], fail) -> Param:
    """A float or int entry: its bounds, step and log scale, each of its type and
    fitting the others."""
    if "choices" in entry:
        raise fail(f"space.{key}: choices go with a categorical; a {kind} takes low and high")
    if "low" not in entry or "high" not in entry:
        raise fail(f"space.{key}: {kind} needs low and high")
    low, high = _number(key, "low", entry["low"], kind, fail), \
        _number(key, "high", entry["high"], kind, fail)
    step = None if entry.get("step") is None else \
        _number(key, "step", entry["step"], kind, fail)
    log = False if entry.get("log") is None else entry["log"]  # `log:` left empty: off
    if not isinstance(log, bool):
        raise fail(f"space.{key}.log must be true or false (unquoted), got {shown(log)}")
    if low > high:
        raise fail(f"space.{key}: low {shown(entry['low'])} > high {shown(entry['high'])}")
    if log and low <= 0:
        raise fail(f"space.{key}: a log distribution needs low > 0, got {shown(entry['low'])}")
    if step is not None:
        if step <= 0:
            raise fail(f"space.{key}: step must be > 0, got {shown(entry['step'])}")
        if log:
            raise fail(f"space.{key}: log and step cannot be combined")
        _check_grid(key, low, high, step, fail)
    return Param(key, kind, low=low, high=high, log=log, step=step,
                 grid=check_grid_values(key, entry, kind, low, high, step, fail))


def _number(key: str, name: str, raw: Any, kind: str, fail) -> float | int:
    """Field `name` of an entry as a finite number of the entry's type (an int
    distribution's as an int)."""
    value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            value = raw
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"space.{key}.{name} must be a number, got {shown(raw)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int past any float
        finite = False
    if not finite:
        raise fail(f"space.{key}.{name} {shown(raw)} is not a finite number")
    if kind == "int":
        if value != int(value):
            raise fail(f"space.{key}.{name}: an int distribution takes whole numbers, got "
                       f"{shown(raw)} (or make it type: float)")
        return int(value)
    return float(value)


def _check_grid(key: str, low: float, high: float, step: float, fail) -> None:
    """`step` fits [low, high]: not larger than it (Optuna would leave `low` alone), a
    whole number of steps (Optuna would cut `high` back), not finer than floats hold."""
    if high == low:
        return
    if step > high - low:
        raise fail(f"space.{key}: step {step:g} is larger than the range {low:g}..{high:g}; "
                   "only low would be searched")
    # Optuna checks the grid in Decimal on the values' shortest reprs; so does this.
    d_low, d_high, d_step = (decimal.Decimal(repr(v)) for v in (low, high, step))
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        count = (d_high - d_low) / d_step
        if count > MAX_GRID:
            raise fail(f"space.{key}: step {step:g} makes more than {MAX_GRID:.0e} values in "
                       f"{low:g}..{high:g}; leave step out for a continuous range")
        if count != count.to_integral_value():
            last = d_low + count.to_integral_value(rounding=decimal.ROUND_FLOOR) * d_step
            raise fail(f"space.{key}: step {step:g} does not divide the range {low:g}..{high:g}"
                       f"; end it at a step, e.g. high {float(last):g}")


def check_conditions(space: dict[str, Param], base: dict[str, Any], leaves: set[str],
                     fail) -> None:
    """Every `when:` names config keys sampled before it, with values they can take."""
    order = list(space)
    for key, param in space.items():
        for alternative in when_alternatives(param.when):
            for cond_key, values in alternative.items():
                if cond_key == key:
                    raise fail(f"space.{key}.when names {key} itself; a parameter cannot "
                               "wait for its own value (it would never be sampled); name "
                               "another key")
                if cond_key not in leaves:
                    raise fail(f"space.{key}.when: unknown config key {shown(cond_key)}")
                if not values:
                    raise fail(f"space.{key}.when: {cond_key} lists no value; {key} would "
                               "never be sampled")
                if cond_key in space and order.index(cond_key) > order.index(key):
                    raise fail(f"space.{key}.when: '{cond_key}' must come before '{key}' in "
                               "the space")
                for value in values:
                    try:
                        build_config(set_key(base, cond_key, value))
                    except ConfigError as err:
                        raise fail(f"space.{key}.when: {err}") from None
