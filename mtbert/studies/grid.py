"""The grid sampler: every combination of a spec's values, each once (`sampler: {name:
grid}`, Optuna's `GridSampler`).

A categorical parameter's grid is its choices; an int or float parameter lists its
values under `grid:` (within its range, on its step, whole numbers for an int). A grid
study ends when every point has started: `mtbert sweep` without `--trials` or
`--timeout` runs the rest of the grid, a worker starts no point twice, and one that
finds the grid done starts nothing. Conditional parameters (`when:`) are refused
under the grid sampler: a point where a condition does not hold would run the model
of another point again; a space with conditions is a union of grids, one spec each.
"""

from __future__ import annotations

import math
from typing import Any, Callable

GRID = "grid"
MAX_POINTS = 100_000  # a typo of a grid (a value list pasted twice over), not a study


def check_grid_values(key: str, entry: dict[str, Any], kind: str, low: float, high: float,
                      step: float | None, fail: Callable[[str], Exception]) -> list | None:
    """The `grid:` values of an int or float parameter, checked against its range and
    step; None when it lists none."""
    values = entry.get("grid")
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise fail(f"space.{key}.grid must be a non-empty list of values, e.g. grid: "
                   f"[{low:g}, {high:g}]")
    checked = []
    for value in values:
        value = _number(value)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or (kind == "int" and value != int(value)):
            raise fail(f"space.{key}.grid: {value!r} is not {'a whole number' if kind == 'int' else 'a number'}")
        if not low <= value <= high:
            raise fail(f"space.{key}.grid: {value!r} is outside [{low:g}, {high:g}]")
        if step is not None and not math.isclose((value - low) / step,
                                                 round((value - low) / step), abs_tol=1e-9):
            raise fail(f"space.{key}.grid: {value!r} is not on the step {low:g} + k * {step:g}")
        checked.append(int(value) if kind == "int" else float(value))
    if len(set(checked)) != len(checked):
        raise fail(f"space.{key}.grid lists a value twice: {values}")
    return checked


def _number(value: Any) -> Any:
    """A number written as YAML reads it, or as text (YAML reads `1e-4` as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_grid_space(space: dict, sampler: dict[str, Any],
                     fail: Callable[[str], Exception]) -> None:
    """Under the grid sampler, every parameter has a grid and none a condition."""
    if sampler.get("name") != GRID:
        return
    for key, p in space.items():
        if p.when:
            raise fail(f"space.{key}: the grid sampler takes no when: (a point where it does "
                       "not hold would train another point's model again); split the space "
                       "into one grid spec per branch")
        if p.type != "categorical" and p.grid is None:
            raise fail(f"space.{key}: the grid sampler needs its values, e.g. grid: "
                       f"[{p.low:g}, {p.high:g}]")
    points = grid_points(space)
    if points > MAX_POINTS:
        raise fail(f"the grid has {points} points; at most {MAX_POINTS}")


def grid_values(space: dict) -> dict[str, list]:
    """The grid of a spec's space: each parameter's values."""
    return {key: list(p.choices if p.type == "categorical" else p.grid or [])
            for key, p in space.items()}


def grid_points(space: dict) -> int:
    return math.prod(len(values) for values in grid_values(space).values())
